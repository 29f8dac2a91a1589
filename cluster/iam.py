"""The cluster's two IAM instance profiles, from the least-privilege policies in this folder.

``<prefix>-head`` (``iam-policy.json``): the project's queues and buckets, and just enough EC2 for Ray's
autoscaler to launch, tag and terminate this cluster's workers (and pass them their role).
``<prefix>-worker`` (``iam-worker-policy.json``): read the gallery, nothing else.

The policies name resources with ``${prefix}``, ``${region}``, ``${account}`` and ``${cluster_name}``; they are
filled in here. ``facerec aws iam`` creates both roles and profiles (idempotent); no keys are created or stored.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from string import Template
from typing import Any

HERE = Path(__file__).resolve().parent
POLICY_FILES = {"head": HERE / "iam-policy.json", "worker": HERE / "iam-worker-policy.json"}

#: EC2 instances (and only they) may assume the roles.
EC2_TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}


def render_policy(role: str, *, prefix: str, region: str, account: str, cluster_name: str) -> dict[str, Any]:
    """The policy document for ``role`` ("head" or "worker") with this deployment's names filled in."""
    text = Template(POLICY_FILES[role].read_text()).substitute(
        prefix=prefix, region=region, account=account, cluster_name=cluster_name
    )
    document: dict[str, Any] = json.loads(text)
    return document


def ensure_instance_profiles(iam: Any, *, prefix: str, region: str, account: str, cluster_name: str) -> dict[str, str]:
    """Create (or update) the roles, their inline policies and instance profiles; returns role -> profile ARN."""
    arns: dict[str, str] = {}
    for role in POLICY_FILES:
        name = f"{prefix}-{role}"
        with contextlib.suppress(iam.exceptions.EntityAlreadyExistsException):
            iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(EC2_TRUST))
        policy = render_policy(role, prefix=prefix, region=region, account=account, cluster_name=cluster_name)
        iam.put_role_policy(RoleName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
        with contextlib.suppress(iam.exceptions.EntityAlreadyExistsException):
            iam.create_instance_profile(InstanceProfileName=name)
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        if not any(r["RoleName"] == name for r in profile.get("Roles", [])):
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        arns[role] = str(profile["Arn"])
    return arns
