"""``make run``: the whole service on this machine, on loopback only.

Starts a moto server as the local S3 (and, for the queue path, SQS), a local Ray head with the dashboard,
and the Serve application with its HTTP proxy on 127.0.0.1:8000. Ctrl-C, SIGTERM or ``make stop`` stops
everything it started (and only that).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import yaml

from cluster.serve_tuning import serve_tuning
from facerec.prometheus import RAY_DISCOVERY_FILE, local_prometheus
from serve_app import SHIPPED_CONFIG

log = logging.getLogger("facerec.local")

#: One machine only: replicas write their log lines 100 at a time (or at once for an error), which saves the
#: request path a file write per request. Not on the cluster, where the controller's decisions and the replicas'
#: warnings must be readable as they happen.
LOCAL_TUNING = {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "100"}

RUN_DIR = Path("run")
PID_FILE = RUN_DIR / "facerec.pid"
CONFIG = SHIPPED_CONFIG


def _listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``.

    A connect, not a bind: after a load run the previous service's sockets sit in TIME_WAIT for about a minute,
    which makes a plain bind fail although nothing listens; the servers bind with SO_REUSEADDR and start fine.
    """
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


@contextmanager
def moto_server(port: int) -> Iterator[str]:
    """The local stand-in for S3/SQS. Its credentials are placeholders: moto accepts any."""
    server = Path(sys.executable).with_name("moto_server")
    RUN_DIR.mkdir(exist_ok=True)
    with (RUN_DIR / "moto.log").open("ab") as output:
        process = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=output, stderr=output)
    try:
        _wait_for_port(port, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def local_aws_environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "moto-local",
        "AWS_SECRET_ACCESS_KEY": "moto-local",
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    }


def _discovery_file() -> Path:
    """This Ray session's list of metrics endpoints (the /tmp/ray link follows whichever session started last)."""
    import ray

    node = ray._private.worker._global_node
    session = Path(node.get_session_dir_path()) if node is not None else None
    return session / "prom_metrics_service_discovery.json" if session else RAY_DISCOVERY_FILE


