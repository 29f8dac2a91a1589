"""The one place boto3 clients are made: the standard credential chain, retries set on the client.

Every part of the product (the Serve app's gallery store and queue-mode web tier, the SQS bridge, the cluster
controller, the command line) gets its clients here, so that an endpoint (the local moto server), a region and
the retry policy apply to all of them alike. Nothing here reads credentials from code or config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config

from aws_stack.config import StackConfig

#: Adaptive retries ride out throttling and the moto server's brief stalls; 64 connections serve a replica's
#: concurrent batches without queueing on the pool.
CLIENT_CONFIG = Config(retries={"max_attempts": 8, "mode": "adaptive"}, max_pool_connections=64)
#: For calls a person is waiting on that have a good answer when the store is away (the gallery: recognition
#: goes on from the snapshot in memory, an enrolment says 503 at once): a few quick tries, not a minute of them.
QUICK_FAILURE_CONFIG = Config(
    retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=3, read_timeout=10, max_pool_connections=16
)


def session_for(region: str | None = None, endpoint: str | None = None) -> boto3.session.Session:
    """The standard credential chain; placeholder keys only for a loopback endpoint (the local moto server)."""
    session = boto3.session.Session(region_name=region)
    if endpoint and _is_loopback(endpoint) and session.get_credentials() is None:
        # The local moto server accepts any signature; placeholders let `facerec aws status` work from any shell.
        session = boto3.session.Session(
            aws_access_key_id="moto-local", aws_secret_access_key="moto-local", region_name=region
        )
    return session


def aws_client(
    service: str, *, region: str | None = None, endpoint: str | None = None, config: Config = CLIENT_CONFIG
) -> Any:
    """A boto3 client for ``service``. ``region`` and ``endpoint`` of ``None`` leave them to boto3's own
    resolution (``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``, the config file)."""
    # The stubs type client() per literal service name; this factory serves them all, so it hands back Any.
    session: Any = session_for(region, endpoint)
    return session.client(service, endpoint_url=endpoint, config=config)


def _is_loopback(url: str) -> bool:
    return urlparse(url).hostname in ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class AwsClients:
    """The S3 and SQS clients of one stack, built once and passed down."""

    s3: Any
    sqs: Any

    @classmethod
    def for_stack(cls, config: StackConfig) -> AwsClients:
        return cls(
            s3=aws_client("s3", region=config.region, endpoint=config.endpoint),
            sqs=aws_client("sqs", region=config.region, endpoint=config.endpoint),
        )
