"""Baking a node image: the worker's environment installed once into an AMI, so that new workers start in seconds.

A node launched from the stock image runs ``setup_commands`` at boot: uv, a Python, the pinned packages (the CUDA
build of torch, about 6.5 GB) and the weights, minutes per node on every scale-out. ``bake`` does that once:

1. launch one builder instance with a node type's ``node_config`` from ``cluster.yaml`` (on demand: a reclaimed
   spot builder would waste the bake), through Ray's own cluster launcher as the only node of a throwaway
   cluster named ``<cluster_name>-bake-<time>``, so the builder gets the same key pair, security group, file
   mounts and ``setup_commands`` over ssh as a real node, and neither ``ray down`` of the cluster nor a second
   bake can mistake it for one of theirs (Ray finds its nodes by the ``ray-cluster-name`` tag);
2. stop it, create an image of it (``ec2.create_image``) and wait until the image is available;
3. terminate the builder and delete the security group the launcher made for it, whatever happened, and return
   the image id.

:func:`baked_config` writes ``cluster.yaml`` with that image for every node type. On a node started from it the
same ``setup_commands`` still run, and find everything in place: ``make install`` is a no-op once its stamps
are newer than ``requirements.txt`` (the checkout rsynced by ``ray up`` keeps a baked node's stamps valid as long
as the requirements did not change; if they did, only the difference is installed).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Tags on the builder instance and on the image, so an operator (and the IAM policy) can tell them apart.
BAKE_TAG = "facerec:bake"
REQUIREMENTS_TAG = "facerec:requirements-sha256"


@dataclass(frozen=True)
class BakeRequest:
    cluster: dict[str, Any]
    #: The checkout copied to the builder (``file_mounts``); its requirements.txt is what gets installed.
    repository: Path
    node_type: str = "cpu_worker"
    region: str | None = None
    instance_type: str | None = None
    #: The image's name; default ``<cluster_name>-<node type>-<time>``.
    name: str | None = None

    @property
    def stamp(self) -> str:
        return time.strftime("%Y%m%d-%H%M%S", time.gmtime())

    def requirements_digest(self) -> str:
        return hashlib.sha256((self.repository / "requirements.txt").read_bytes()).hexdigest()


def builder_config(request: BakeRequest, builder_name: str, image_name: str) -> dict[str, Any]:
    """The throwaway one-node cluster config that builds the image (see the module docstring)."""
    cluster = request.cluster
    types = cluster["available_node_types"]
    if request.node_type not in types:
        raise ValueError(f"no node type {request.node_type!r} in the cluster config (it has: {', '.join(types)})")
    node = copy.deepcopy(types[request.node_type]["node_config"])
    node.pop("InstanceMarketOptions", None)
    if request.instance_type:
        node["InstanceType"] = request.instance_type
    tags = [
        {"Key": BAKE_TAG, "Value": image_name},
        {"Key": REQUIREMENTS_TAG, "Value": request.requirements_digest()},
    ]
    node["TagSpecifications"] = [{"ResourceType": "instance", "Tags": tags}]
    provider = dict(cluster["provider"])
    if request.region:
        provider["region"] = request.region
    return {
        "cluster_name": builder_name,
        "max_workers": 0,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": provider,
        "auth": dict(cluster.get("auth", {})),
        "available_node_types": {"builder": {"resources": {}, "node_config": node}},
        "head_node_type": "builder",
        "file_mounts": {"~/facerec": str(request.repository)},
        "rsync_exclude": list(cluster.get("rsync_exclude", [])),
        "rsync_filter": list(cluster.get("rsync_filter", [])),
        "initialization_commands": list(cluster.get("initialization_commands", [])),
        # The setup every node runs, and nothing else: Ray is not started on the builder.
        "setup_commands": list(cluster["setup_commands"]),
        "head_setup_commands": list(cluster.get(f"{_role(request.node_type)}_setup_commands", [])),
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _role(node_type: str) -> str:
    return "head" if node_type == "head" else "worker"


def bake(request: BakeRequest, ec2: Any, launch: Any) -> str:
    """Build the image; returns its id. ``launch`` runs Ray's launcher on a config dict (``create_or_update_cluster``
    from ``ray.autoscaler.sdk``); ``ec2`` is a boto3 EC2 client of the cluster's region."""
    stamp = request.stamp
    cluster_name = str(request.cluster["cluster_name"])
    image_name = request.name or f"{cluster_name}-{request.node_type.replace('_', '-')}-{stamp}"
    builder_name = f"{cluster_name}-bake-{stamp}"
    config = builder_config(request, builder_name, image_name)
    log.info("launching builder %s (%s) and running the setup", builder_name, config["available_node_types"])
    builder: str | None = None
    try:
        launch(config)
        builder = _builder_instance(ec2, builder_name)
        log.info("setup done on %s; stopping it to image a consistent disk", builder)
        ec2.stop_instances(InstanceIds=[builder])
        ec2.get_waiter("instance_stopped").wait(InstanceIds=[builder], WaiterConfig={"Delay": 5, "MaxAttempts": 120})
        image = ec2.create_image(
            InstanceId=builder,
            Name=image_name,
            Description=f"{cluster_name} {request.node_type}: setup_commands done (requirements.txt installed)",
            TagSpecifications=[
                {
                    "ResourceType": "image",
                    "Tags": [
                        {"Key": BAKE_TAG, "Value": image_name},
                        {"Key": REQUIREMENTS_TAG, "Value": request.requirements_digest()},
                    ],
                }
            ],
        )
        image_id = str(image["ImageId"])
        log.info("waiting for image %s (%s)", image_id, image_name)
        ec2.get_waiter("image_available").wait(ImageIds=[image_id], WaiterConfig={"Delay": 15, "MaxAttempts": 240})
        return image_id
    finally:
        if builder is None:
            builder = _builder_instance(ec2, builder_name, required=False)
        if builder is not None:
            log.info("terminating builder %s", builder)
            ec2.terminate_instances(InstanceIds=[builder])
            ec2.get_waiter("instance_terminated").wait(
                InstanceIds=[builder], WaiterConfig={"Delay": 5, "MaxAttempts": 120}
            )
        _delete_security_groups(ec2, builder_name)


def _delete_security_groups(ec2: Any, builder_name: str) -> None:
    """The security group Ray's launcher made for the throwaway cluster (``ray-autoscaler-<name>``): one per bake
    would otherwise pile up (a VPC holds 2,500)."""
    found = ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [f"ray-autoscaler-{builder_name}*"]}]
    )
    for group in found["SecurityGroups"]:
        log.info("deleting security group %s (%s)", group["GroupId"], group["GroupName"])
        ec2.delete_security_group(GroupId=group["GroupId"])


def _builder_instance(ec2: Any, builder_name: str, required: bool = True) -> str | None:
    found = ec2.describe_instances(
        Filters=[
            {"Name": "tag:ray-cluster-name", "Values": [builder_name]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
        ]
    )
    ids = [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]]
    if not ids:
        if required:
            raise RuntimeError(f"the builder instance of {builder_name} was not found")
        return None
    return str(ids[0])


def baked_config(cluster: dict[str, Any], image_id: str) -> dict[str, Any]:
    """``cluster`` with ``image_id`` as every node type's image."""
    if not image_id.startswith("ami-"):
        raise ValueError(f"not an AMI id: {image_id!r}")
    baked = copy.deepcopy(cluster)
    for node_type in baked["available_node_types"].values():
        node_type["node_config"]["ImageId"] = image_id
    return baked