def _stop_event() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def run(
    http_port: int,
    dashboard_port: int,
    moto_port: int,
    metrics_port: int,
    queue_mode: bool = False,
    ingress: str | None = None,
    prometheus_port: int = 9090,
) -> int:
    for port in (http_port, dashboard_port, moto_port, metrics_port, prometheus_port):
        if _listening(port):
            log.error("127.0.0.1:%d is in use: is the service already running? (`make stop`)", port)
            return 1
    RUN_DIR.mkdir(exist_ok=True)
    PID_FILE.write_text(str(os.getpid()))
    try:
        with moto_server(moto_port) as endpoint:
            os.environ.update(local_aws_environment(endpoint))
            from aws_stack.clients import AwsClients
            from aws_stack.stack import StackConfig, provision

            stack = StackConfig(endpoint=endpoint, region=os.environ["AWS_DEFAULT_REGION"])
            provision(stack, AwsClients.for_stack(stack))
            stack.save_local()  # `facerec aws status` finds the local stack through this file
            # Loopback only: this keeps GCS, raylet and dashboard on 127.0.0.1 (see the README).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            # A local, loopback-only dashboard: no token, so the browser link just works.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # The Serve settings every cluster node starts with too (the worker proxy port has no effect here).
            for name, value in {**serve_tuning(), **LOCAL_TUNING}.items():
                os.environ.setdefault(name, value)
            # The dashboard reads it when it starts: its Metrics tab and charts query this Prometheus.
            os.environ["RAY_PROMETHEUS_HOST"] = f"http://127.0.0.1:{prometheus_port}"
            import ray
            from ray import serve

            from serve_app.app import AppArgs, build_app
            from sqs_bridge.deployment import build_bridge

            # Every Ray process of this local head inherits this environment (AWS_* for the moto server, any
            # FACEREC_*). Not through a runtime_env: Ray's runtime-env agent logs those values, FACEREC_API_KEY too.
            ray.init(
                address="local",
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,
                _node_ip_address="127.0.0.1",
                _metrics_export_port=metrics_port,
            )
            # After ray.init: Ray installs its own SIGTERM handler there, which would abort instead of stopping.
            stop = _stop_event()
            with contextlib.ExitStack() as running:
                running.callback(ray.shutdown)
                running.callback(serve.shutdown)
                prometheus_url = running.enter_context(
                    local_prometheus(prometheus_port, RUN_DIR / "prometheus", _discovery_file())
                )
                serve.start(http_options={"host": "127.0.0.1", "port": http_port})
                args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
                args["gallery_uri"] = stack.gallery_uri
                if queue_mode:  # POST / through the local S3 + SQS and the bridge, as the cluster's web tier
                    args.update(queue_mode=True, stack=stack.model_dump())
                if ingress is not None:
                    args["ingress"] = ingress
                serve.run(build_app(AppArgs.model_validate(args)), name="facerec", route_prefix="/")
                serve.run(build_bridge({"stack": stack.model_dump()}), name="bridge", route_prefix=None)
                api = f"http://127.0.0.1:{http_port}"
                legacy = "legacy POST / through S3 + SQS" if queue_mode else "legacy POST /"
                graphs = (
                    f"  Prometheus {prometheus_url}   (the dashboard's Metrics tab queries it; `facerec monitor` plots)"
                    if prometheus_url
                    else "  Prometheus not installed (`make prometheus`): no metrics graphs"
                )
                print(
                    "\nfacerec is running (Ctrl-C or `make stop` to stop):\n"
                    f"  console    {api}/   (open it in a browser)\n"
                    f"  API        {api}/   ({legacy}, JSON API under /v1)\n"
                    f"  API docs   {api}/docs\n"
                    f"  health     {api}/healthz\n"
                    f"  dashboard  http://127.0.0.1:{dashboard_port}\n"
                    f"  metrics    http://127.0.0.1:{metrics_port}/metrics   (grep facerec_)\n"
                    f"{graphs}\n"
                    f"  local AWS  {endpoint}   (moto S3 + SQS; `facerec aws status` shows the queues)\n"
                    f"  queues     requests {stack.request_queue}, responses {stack.response_queue}, "
                    f"dead letters {stack.dead_letter_queue}\n"
                    f"  buckets    in {stack.in_bucket}, out {stack.out_bucket}, gallery {stack.gallery_uri}\n"
                    f"{access_line(stack.gallery_uri)}\n",
                    flush=True,
                )
                stop.wait()
    finally:
        PID_FILE.unlink(missing_ok=True)
        (RUN_DIR / "aws.json").unlink(missing_ok=True)
    return 0


def access_line(gallery_uri: str) -> str:
    """The banner's word on API keys: open on loopback until one is made, and how to make one."""
    from serve_app.access.keys import KeyRing
    from serve_app.gallery_store import open_gallery_store

    if os.environ.get("FACEREC_API_KEY") or KeyRing(open_gallery_store(gallery_uri)).records():
        return "  access     API keys required on every route but /healthz (`facerec keys list`)"
    return (
        "  access     OPEN: no API key exists, so anyone who can reach 127.0.0.1 may use every route;\n"
        f"             make one: facerec keys create --gallery {gallery_uri} --name me --scope manage"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--moto-port", type=int, default=5000)
    parser.add_argument("--metrics-port", type=int, default=8080)
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument(
        "--queue-mode",
        action="store_true",
        help="legacy web tier: POST / uploads to the input bucket and waits for the bridge's answer on the queues",
    )
    parser.add_argument(
        "--ingress",
        choices=["separate", "in_recognizer"],
        help="where the HTTP routes run (default: serve_app/config.yaml's `ingress`; see the README)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(
        run(
            args.http_port,
            args.dashboard_port,
            args.moto_port,
            args.metrics_port,
            args.queue_mode,
            args.ingress,
            args.prometheus_port,
        )
    )


if __name__ == "__main__":
    main()
