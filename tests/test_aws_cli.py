"""``facerec aws provision`` / ``status`` against the moto server, and finding the local stack by itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aws_stack.stack import StackConfig
from facerec.cli.main import main

pytestmark = pytest.mark.aws


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(list(argv)) == 0
    return dict(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))


def test_provision_is_idempotent_and_status_reports_everything(
    moto_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first = run_json(capsys, "aws", "provision", "--prefix", "cli-stack", "--endpoint", moto_endpoint)
    again = run_json(capsys, "aws", "provision", "--prefix", "cli-stack", "--endpoint", moto_endpoint)
    assert first == again
    report = run_json(capsys, "aws", "status", "--json", "--prefix", "cli-stack", "--endpoint", moto_endpoint)
    for field in ("endpoint", "region", "in_bucket", "out_bucket", "request_queue_url", "response_queue_url"):
        assert report[field], field
    assert report["dead_letter_queue_url"] == first["dead_letter"]
    assert report["request_queue"] == {"visible": 0, "in_flight": 0}
    assert report["in_bucket_objects"] == 0 and report["out_bucket_objects"] == 0


def test_status_finds_the_local_stack_without_flags(
    moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    StackConfig(prefix="local-found", endpoint=moto_endpoint).save_local()  # what `make run` writes
    run_json(capsys, "aws", "provision")
    report = run_json(capsys, "aws", "status", "--json")
    assert report["endpoint"] == moto_endpoint and report["in_bucket"] == "local-found-input"
    assert main(["aws", "status"]) == 0
    assert "local-found" in capsys.readouterr().out


def test_unreachable_stack_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["aws", "status", "--prefix", "nowhere", "--endpoint", "http://127.0.0.1:9"]) == 1


def test_provision_shortens_what_is_kept_of_photos_and_answers(
    moto_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import boto3

    stack = ("--prefix", "kept-stack", "--endpoint", moto_endpoint)
    run_json(capsys, "aws", "provision", *stack, "--upload-retention-days", "7", "--answer-retention-days", "30")
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)

    def rules(bucket: str) -> dict[str, Any]:
        return {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}

    uploads = rules("kept-stack-input")
    assert uploads["facerec-expire-uploads"]["Expiration"] == {"Days": 7}
    # An overwritten upload goes no later than the photo itself would.
    assert uploads["facerec-expire-overwritten-uploads"]["NoncurrentVersionExpiration"]["NoncurrentDays"] == 7
    assert rules("kept-stack-output")["facerec-expire-answers"]["Expiration"] == {"Days": 30}
    # Provisioning again without the options (as `facerec cluster deploy` does) leaves them as they are.
    run_json(capsys, "aws", "provision", *stack)
    assert rules("kept-stack-input")["facerec-expire-uploads"]["Expiration"] == {"Days": 7}
    assert rules("kept-stack-output")["facerec-expire-answers"]["Expiration"] == {"Days": 30}
    assert main(["aws", "provision", *stack, "--upload-retention-days", "0"]) == 2
