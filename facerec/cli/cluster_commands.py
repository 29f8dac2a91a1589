"""``facerec cluster deploy``: run on the cluster's head by cluster.yaml's start commands."""

from __future__ import annotations

import argparse
import json

from aws_stack.clients import AwsClients
from aws_stack.stack import provision
from cluster.deploy import BOOTSTRAP_CONFIG, deploy, render_serve_config, stack_from_bootstrap


def deploy_command(args: argparse.Namespace) -> int:
    stack = stack_from_bootstrap(args.bootstrap or BOOTSTRAP_CONFIG)
    config = render_serve_config(stack)
    if args.print:
        print(json.dumps(config, indent=1))
        return 0
    provision(stack, AwsClients.for_stack(stack))  # the buckets and queues first (idempotent)
    deploy(config, args.address)
    return 0
