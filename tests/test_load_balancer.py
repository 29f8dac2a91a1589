"""The load balancer's targets follow the nodes (against moto's ELBv2: loopback addresses, never connected to)."""

from __future__ import annotations

import pytest

from cluster.load_balancer import LoadBalancerArgs, TargetSync
from tests.queue_helpers import moto_target_group

pytestmark = pytest.mark.aws


def test_workers_replace_the_head_and_leave_as_nodes_come_and_go(moto_endpoint: str) -> None:
    elbv2, group = moto_target_group(moto_endpoint)
    sync = TargetSync(elbv2, LoadBalancerArgs(target_group_arn=group))
    head = "127.0.0.9"
    # No worker: the head's proxy (its standby ingress) takes the requests.
    assert sync.sync(set(), head).registered == [(head, 8000)]
    assert sync.current() == {(head, 8000)}
    # Two workers come: their proxies, and the head leaves the balancer.
    two = sync.sync({"127.0.1.1", "127.0.1.2"}, head)
    assert two.registered == [("127.0.1.1", 8001), ("127.0.1.2", 8001)] and two.deregistered == [(head, 8000)]
    assert sync.current() == {("127.0.1.1", 8001), ("127.0.1.2", 8001)}
    # Nothing changed: nothing is called.
    assert sync.sync({"127.0.1.1", "127.0.1.2"}, head) == type(two)([], [])
    # One worker gone (scaled in, or died), another came.
    moved = sync.sync({"127.0.1.2", "127.0.1.3"}, head)
    assert moved.registered == [("127.0.1.3", 8001)] and moved.deregistered == [("127.0.1.1", 8001)]
    # Every worker gone: back to the head.
    assert sync.sync(set(), head).registered == [(head, 8000)]
    assert sync.current() == {(head, 8000)}
