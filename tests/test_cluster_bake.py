"""`facerec cluster bake` against a moto server, the baked cluster config, and the setup that a baked node re-runs.

The bake goes through Ray's own cluster launcher, as `ray up` does; moto's instances have fake addresses that
nothing may connect to, so `ssh` and `rsync` are stand-ins that record their arguments, and HOME is temporary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.bake import BAKE_TAG, REQUIREMENTS_TAG
from cluster.iam import ensure_instance_profiles
from tests.stand_in_ssh import recorded, stand_in_ssh

pytestmark = pytest.mark.cluster
__all__ = ["stand_in_ssh"]  # the fixture, used by name

REPO = Path(__file__).resolve().parents[1]
FACEREC = Path(sys.executable).with_name("facerec")


def _facerec(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    run = subprocess.run([str(FACEREC), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    document: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return document


def test_bake_builds_an_image_from_the_workers_node_config_and_terminates_the_builder(
    moto_endpoint: str, stand_in_ssh: tuple[Path, Path], tmp_path: Path
) -> None:
    bin_dir, calls = stand_in_ssh
    home = tmp_path / "home"
    home.mkdir()
    iam = boto3.client("iam", endpoint_url=moto_endpoint)
    ensure_instance_profiles(  # the node config names the worker profile: it must exist
        iam, prefix="facerec", region="us-east-1", account="123456789012", cluster_name="facerec"
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "AWS_ENDPOINT_URL": moto_endpoint,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    baked = _facerec(["cluster", "bake", "--region", "us-east-1", "--name", "facerec-test-image"], env)

    ec2 = boto3.client("ec2", endpoint_url=moto_endpoint, region_name="us-east-1")
    (image,) = ec2.describe_images(ImageIds=[baked["image_id"]])["Images"]
    image_tags = {t["Key"]: t["Value"] for t in image.get("Tags", [])}
    assert image["State"] == "available" and image["Name"] == "facerec-test-image"
    assert image_tags[BAKE_TAG] == "facerec-test-image" and len(image_tags[REQUIREMENTS_TAG]) == 64

    found = ec2.describe_instances(Filters=[{"Name": f"tag:{BAKE_TAG}", "Values": ["facerec-test-image"]}])
    (builder,) = [i for r in found["Reservations"] for i in r["Instances"]]
    tags = {t["Key"]: t["Value"] for t in builder["Tags"]}
    # The worker's node config, on demand, in a throwaway cluster of its own name, and terminated at the end.
    worker = yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]["cpu_worker"]
    assert builder["InstanceType"] == worker["node_config"]["InstanceType"]
    assert "InstanceLifecycle" not in builder  # not spot
    # The launcher's security group for the throwaway cluster went with the builder.
    groups = ec2.describe_security_groups()["SecurityGroups"]
    assert not [g for g in groups if g["GroupName"].startswith(f"ray-autoscaler-{tags['ray-cluster-name']}")]
    assert tags["ray-cluster-name"].startswith("facerec-bake-") and tags["ray-cluster-name"] != "facerec"
    assert builder["State"]["Name"] == "terminated"
    cluster_nodes = ec2.describe_instances(Filters=[{"Name": "tag:ray-cluster-name", "Values": ["facerec"]}])
    assert not cluster_nodes["Reservations"]  # nothing of the cluster's own was started

    commands = " ".join(" ".join(call["args"]) for call in recorded(calls))
    assert "uv==0.13.8" in commands and "make install" in commands  # the same setup as every node
    assert "ray start" not in commands  # and nothing else: Ray never runs on the builder
    assert any(call["tool"] == "rsync" for call in map(json.loads, calls.read_text().splitlines()))


def test_the_baked_config_passes_rays_validation_and_names_the_image_for_every_node_type(tmp_path: Path) -> None:
    out = tmp_path / "cluster.baked.yaml"
    written = _facerec(["cluster", "config", "--image", "ami-0123456789abcdef0", "--out", str(out)], dict(os.environ))
    assert written["config"] == str(out)
    config = yaml.safe_load(out.read_text())
    validate_config(prepare_config(config))
    original = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert set(config["available_node_types"]) == set(original["available_node_types"])
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["ImageId"] == "ami-0123456789abcdef0"
    # Everything else is cluster.yaml's: the same setup commands (on a baked node they find the work done).
    assert config["setup_commands"] == original["setup_commands"]
    bad = subprocess.run(
        [str(FACEREC), "cluster", "config", "--image", "not-an-image", "--out", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "not an AMI id" in bad.stderr


def test_make_install_a_second_time_installs_nothing() -> None:
    """What a baked node's setup runs: the project's `make install`, already done (by `make test` here)."""
    question = subprocess.run(["make", "-q", "install"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert question.returncode == 0, "make install is not up to date: run it before the tests (make test does)"
    started = time.perf_counter()
    again = subprocess.run(["make", "install"], cwd=REPO, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    print(f"\nmake install, second run: {seconds:.2f} s; output: {again.stdout.strip()!r}")
    assert again.returncode == 0
    assert "pip install" not in again.stdout and "weights fetch" not in again.stdout
