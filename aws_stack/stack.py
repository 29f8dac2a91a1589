"""The AWS resources of one deployment, named from one prefix, and how to create and inspect them.

Names (prefix ``facerec``): buckets ``facerec-input``, ``facerec-output``, ``facerec-gallery``; queues
``facerec-requests`` (1 KB maximum message size, redrive to the dead-letter queue), ``facerec-responses``,
``facerec-requests-dlq``. The same code runs against AWS (standard credential chain, ``endpoint`` None) and the
local moto server (``endpoint`` = its URL).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from aws_stack.clients import AwsClients
from aws_stack.config import LOCAL_STACK_FILE, REQUEST_MAX_MESSAGE_BYTES, StackConfig

__all__ = [
    "LOCAL_STACK_FILE",
    "REQUEST_MAX_MESSAGE_BYTES",
    "QueueUrls",
    "StackConfig",
    "provision",
    "queue_counts",
    "queue_urls",
    "status",
]

log = logging.getLogger(f"ray.serve.{__name__}")


@dataclass(frozen=True)
class QueueUrls:
    requests: str
    responses: str
    dead_letter: str


def _create_bucket(s3: Any, name: str, region: str) -> None:
    try:
        if region == "us-east-1":
            s3.create_bucket(Bucket=name)
        else:
            s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})
        log.info("created bucket %s", name)
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


#: How long an overwritten upload stays readable: as long as a request for it can still be redriven from the
#: dead-letter queue (14 days), and a day more.
NONCURRENT_UPLOAD_DAYS = 15
UPLOAD_RULE_ID = "facerec-expire-overwritten-uploads"
#: The operator's retention of photos and answers (``facerec aws provision --upload-retention-days`` etc.).
UPLOADS_KEPT_RULE_ID = "facerec-expire-uploads"
ANSWERS_KEPT_RULE_ID = "facerec-expire-answers"


def _version_uploads(s3: Any, bucket: str, retention_days: int | None) -> None:
    """Version the input bucket, so two uploads under one name are two objects.

    The legacy contract names the input object after the client's file, so two clients posting ``photo.jpg``
    at once overwrite each other; the queue-mode web tier sends the version it wrote with its request, and the
    bridge reads exactly that version. Overwritten versions expire (this project's one lifecycle rule, added
    beside any rules the bucket already has), and with ``retention_days`` the photos themselves too.
    """
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    noncurrent = NONCURRENT_UPLOAD_DAYS if retention_days is None else min(NONCURRENT_UPLOAD_DAYS, retention_days)
    ours = {
        "ID": UPLOAD_RULE_ID,
        "Status": "Enabled",
        "Filter": {"Prefix": ""},
        "NoncurrentVersionExpiration": {"NoncurrentDays": noncurrent},
    }
    _set_rules(s3, bucket, [ours, *_expiry(UPLOADS_KEPT_RULE_ID, retention_days)], {UPLOAD_RULE_ID})


def _expiry(rule_id: str, days: int | None) -> list[dict[str, Any]]:
    if days is None:
        return []
    return [{"ID": rule_id, "Status": "Enabled", "Filter": {"Prefix": ""}, "Expiration": {"Days": days}}]


def _set_rules(s3: Any, bucket: str, ours: list[dict[str, Any]], replaced: set[str]) -> None:
    """Put ``ours`` beside the rules the bucket has, replacing those with the ids in ``replaced`` or in ``ours``.
    A rule of ours that is not given this time is left as it is (an option not repeated is not undone)."""
    if not ours:
        return
    try:
        rules = list(s3.get_bucket_lifecycle_configuration(Bucket=bucket).get("Rules", []))
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "NoSuchLifecycleConfiguration":
            raise
        rules = []
    replaced = replaced | {rule["ID"] for rule in ours}
    rules = [rule for rule in rules if rule.get("ID") not in replaced] + ours
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})


def _ensure_queue(sqs: Any, name: str, attributes: dict[str, str]) -> str:
    try:
        url = str(sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("QueueAlreadyExists", "QueueNameExists"):
            raise
        # Same name, other attributes: bring the existing queue to the configured ones.
        url = str(sqs.get_queue_url(QueueName=name)["QueueUrl"])
    sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
    return url


def provision(config: StackConfig, clients: AwsClients) -> QueueUrls:
    """Create (or bring up to date) every bucket and queue of the stack. Safe to run any number of times."""
    for bucket in (config.in_bucket, config.out_bucket, config.gallery_bucket):
        _create_bucket(clients.s3, bucket, config.region)
    _version_uploads(clients.s3, config.in_bucket, config.upload_retention_days)
    _set_rules(clients.s3, config.out_bucket, _expiry(ANSWERS_KEPT_RULE_ID, config.answer_retention_days), set())
    dead_letter = _ensure_queue(clients.sqs, config.dead_letter_queue, {"MessageRetentionPeriod": "1209600"})
    dead_letter_arn = clients.sqs.get_queue_attributes(QueueUrl=dead_letter, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    requests = _ensure_queue(
        clients.sqs,
        config.request_queue,
        {
            "MaximumMessageSize": str(REQUEST_MAX_MESSAGE_BYTES),
            "VisibilityTimeout": str(config.visibility_timeout_s),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dead_letter_arn, "maxReceiveCount": str(config.max_receive_count)}
            ),
        },
    )
    responses = _ensure_queue(clients.sqs, config.response_queue, {"VisibilityTimeout": "30"})
    return QueueUrls(requests=requests, responses=responses, dead_letter=dead_letter)


def queue_urls(config: StackConfig, clients: AwsClients) -> QueueUrls:
    def url(name: str) -> str:
        return str(clients.sqs.get_queue_url(QueueName=name)["QueueUrl"])

    return QueueUrls(url(config.request_queue), url(config.response_queue), url(config.dead_letter_queue))


def queue_counts(sqs: Any, url: str) -> dict[str, int]:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return {
        "visible": int(attributes["ApproximateNumberOfMessages"]),
        "in_flight": int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    }


def _object_count(s3: Any, bucket: str) -> int:
    paginator = s3.get_paginator("list_objects_v2")
    return sum(page.get("KeyCount", 0) for page in paginator.paginate(Bucket=bucket))


def status(config: StackConfig, clients: AwsClients) -> dict[str, Any]:
    """Counts for every queue and bucket, plus the names scripts need to act as legacy producers/consumers."""
    urls = queue_urls(config, clients)
    return {
        "endpoint": config.endpoint,
        "region": config.region,
        "prefix": config.prefix,
        "in_bucket": config.in_bucket,
        "out_bucket": config.out_bucket,
        "gallery_uri": config.gallery_uri,
        "request_queue_url": urls.requests,
        "response_queue_url": urls.responses,
        "dead_letter_queue_url": urls.dead_letter,
        "request_queue": queue_counts(clients.sqs, urls.requests),
        "response_queue": queue_counts(clients.sqs, urls.responses),
        "dead_letter_queue": queue_counts(clients.sqs, urls.dead_letter),
        "in_bucket_objects": _object_count(clients.s3, config.in_bucket),
        "out_bucket_objects": _object_count(clients.s3, config.out_bucket),
    }
