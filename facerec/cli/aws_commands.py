"""``facerec aws provision``, ``facerec aws status`` and ``facerec aws iam``."""

from __future__ import annotations

import argparse
import json
import logging

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from aws_stack.clients import AwsClients, aws_client
from aws_stack.stack import StackConfig, provision, status

log = logging.getLogger("facerec")


def stack_from_args(args: argparse.Namespace) -> StackConfig:
    """Flags first, then the stack `make run` recorded (run/aws.json), then the AWS defaults."""
    base = StackConfig.load_local() or StackConfig()
    overrides = {
        field: value
        for field, value in (
            ("prefix", args.prefix),
            ("region", args.region),
            ("endpoint", args.endpoint),
            ("max_receive_count", getattr(args, "max_receive_count", None)),
            ("upload_retention_days", getattr(args, "upload_retention_days", None)),
            ("answer_retention_days", getattr(args, "answer_retention_days", None)),
        )
        if value is not None
    }
    return StackConfig.model_validate({**base.model_dump(), **overrides}) if overrides else base


def run(args: argparse.Namespace) -> int:
    try:
        config = stack_from_args(args)
    except ValidationError as exc:
        log.error("%s", "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
        return 2
    clients = AwsClients.for_stack(config)
    try:
        if args.aws_command == "iam":
            return _iam(config, args.cluster_name or config.prefix)
        if args.aws_command == "provision":
            urls = provision(config, clients)
            print(json.dumps({"prefix": config.prefix, "endpoint": config.endpoint, **urls.__dict__}))
            return 0
        report = status(config, clients)
    except (BotoCoreError, ClientError) as exc:
        log.error("%s (stack %r at %s)", exc, config.prefix, config.endpoint or "AWS")
        return 1
    if args.json:
        print(json.dumps(report))
        return 0
    where = config.endpoint or f"AWS {config.region}"
    print(f"stack {config.prefix!r} at {where}")
    for queue in ("request_queue", "response_queue", "dead_letter_queue"):
        counts = report[queue]
        print(f"  {queue:<18} visible {counts['visible']:>6}   in flight {counts['in_flight']:>6}")
    print(f"  {'in bucket':<18} {report['in_bucket_objects']:>6} objects   ({config.in_bucket})")
    print(f"  {'out bucket':<18} {report['out_bucket_objects']:>6} objects   ({config.out_bucket})")
    return 0


def _iam(config: StackConfig, cluster_name: str) -> int:
    from cluster.iam import ensure_instance_profiles

    account = aws_client("sts", region=config.region, endpoint=config.endpoint).get_caller_identity()["Account"]
    arns = ensure_instance_profiles(
        aws_client("iam", region=config.region, endpoint=config.endpoint),
        prefix=config.prefix,
        region=config.region,
        account=str(account),
        cluster_name=cluster_name,
    )
    print(json.dumps({"account": account, "instance_profiles": arns}))
    return 0
