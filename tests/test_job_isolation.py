"""A photo that hits a bug fails alone: the other requests that shared its batch are still answered."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import pytest

from serve_app.jobs import JobError, RecognizeJob, run_jobs_isolated
from serve_app.model.recognizer import Recognizer


class ExplodingRecognizer:
    """Answers every photo with its own bytes, and raises for a whole batch that holds the bytes ``boom``."""

    max_pixels = 1_000_000

    def __init__(self) -> None:
        self.batches: list[int] = []

    def recognize_bytes(self, payloads: Sequence[bytes], threshold: object = None, top_k: object = None) -> list[bytes]:
        self.batches.append(len(payloads))
        if b"boom" in payloads:
            raise RuntimeError("a bug in the model code")
        return list(payloads)


def test_one_bad_job_fails_alone_and_the_rest_are_answered() -> None:
    fake = ExplodingRecognizer()
    jobs = [RecognizeJob(b"a"), RecognizeJob(b"boom"), RecognizeJob(b"c")]
    results = run_jobs_isolated(cast(Recognizer, fake), jobs)
    assert results[0] == b"a" and results[2] == b"c"
    assert isinstance(results[1], JobError) and results[1].reason == "unprocessable"
    assert fake.batches == [3, 1, 1, 1]  # the batch once, then each job alone


def test_a_healthy_batch_runs_once() -> None:
    fake = ExplodingRecognizer()
    assert run_jobs_isolated(cast(Recognizer, fake), [RecognizeJob(b"a"), RecognizeJob(b"b")]) == [b"a", b"b"]
    assert fake.batches == [2]


def test_a_failure_of_every_job_is_the_service_s_and_is_raised() -> None:
    fake = ExplodingRecognizer()
    with pytest.raises(RuntimeError, match="a bug"):
        run_jobs_isolated(cast(Recognizer, fake), [RecognizeJob(b"boom"), RecognizeJob(b"boom")])
    with pytest.raises(RuntimeError, match="a bug"):
        run_jobs_isolated(cast(Recognizer, fake), [RecognizeJob(b"boom")])
