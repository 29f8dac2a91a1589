"""The Serve config and application arguments: validated before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app.app import AppArgs, build_app

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
    with pytest.raises(ValidationError):
        build_app({"max_batch_size": 0})
    with pytest.raises(ValidationError):
        build_app({"recognizer": {"num_cpus": -1}})
    with pytest.raises(ValueError, match="unknown checkpoint"):
        build_app({"recognition": {"checkpoint": "no-such-model"}})


def test_replica_threads_follow_the_cpu_share() -> None:
    app = build_app({"recognizer": {"num_cpus": 3.0}})
    recognizer = app._bound_deployment.init_args[0]  # Ingress(recognizer, writer, ...)
    assert recognizer._bound_deployment.ray_actor_options["num_cpus"] == 3.0
    assert recognizer._bound_deployment.init_args[-1] == 3  # torch threads
