"""cluster.yaml: Ray's own validation, the IAM policies, and `ray up` / `ray down` against a moto server.

`ray up` runs for real against moto's EC2 and IAM (through AWS_ENDPOINT_URL). moto's instances have fake
addresses that nothing may connect to, so `ssh` and `rsync` are stand-in scripts first on PATH that only record
their arguments, and HOME is a temporary directory (the launcher writes its key there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from aws_stack.stack import StackConfig
from cluster.deploy import render_serve_config, stack_from_bootstrap
from cluster.iam import ensure_instance_profiles, render_policy
from tests.stand_in_ssh import stand_in_ssh

pytestmark = pytest.mark.cluster
__all__ = ["stand_in_ssh"]  # the fixture, used by name

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
RAY = Path(sys.executable).with_name("ray")


def load_cluster_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(CLUSTER_YAML.read_text())
    return config


def test_cluster_yaml_passes_rays_validation() -> None:
    config = prepare_config(load_cluster_config())
    validate_config(config)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert "recognizer" not in types["head"]["resources"]
    for worker in ("cpu_worker", "gpu_worker"):
        assert types[worker]["min_workers"] == 0
        assert 0 < types[worker]["max_workers"] <= config["max_workers"]
        assert types[worker]["resources"]["recognizer"] == 1
        assert types[worker]["node_config"]["IamInstanceProfile"] == {"Name": "facerec-worker"}
    assert types["gpu_worker"]["resources"]["GPU"] == 1
    assert types["head"]["node_config"]["IamInstanceProfile"] == {"Name": "facerec-head"}
    assert config["idle_timeout_minutes"] > 0
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "facerec cluster deploy" in start
    # Every node's Ray runs with the Serve settings `make run` uses (one file, sourced before `ray start`).
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        ray_start = next(c for c in commands if "ray start" in c)
        assert ray_start.index(". ~/facerec/cluster/serve_tuning.env") < ray_start.index("ray start")


def test_iam_policies_name_only_this_projects_resources() -> None:
    names = {"prefix": "demo", "region": "eu-west-1", "account": "123456789012", "cluster_name": "demo"}
    head = render_policy("head", **names)
    worker = render_policy("worker", **names)
    for document in (head, worker):
        for statement in document["Statement"]:
            actions = _as_list(statement["Action"])
            assert all("*" not in action for action in actions), statement
            if any(action.startswith(("s3:", "sqs:")) for action in actions):
                assert all(":demo-" in r or ":::demo-" in r for r in _as_list(statement["Resource"])), statement
    head_actions = {action for s in head["Statement"] for action in _as_list(s["Action"])}
    assert "iam:PassRole" in head_actions and "ec2:TerminateInstances" in head_actions
    # The controller changes only this cluster's target groups (reading target health takes no resource scope).
    retarget = {"elasticloadbalancing:RegisterTargets", "elasticloadbalancing:DeregisterTargets"}
    scoped = {r for s in head["Statement"] if retarget & set(_as_list(s["Action"])) for r in _as_list(s["Resource"])}
    assert scoped == {"arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/demo-*/*"}
    terminate = next(s for s in head["Statement"] if "ec2:TerminateInstances" in s["Action"])
    assert terminate["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": "demo"}}
    # A worker reads the gallery and the inputs, consumes the request queue, writes results and answers: nothing
    # else (no writes to the gallery or the inputs, no sending requests, nothing outside S3 and SQS).
    grants = {
        (action, resource)
        for s in worker["Statement"]
        for action in _as_list(s["Action"])
        for resource in _as_list(s["Resource"])
    }
    assert {action for action, _ in grants} == {
        "s3:GetObject",
        "s3:GetObjectVersion",
        "s3:ListBucket",
        "s3:PutObject",
        "sqs:GetQueueUrl",
        "sqs:GetQueueAttributes",
        "sqs:ReceiveMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:DeleteMessage",
        "sqs:SendMessage",
    }
    assert {r for a, r in grants if a == "s3:PutObject"} == {"arn:aws:s3:::demo-output/*"}
    assert {r for a, r in grants if a == "sqs:SendMessage"} == {"arn:aws:sqs:eu-west-1:123456789012:demo-responses"}
    consume = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"}
    assert {r for a, r in grants if a in consume} == {"arn:aws:sqs:eu-west-1:123456789012:demo-requests"}


def _as_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def test_serve_config_for_the_cluster_is_valid_and_named_from_one_place(tmp_path: Path) -> None:
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(yaml.safe_dump({"cluster_name": "faces-prod", "provider": {"region": "eu-west-1"}}))
    stack = stack_from_bootstrap(bootstrap)
    assert stack == StackConfig(prefix="faces-prod", region="eu-west-1")
    config = render_serve_config(stack)
    apps = {app["name"]: app for app in config["applications"]}
    assert set(apps) == {"facerec", "bridge", "controller"}
    assert apps["facerec"]["external_scaler_enabled"] is True
    assert apps["facerec"]["args"]["gallery_uri"] == "s3://faces-prod-gallery/gallery"
    for app in apps.values():
        assert app["args"]["stack"]["prefix"] == "faces-prod" and app["args"]["stack"]["region"] == "eu-west-1"
    # Per-image work runs on the workers: each such deployment needs a resource that every worker type offers
    # once, and the controller keeps one replica of it per worker node. The SQS consumer's resource is the
    # workers' alone; the ingress's is offered once by the head too, for its one standby replica. The rest is
    # control, pinned to the head.
    node_types = yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]
    head = node_types.pop("head")["resources"]
    per_node = {(d["app"], d["deployment"]): d.get("plus", 0) for d in apps["controller"]["args"]["per_node"]}
    assert per_node == {("bridge", "SqsBridge"): 0, ("facerec", "Ingress"): 1}
    assert apps["bridge"]["external_scaler_enabled"] is True
    assert config["proxy_location"] == "EveryNode"
    for name, app in apps.items():
        for deployment in app.get("deployments", []):
            resources = deployment["ray_actor_options"]["resources"]
            plus = per_node.get((name, deployment["name"]))
            if plus is None:
                assert resources == {"node:__internal_head__": 0.001}, deployment
                continue
            assert resources and all(amount == 1 for amount in resources.values()), deployment
            for worker in node_types.values():
                assert all(worker["resources"].get(r) == 1 for r in resources), worker
            assert all(head.get(r, 0) == plus for r in resources), (deployment, head)


def _ray_cli(args: list[str], env: dict[str, str]) -> None:
    """The `ray` cluster launcher from the repository root; fails the test with its output if it fails."""
    run = subprocess.run([str(RAY), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_ray_up_and_down_against_moto(moto_endpoint: str, stand_in_ssh: tuple[Path, Path], tmp_path: Path) -> None:
    bin_dir, calls = stand_in_ssh
    home = tmp_path / "home"
    home.mkdir()
    iam = boto3.client("iam", endpoint_url=moto_endpoint)
    arns = ensure_instance_profiles(
        iam, prefix="facerec", region="us-east-1", account="123456789012", cluster_name="facerec"
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "AWS_ENDPOINT_URL": moto_endpoint,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    _ray_cli(["up", str(CLUSTER_YAML), "--yes", "--no-config-cache", "--disable-usage-stats"], env)

    ec2 = boto3.client("ec2", endpoint_url=moto_endpoint)
    reservations = ec2.describe_instances(Filters=[{"Name": "tag:ray-cluster-name", "Values": ["facerec"]}])
    instances = [i for r in reservations["Reservations"] for i in r["Instances"] if i["State"]["Name"] == "running"]
    assert len(instances) == 1
    head = instances[0]
    tags = {t["Key"]: t["Value"] for t in head["Tags"]}
    assert head["InstanceType"] == "m6i.large"
    assert tags["ray-node-type"] == "head" and tags["ray-user-node-type"] == "head"
    assert head["IamInstanceProfile"]["Arn"] == arns["head"]

    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    commands = " ".join(" ".join(call["args"]) for call in recorded if call["tool"] == "ssh")
    assert "make install" in commands
    assert "uv==0.13.8" in commands
    assert "ray start --head" in commands and "--dashboard-host=127.0.0.1" in commands
    assert "facerec cluster deploy" in commands
    # The head's monitoring: Prometheus installed, the dashboard pointed at it, started on localhost.
    assert "apt-get install" in commands and "prometheus" in commands
    assert "RAY_PROMETHEUS_HOST=http://127.0.0.1:9090" in commands and "facerec monitoring start" in commands
    assert any(call["tool"] == "rsync" for call in recorded), "the checkout was not copied to the head"

    _ray_cli(["down", str(CLUSTER_YAML), "--yes"], env)
    state = ec2.describe_instances(InstanceIds=[head["InstanceId"]])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] in ("shutting-down", "terminated")
