"""The load balancer's targets follow the nodes (against moto's ELBv2; no address is ever connected to)."""

from __future__ import annotations

import pytest

from aws_stack.clients import aws_client
from cluster.load_balancer import LoadBalancerArgs, TargetSync

pytestmark = pytest.mark.aws


def _target_group(moto_endpoint: str) -> tuple[object, str]:
    ec2 = aws_client("ec2", region="us-east-1", endpoint=moto_endpoint)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    elbv2 = aws_client("elbv2", region="us-east-1", endpoint=moto_endpoint)
    group = elbv2.create_target_group(Name="facerec-proxies", Protocol="HTTP", Port=8001, VpcId=vpc, TargetType="ip")[
        "TargetGroups"
    ][0]["TargetGroupArn"]
    return elbv2, str(group)


def test_workers_replace_the_head_and_leave_as_nodes_come_and_go(moto_endpoint: str) -> None:
    elbv2, group = _target_group(moto_endpoint)
    sync = TargetSync(elbv2, LoadBalancerArgs(target_group_arn=group))
    head = "10.0.0.9"
    # No worker: the head's proxy (its standby ingress) takes the requests.
    assert sync.sync(set(), head).registered == [(head, 8000)]
    assert sync.current() == {(head, 8000)}
    # Two workers come: their proxies, and the head leaves the balancer.
    two = sync.sync({"10.0.1.1", "10.0.1.2"}, head)
    assert two.registered == [("10.0.1.1", 8001), ("10.0.1.2", 8001)] and two.deregistered == [(head, 8000)]
    assert sync.current() == {("10.0.1.1", 8001), ("10.0.1.2", 8001)}
    # Nothing changed: nothing is called.
    assert sync.sync({"10.0.1.1", "10.0.1.2"}, head) == type(two)([], [])
    # One worker gone (scaled in, or died), another came.
    moved = sync.sync({"10.0.1.2", "10.0.1.3"}, head)
    assert moved.registered == [("10.0.1.3", 8001)] and moved.deregistered == [("10.0.1.1", 8001)]
    # Every worker gone: back to the head.
    assert sync.sync(set(), head).registered == [(head, 8000)]
    assert sync.current() == {(head, 8000)}
