"""The Serve config and application arguments: validated before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from serve_app.app import OTHER_DEPLOYMENTS_CPUS, AppArgs, RecognizerScaling, build_app, size_recognizer

CONFIG = Path(__file__).resolve().parents[1] / "serve_app" / "config.yaml"


def test_config_yaml_is_a_valid_serve_config_with_valid_args() -> None:
    document = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(document)
    (application,) = schema.applications
    assert application.import_path == "serve_app.app:build_app"
    assert {d.name for d in application.deployments} == {"Recognizer", "GalleryWriter", "Ingress"}
    args = AppArgs.model_validate(application.args)
    assert args.recognition.checkpoint == "facenet-keras-128"
    assert schema.http_options.host == "127.0.0.1"


def test_bad_arguments_fail_before_deploying() -> None:
    """`serve deploy` hands the config's args to build_app through Serve's builder call, which validates them
    into AppArgs from build_app's annotation: a bad value fails there, before anything is deployed."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    def serve_builds(builder: object, args: dict[str, Any]) -> Application:
        return call_user_app_builder_with_args_if_necessary(builder, args)  # type: ignore[arg-type]

    with pytest.raises(ValidationError):
        serve_builds(build_app, {"max_batch_size": 0})
    with pytest.raises(ValidationError):
        serve_builds(build_app, {"recognizer": {"num_cpus": -1}})
    with pytest.raises(ValueError, match="unknown checkpoint"):
        serve_builds(build_app, {"recognition": {"checkpoint": "no-such-model"}})
    built = serve_builds(build_app, {"max_batch_size": 8})
    assert built._bound_deployment.name == "Ingress"
    with pytest.raises(ValidationError):
        serve_builds(build_app, {"ingress": "elsewhere"})


def test_replica_threads_follow_the_cpu_share() -> None:
    app = build_app(AppArgs.model_validate({"recognizer": {"num_cpus": 3.0}}))
    recognizer = app._bound_deployment.init_args[0]._bound_deployment  # Ingress(recognizer, writer, ...)
    assert recognizer.ray_actor_options["num_cpus"] == 3.0
    assert recognizer.init_args[0].torch_threads == 3
    serving = build_app(AppArgs.model_validate({"recognizer": {"num_cpus": 3.0}, "ingress": "in_recognizer"}))
    recognizer = serving._bound_deployment  # Recognizer(options, writer, ...), serving HTTP itself
    assert (recognizer.ray_actor_options or {})["num_cpus"] == 3.0
    assert recognizer.init_args[0].torch_threads == 3


def test_the_routes_run_in_the_recognizer_only_where_nothing_needs_the_ingress_apart() -> None:
    def top(args: dict[str, Any]) -> str:
        return str(build_app(AppArgs.model_validate(args))._bound_deployment.name)

    stack = {"endpoint": "http://127.0.0.1:1", "region": "us-east-1"}
    assert top({}) == "Ingress"
    assert top({"ingress": "in_recognizer"}) == "Recognizer"
    # Queue mode talks to the queues; the queue-depth controller may scale the Recognizer to zero and reads the
    # ingress's in-flight count: both need the ingress apart.
    for apart in (
        {"queue_mode": True, "stack": stack},
        {"recognizer": {"external_scaler": True}},
        {"controller_app": "controller"},
    ):
        assert top(apart) == "Ingress"
        with pytest.raises(ValueError, match="in_recognizer"):
            top({**apart, "ingress": "in_recognizer"})


def test_the_shipped_config_sizes_the_recognizer_from_the_machine() -> None:
    # `make run` ships `auto`: one single-threaded replica per core, the cores the other deployments leave
    # shared among them, so a 2-core machine runs the model on both cores.
    args = AppArgs.model_validate(yaml.safe_load(CONFIG.read_text())["applications"][0]["args"])
    for cores in (1, 2, 4, 16):
        size = size_recognizer(args.recognizer, args.recognition.torch_threads, cores)
        assert (size.min_replicas, size.max_replicas, size.torch_threads) == (cores, cores, 1)
        assert size.num_cpus * size.min_replicas + OTHER_DEPLOYMENTS_CPUS <= cores + 1e-9 or cores == 1
        assert size.num_cpus > 0


def test_auto_sizing_follows_explicit_threads_and_cpus() -> None:
    two_threads = size_recognizer(RecognizerScaling(), 2, cores=8)
    assert (two_threads.min_replicas, two_threads.torch_threads) == (4, 2)
    fixed = size_recognizer(RecognizerScaling(num_cpus=4.0, min_replicas=0, max_replicas=16), None, cores=2)
    assert (fixed.min_replicas, fixed.max_replicas, fixed.num_cpus, fixed.torch_threads) == (0, 16, 4.0, 4)
    gpu = size_recognizer(RecognizerScaling(num_gpus=1.0), None, cores=8)
    assert gpu.min_replicas == 1


def test_build_app_uses_the_machine_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("serve_app.app.machine_cores", lambda: 2)
    app = build_app(AppArgs.model_validate(yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]))
    recognizer = app._bound_deployment.init_args[0]._bound_deployment
    # min = max: a fixed count, no autoscaling for Serve's controller to run.
    assert recognizer._deployment_config.num_replicas == 2
    assert recognizer._deployment_config.autoscaling_config is None
    assert recognizer.ray_actor_options["num_cpus"] == pytest.approx((2 - OTHER_DEPLOYMENTS_CPUS) / 2)
    assert recognizer.init_args[0].torch_threads == 1  # per replica
