"""``facerec cluster deploy``: the cluster's Serve config with this deployment's names, deployed on the head.

The names come from Ray's bootstrap config on the head (``~/ray_bootstrap_config.yaml``, written by ``ray up``):
``cluster_name`` is the resource prefix and ``provider.region`` the region, so cluster.yaml is the one place
they are set.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from ray.serve.schema import ServeDeploySchema

from aws_stack.stack import StackConfig

SERVE_CONFIG = Path(__file__).resolve().parent / "serve_config.yaml"
BOOTSTRAP_CONFIG = Path.home() / "ray_bootstrap_config.yaml"


def stack_from_bootstrap(path: Path = BOOTSTRAP_CONFIG) -> StackConfig:
    config = yaml.safe_load(path.read_text())
    return StackConfig(prefix=config["cluster_name"], region=config["provider"]["region"])


def render_serve_config(stack: StackConfig, template: Path = SERVE_CONFIG) -> dict[str, Any]:
    """The Serve config with ``stack`` in every application that takes one, validated by Serve's schema."""
    config: dict[str, Any] = copy.deepcopy(yaml.safe_load(template.read_text()))
    for application in config["applications"]:
        args = application.setdefault("args", {})
        if "stack" in args:
            args["stack"] = {**stack.model_dump(exclude_none=True), **(args["stack"] or {})}
        if "gallery_uri" in args:
            args["gallery_uri"] = stack.gallery_uri
    ServeDeploySchema.model_validate(config)
    return config


def deploy(config: dict[str, Any], dashboard_address: str = "http://127.0.0.1:8265") -> None:
    """``serve deploy`` of ``config`` (the same path as the CLI, so Serve's own checks and messages apply)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    try:
        # The `serve` beside this interpreter: the project's venv, whatever PATH says.
        serve_cli = Path(sys.executable).with_name("serve")
        subprocess.run([str(serve_cli), "deploy", handle.name, "--address", dashboard_address], check=True)
    finally:
        Path(handle.name).unlink(missing_ok=True)
