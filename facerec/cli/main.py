"""``facerec``: enrol, recognise, verify and evaluate from the command line (no Ray needed)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from serve_app.settings import RecognitionSettings

log = logging.getLogger("facerec")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (defaults from FACEREC_* environment variables)")
    group.add_argument("--checkpoint", help="embedder: facenet-keras-128 (default), casia-webface-512, or a .pt file")
    group.add_argument("--flip", action="store_true", default=None, help="average with the mirrored face")
    group.add_argument("--threshold", type=float, help="cosine similarity for a match (default: the checkpoint's)")
    group.add_argument("--threads", type=int, dest="torch_threads", help="torch threads")


def _settings(args: argparse.Namespace) -> RecognitionSettings:
    overrides = {
        key: getattr(args, key)
        for key in ("checkpoint", "flip", "threshold", "torch_threads")
        if getattr(args, key, None) is not None
    }
    return RecognitionSettings(**overrides)


# One handler per command, registered with its parser (``set_defaults(run=...)``): the parser is the one list of
# commands. Each imports what it needs when it runs, so that `facerec --help` and `weights fetch` never load torch.
def _weights_fetch(args: argparse.Namespace) -> int:
    from serve_app.model.weights.files import fetch_keras_h5

    print(fetch_keras_h5(force=args.force))
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from facerec.cli import commands

    return commands.enroll(_settings(args), args.gallery, args.photos_dir)


def _recognize(args: argparse.Namespace) -> int:
    from facerec.cli import commands

    return commands.recognize(_settings(args), args.gallery, args.images, args.top_k)


def _verify(args: argparse.Namespace) -> int:
    from facerec.cli import commands

    return commands.verify(_settings(args), args.image_a, args.image_b)


def _gallery_show(args: argparse.Namespace) -> int:
    from facerec.cli import gallery_commands

    return gallery_commands.show(args.gallery, args.model, args.chips)


def _gallery_reembed(args: argparse.Namespace) -> int:
    from facerec.cli import gallery_commands

    if args.checkpoint is None:
        log.error("reembed needs --checkpoint: the checkpoint to embed the faces with")
        return 2
    return gallery_commands.reembed(_settings(args), args.gallery, args.source)


def _gallery_drop(args: argparse.Namespace) -> int:
    from facerec.cli import gallery_commands

    return gallery_commands.drop(args.gallery, args.model)


def _keys(args: argparse.Namespace) -> int:
    from facerec.cli import keys_commands

    if args.keys_command == "create":
        return keys_commands.create(args.gallery, args.name, args.scope)
    if args.keys_command == "revoke":
        return keys_commands.revoke(args.gallery, args.key)
    return keys_commands.list_keys(args.gallery)


def _audit(args: argparse.Namespace) -> int:
    from facerec.cli import audit_commands

    return audit_commands.audit(args.gallery, args.person, args.key, args.since, args.until, args.action)


def _gallery_import_legacy(args: argparse.Namespace) -> int:
    from facerec.cli import commands

    return commands.import_legacy(args.data_pt, args.gallery, args.model_id)


def _aws(args: argparse.Namespace) -> int:
    from facerec.cli import aws_commands

    return aws_commands.run(args)


def _cluster_deploy(args: argparse.Namespace) -> int:
    from facerec.cli import cluster_commands

    return cluster_commands.deploy_command(args)


def _cluster_bake(args: argparse.Namespace) -> int:
    from facerec.cli import cluster_commands

    return cluster_commands.bake_command(args)


def _cluster_config(args: argparse.Namespace) -> int:
    from facerec.cli import cluster_commands

    return cluster_commands.config_command(args)


def _sim_autoscale(args: argparse.Namespace) -> int:
    from facerec.cli.sim_commands import autoscale

    return autoscale(args)


def _sim_capacity(args: argparse.Namespace) -> int:
    from cluster.capacity import table

    print(table(args.results, args.workers, args.worker_vcpus, args.head_vcpus))
    return 0


def _monitor(args: argparse.Namespace) -> int:
    from facerec.cli import monitor_commands

    if args.grafana is not None:
        return monitor_commands.write_grafana(args.grafana)
    return monitor_commands.plot(args.prometheus, args.minutes, args.out)


def _monitoring_start(args: argparse.Namespace) -> int:
    from facerec.cli import monitoring_commands

    return monitoring_commands.start(args.prometheus_port, args.grafana_port, args.dir)


def _eval_lfw(args: argparse.Namespace) -> int:
    from facerec.cli import commands

    return commands.eval_lfw(
        _settings(args),
        pairs=args.pairs,
        images=args.images,
        calibrate=args.calibrate,
        plot=args.plot,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )


def _eval_identify(args: argparse.Namespace) -> int:
    from facerec.cli import commands

    return commands.eval_identify(
        _settings(args),
        images=args.images,
        seed=args.seed,
        gallery_photos=args.gallery_photos,
        min_photos=args.min_photos,
        strangers_fraction=args.strangers_fraction,
        people_from=args.people_from,
        calibration=args.calibration,
        plot=args.plot,
        embeddings_cache=args.embeddings_cache,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )


def _calibrate_far(args: argparse.Namespace) -> int:
    from facerec.cli import commands

    return commands.calibrate_far(
        _settings(args),
        images=args.images,
        pairs=args.pairs,
        out=args.out,
        embeddings_cache=args.embeddings_cache,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facerec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    commands = parser.add_subparsers(dest="command", required=True)

    weights = commands.add_parser("weights", help="manage pretrained weight files")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    fetch = weights_commands.add_parser("fetch", help="download and verify the Keras FaceNet weights (idempotent)")
    fetch.add_argument("--force", action="store_true", help="download again even if a verified copy exists")
    fetch.set_defaults(run=_weights_fetch)

    enroll = commands.add_parser("enroll", help="enrol people from PHOTOS_DIR/<person>/*.jpg")
    enroll.add_argument("--gallery", type=Path, required=True, help="gallery directory (created if missing)")
    enroll.add_argument("photos_dir", type=Path)
    _add_model_options(enroll)
    enroll.set_defaults(run=_enroll)

    recognize = commands.add_parser("recognize", help="one JSON line per image: every face and who it is")
    recognize.add_argument("--gallery", type=Path, required=True)
    recognize.add_argument("--top-k", type=int, default=3)
    recognize.add_argument("images", type=Path, nargs="+")
    _add_model_options(recognize)
    recognize.set_defaults(run=_recognize)

    verify = commands.add_parser("verify", help="are the main faces of two photos the same person?")
    verify.add_argument("image_a", type=Path)
    verify.add_argument("image_b", type=Path)
    _add_model_options(verify)
    verify.set_defaults(run=_verify)

    gallery = commands.add_parser("gallery", help="inspect or convert galleries")
    gallery_commands = gallery.add_subparsers(dest="gallery_command", required=True)
    show = gallery_commands.add_parser(
        "show", help="the snapshots (one per model), people and face counts; --chips exports the face chips"
    )
    show.add_argument("--gallery", required=True, help="a gallery directory, or s3://bucket/prefix")
    show.add_argument("--model", help="the snapshot to detail (needed when the store has several)")
    show.add_argument("--chips", type=Path, help="write each face's chip to DIR/<person>/<face id>.jpg")
    show.set_defaults(run=_gallery_show)
    reembed = gallery_commands.add_parser(
        "reembed", help="embed every face again with --checkpoint (same face ids), beside the current snapshot"
    )
    reembed.add_argument("--gallery", required=True, help="a gallery directory, or s3://bucket/prefix")
    reembed.add_argument("--from", dest="source", help="the model id to re-embed from (needed if several)")
    _add_model_options(reembed)
    reembed.set_defaults(run=_gallery_reembed)
    drop = gallery_commands.add_parser("drop", help="delete one model's snapshot once a model change is confirmed")
    drop.add_argument("--gallery", required=True, help="a gallery directory, or s3://bucket/prefix")
    drop.add_argument("--model", required=True, help="the model id whose snapshot to delete")
    drop.set_defaults(run=_gallery_drop)
    legacy = gallery_commands.add_parser("import-legacy", help="import the legacy app tier's data.pt")
    legacy.add_argument("data_pt", type=Path)
    legacy.add_argument("--gallery", type=Path, required=True)
    legacy.add_argument(
        "--model-id", required=True, help="the checkpoint that made the embeddings; they only match that one"
    )
    legacy.set_defaults(run=_gallery_import_legacy)

    keys = commands.add_parser("keys", help="API keys with scopes, kept (hashed) beside a gallery")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="make a key (printed once) with one or more scopes")
    create.add_argument("--name", required=True, help="who or what the key is for (shown in lists and logs)")
    create.add_argument("--scope", action="append", required=True, choices=("recognize", "manage"))
    revoke = keys_commands.add_parser("revoke", help="revoke a key by its id or name")
    revoke.add_argument("key", metavar="ID_OR_NAME")
    listed = keys_commands.add_parser("list", help="every key's name, scopes and dates (never a key)")
    for sub in (create, revoke, listed):
        sub.add_argument("--gallery", required=True, help="the gallery store: DIR or s3://bucket/prefix")
        sub.set_defaults(run=_keys)

    audit = commands.add_parser(
        "audit", help="the audit trail: who read or changed the gallery, and every refused key (JSON lines)"
    )
    audit.add_argument("--gallery", required=True, help="the gallery store: DIR or s3://bucket/prefix")
    audit.add_argument("--person", help="only events about this person")
    audit.add_argument("--key", help="only events of this key (its name or id)")
    audit.add_argument("--since", help="from this time: ISO 8601 (UTC unless it says) or a time ago (15m, 2h, 7d)")
    audit.add_argument("--until", help="up to this time (same forms as --since)")
    audit.add_argument("--action", help="only these actions, by prefix: chip.read, person., key.refused, ...")
    audit.set_defaults(run=_audit)

    aws = commands.add_parser("aws", help="the S3 buckets and SQS queues of the queue contract")
    aws_commands = aws.add_subparsers(dest="aws_command", required=True)
    for name, text in (
        ("provision", "create buckets and queues (idempotent)"),
        ("status", "counts per queue/bucket"),
        ("iam", "create the cluster's head and worker roles and instance profiles (idempotent)"),
    ):
        sub = aws_commands.add_parser(name, help=text)
        sub.set_defaults(run=_aws)
        sub.add_argument("--prefix", help="resource name prefix (default facerec, or the local stack's)")
        sub.add_argument("--region", help="AWS region (default us-east-1, or the local stack's)")
        sub.add_argument("--endpoint", help="S3/SQS endpoint URL (default: AWS, or the local moto server)")
        if name == "provision":
            sub.add_argument("--max-receive-count", type=int, help="deliveries before the dead-letter queue")
            sub.add_argument(
                "--upload-retention-days", type=int, help="keep photos sent through the queues this long (S3 expiry)"
            )
            sub.add_argument(
                "--answer-retention-days", type=int, help="keep the answers in the output bucket this long"
            )
        elif name == "iam":
            sub.add_argument("--cluster-name", help="cluster_name in cluster.yaml (default: the prefix)")
        else:
            sub.add_argument("--json", action="store_true", help="one JSON object (for scripts)")

    cluster = commands.add_parser("cluster", help="the Ray cluster on AWS (run on its head by cluster.yaml)")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True)
    deploy = cluster_commands.add_parser(
        "deploy", help="deploy cluster/serve_config.yaml with the names from the cluster's bootstrap config"
    )
    deploy.add_argument("--bootstrap", type=Path, help="default ~/ray_bootstrap_config.yaml (written by ray up)")
    deploy.add_argument("--address", default="http://127.0.0.1:8265", help="the head's dashboard")
    deploy.add_argument("--print", action="store_true", help="print the rendered Serve config; deploy nothing")
    deploy.set_defaults(run=_cluster_deploy)
    bake = cluster_commands.add_parser(
        "bake", help="build a node image (AMI) with the setup done, so new nodes start without installing"
    )
    bake.add_argument("--cluster-yaml", type=Path, default=Path("cluster.yaml"))
    bake.add_argument("--node-type", default="cpu_worker", help="whose node_config to build from")
    bake.add_argument("--region", help="default: the cluster's provider.region")
    bake.add_argument("--instance-type", help="the builder's instance type (default: the node type's)")
    bake.add_argument("--name", help="the image's name (default: <cluster>-<node type>-<UTC time>)")
    bake.set_defaults(run=_cluster_bake)
    config = cluster_commands.add_parser(
        "config", help="write the cluster config with a baked image for every node type (for ray up)"
    )
    config.add_argument("--image", required=True, help="the AMI id printed by facerec cluster bake")
    config.add_argument("--cluster-yaml", type=Path, default=Path("cluster.yaml"))
    config.add_argument("--out", type=Path, default=Path("cluster.baked.yaml"))
    config.set_defaults(run=_cluster_config)

    sim = commands.add_parser("sim", help="simulate scaling rules on arrival traces")
    sim_commands = sim.add_subparsers(dest="sim_command", required=True)
    autoscale = sim_commands.add_parser("autoscale", help="our policy vs the original controller on one trace")
    autoscale.add_argument("--trace", choices=["burst", "day"], default="burst")
    autoscale.add_argument("--images", type=int, default=10_000, help="images in the trace")
    autoscale.add_argument("--horizon-s", type=int, default=3600, help="simulated seconds")
    autoscale.add_argument("--service-time-s", type=float, default=0.1, help="seconds per image per replica")
    autoscale.add_argument("--latency-target-s", type=float, default=30.0)
    startup = autoscale.add_mutually_exclusive_group()
    startup.add_argument(
        "--startup-profile",
        type=Path,
        help="YAML/JSON of a worker's start-up phases (default cluster/startup/unbaked.yaml; baked.yaml beside it)",
    )
    startup.add_argument("--startup-s", type=float, help="one fixed start-up delay instead (idle nodes never reused)")
    autoscale.add_argument("--idle-timeout-s", type=float, default=60.0, help="Ray's idle timeout for workers")
    autoscale.add_argument("--scale-down-after-s", type=float, default=60.0, help="the policy's cool-down")
    autoscale.add_argument("--start-hour", type=float, default=0.0, help="hour of the day at second 0 (burst)")
    autoscale.add_argument(
        "--warm-hours", type=float, nargs=2, metavar=("START", "END"), help="keep a warm worker in these UTC hours"
    )
    autoscale.add_argument("--trend-lookahead-s", type=float, default=0.0, help="scale on demand's growth (0: off)")
    autoscale.add_argument("--max-nodes", type=int, default=19)
    autoscale.add_argument("--plot", type=Path, help="write backlog / nodes / latency to this PNG")
    autoscale.set_defaults(run=_sim_autoscale)
    capacity = sim_commands.add_parser(
        "capacity", help="the cluster's images/s by worker count, from measured costs and AWS's published limits"
    )
    capacity.add_argument(
        "--results",
        type=Path,
        default=Path("bench/results/cluster_cpu.after.json"),
        help="a bench/cluster_cpu.py result (CPU per image by node)",
    )
    capacity.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16, 64])
    capacity.add_argument("--worker-vcpus", type=float, default=4.0, help="cluster.yaml's cpu_worker: c6i.xlarge")
    capacity.add_argument("--head-vcpus", type=float, default=2.0, help="cluster.yaml's head: m6i.large")
    capacity.set_defaults(run=_sim_capacity)

    monitor = commands.add_parser("monitor", help="the service's metrics panels as a PNG, from Prometheus")
    monitor.add_argument("--prometheus", default="http://127.0.0.1:9090", help="the Prometheus to query")
    monitor.add_argument("--minutes", type=float, default=30.0, help="how far back")
    monitor.add_argument("--out", type=Path, default=Path("run/monitor.png"))
    monitor.add_argument(
        "--grafana", type=Path, metavar="JSON", help="write the Grafana dashboard of the same panels here instead"
    )
    monitor.set_defaults(run=_monitor)

    monitoring = commands.add_parser("monitoring", help="Prometheus (and Grafana) on the cluster's head")
    monitoring_commands = monitoring.add_subparsers(dest="monitoring_command", required=True)
    start = monitoring_commands.add_parser("start", help="start them in the background (cluster.yaml runs this)")
    start.add_argument("--prometheus-port", type=int, default=9090)
    start.add_argument("--grafana-port", type=int, default=3000)
    start.add_argument("--dir", type=Path, default=Path("run"), help="their data and logs")
    start.set_defaults(run=_monitoring_start)

    evaluate = commands.add_parser("eval", help="accuracy on standard benchmarks")
    eval_commands = evaluate.add_subparsers(dest="eval_command", required=True)
    lfw = eval_commands.add_parser("lfw", help="LFW verification (View 1 with --calibrate, or 10-fold View 2)")
    lfw.add_argument("--pairs", type=Path, required=True, help="pairs file to report accuracy on")
    lfw.add_argument("--images", type=Path, required=True, help="directory of <Name>/<Name>_NNNN.jpg")
    lfw.add_argument("--calibrate", type=Path, help="View 1 pairs file to choose the threshold on")
    lfw.add_argument("--plot", type=Path, help="write the ROC curve to this PNG")
    lfw.add_argument("--batch-size", type=int, default=32)
    lfw.add_argument("--no-progress", action="store_true")
    _add_model_options(lfw)
    lfw.set_defaults(run=_eval_lfw)

    identify = eval_commands.add_parser(
        "identify", help="open-set identification: rank-1, DIR at FAR, strangers accepted (ISO/IEC 19795 terms)"
    )
    identify.add_argument("--images", type=Path, required=True, help="directory of <Name>/<Name>_NNNN.jpg")
    identify.add_argument("--seed", type=int, default=0, help="seed of the enrolled/probe/stranger split")
    identify.add_argument("--gallery-photos", type=int, default=1, help="photos enrolled per person")
    identify.add_argument("--min-photos", type=int, default=2, help="photos a person needs to be enrolled")
    identify.add_argument(
        "--strangers-fraction", type=float, default=0.1, help="share of enrollable people held out as strangers"
    )
    identify.add_argument("--people-from", type=Path, help="only the people of this LFW pairs file")
    identify.add_argument(
        "--calibration", type=Path, help="impostor calibration (default: the checkpoint's shipped one, if any)"
    )
    identify.add_argument("--plot", type=Path, help="write the DET curve (FAR vs FNIR) to this PNG")
    identify.add_argument("--embeddings-cache", type=Path, help="reuse and extend main-face embeddings in this .npz")
    identify.add_argument("--batch-size", type=int, default=32)
    identify.add_argument("--no-progress", action="store_true")
    _add_model_options(identify)
    identify.set_defaults(run=_eval_identify)

    calibrate = commands.add_parser("calibrate", help="calibrations shipped with each checkpoint")
    calibrate_commands = calibrate.add_subparsers(dest="calibrate_command", required=True)
    far = calibrate_commands.add_parser(
        "far", help="impostor scores of different-person photo pairs, for thresholds set by false-accept rate"
    )
    far.add_argument("--images", type=Path, required=True, help="directory of <Name>/<Name>_NNNN.jpg")
    far.add_argument("--pairs", type=Path, help="use the photos of this LFW pairs file (default: every photo)")
    far.add_argument("--out", type=Path, help="default serve_app/model/calibration/<checkpoint>[+flip].json")
    far.add_argument("--embeddings-cache", type=Path, help="reuse and extend main-face embeddings in this .npz")
    far.add_argument("--batch-size", type=int, default=32)
    far.add_argument("--no-progress", action="store_true")
    _add_model_options(far)
    far.set_defaults(run=_calibrate_far)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
