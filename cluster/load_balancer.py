"""The load balancer's targets kept equal to the cluster's nodes: every worker's HTTP proxy, or the head's alone.

The cluster runs an HTTP proxy on every node with replicas; each hands its requests to the ingress on its own node
(``cluster/serve_config.yaml``). A load balancer in front (an ALB or NLB target group of type ``ip``, created once
by the operator; its ARN in the controller's ``load_balancer`` arguments) must send requests to the workers'
proxies (port 8001) while any worker runs, and to the head's (port 8000, where the standby ingress answers) only
while none does. The controller calls :meth:`TargetSync.sync` every period with the nodes Ray reports alive:
targets of nodes that left are deregistered (the balancer drains them), new nodes registered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

log = logging.getLogger(f"ray.serve.{__name__}")


class LoadBalancerArgs(BaseModel):
    """Where the controller registers the nodes (``load_balancer`` in the controller's arguments)."""

    target_group_arn: str = Field(description="an ELBv2 target group of target type `ip`")
    worker_port: int = Field(
        8001, ge=1, le=65535, description="the workers' proxies (RAY_SERVE_WORKER_PROXY_HTTP_PORT)"
    )
    head_port: int = Field(8000, ge=1, le=65535, description="the head's proxy (http_options.port)")


@dataclass(frozen=True)
class SyncResult:
    registered: list[tuple[str, int]]
    deregistered: list[tuple[str, int]]


@dataclass
class TargetSync:
    """Registers and deregisters the target group's targets through ELBv2 (the client is passed in)."""

    elbv2: Any
    args: LoadBalancerArgs

    def wanted(self, worker_ips: set[str], head_ip: str) -> set[tuple[str, int]]:
        """The workers' proxies while any worker runs; else the head's."""
        if worker_ips:
            return {(ip, self.args.worker_port) for ip in worker_ips}
        return {(head_ip, self.args.head_port)}

    def current(self) -> set[tuple[str, int]]:
        """The targets registered now (draining ones excluded: they are on their way out)."""
        described = self.elbv2.describe_target_health(TargetGroupArn=self.args.target_group_arn)
        return {
            (str(t["Target"]["Id"]), int(t["Target"]["Port"]))
            for t in described.get("TargetHealthDescriptions", [])
            if (t.get("TargetHealth") or {}).get("State") != "draining"
        }

    def sync(self, worker_ips: set[str], head_ip: str) -> SyncResult:
        wanted, current = self.wanted(worker_ips, head_ip), self.current()
        register, deregister = sorted(wanted - current), sorted(current - wanted)
        # New targets first: while the set changes hands the balancer always has somewhere to send requests.
        if register:
            targets = [{"Id": ip, "Port": port} for ip, port in register]
            self.elbv2.register_targets(TargetGroupArn=self.args.target_group_arn, Targets=targets)
        if deregister:
            targets = [{"Id": ip, "Port": port} for ip, port in deregister]
            self.elbv2.deregister_targets(TargetGroupArn=self.args.target_group_arn, Targets=targets)
        if register or deregister:
            log.info("load balancer targets: registered %s, deregistered %s", register, deregister)
        return SyncResult(register, deregister)


def alive_nodes(worker_resource: str) -> tuple[set[str], str]:
    """(the alive worker nodes' IP addresses, the head's), from Ray: a worker offers ``worker_resource``."""
    import ray

    workers: set[str] = set()
    head = ""
    for node in ray.nodes():  # type: ignore[no-untyped-call]
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        address = str(node.get("NodeManagerAddress", ""))
        if resources.get(worker_resource):
            workers.add(address)
        elif "node:__internal_head__" in resources:
            head = address
    return workers, head
