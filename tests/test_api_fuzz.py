"""Schema fuzzing: every operation of the live application's /openapi.json, generated cases, no 5xx, and every
answer as the schema documents it (status, content type, body).

Bounded for `make test` (``FACEREC_FUZZ_EXAMPLES`` cases per operation, 50 by default); `make fuzz` runs many
more. Hypothesis runs derandomized, so a failure here repeats on the next run.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err, Ok

from tests.serve_fixtures import ServeCluster, healthy
from tests.waiting import wait_until

pytestmark = pytest.mark.serve

EXAMPLES = int(os.environ.get("FACEREC_FUZZ_EXAMPLES", "50"))


@pytest.fixture(scope="module")
def fuzzed_app(serve_cluster: ServeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from serve_app.app import AppArgs, build_app
    from serve_app.settings import RecognitionSettings

    app = build_app(
        AppArgs.model_validate(
            {
                "gallery_uri": str(tmp_path_factory.mktemp("fuzz-gallery")),
                "recognition": RecognitionSettings().model_dump(),
                "recognizer": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 1.0},
            }
        )
    )
    serve.run(app, name="fuzz", route_prefix="/", blocking=False)
    wait_until(lambda: healthy(serve_cluster.url), 240, "the application did not become healthy")
    yield serve_cluster.url
    serve.delete("fuzz")


def test_every_operation_answers_as_documented_and_never_5xx(fuzzed_app: str) -> None:
    url = fuzzed_app
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=30)
    checks = [
        schemathesis.checks.not_a_server_error,
        schemathesis.checks.status_code_conformance,
        schemathesis.checks.content_type_conformance,
        schemathesis.checks.response_schema_conformance,
    ]
    loaded = list(schema.get_all_operations())
    invalid = [str(result.err()) for result in loaded if isinstance(result, Err)]
    assert invalid == []  # the schema itself is valid OpenAPI
    operations = [result.ok() for result in loaded if isinstance(result, Ok)]
    cases: Counter[str] = Counter()
    failures: list[str] = []
    session = requests.Session()
    for operation in operations:
        fuzz_one(operation, url, session, checks, cases, failures)()
    print(f"\nschema fuzzing: {len(operations)} operations, {sum(cases.values())} cases, {len(failures)} failures")
    for failure in sorted(set(failures)):
        print("  ", failure)
    assert len(operations) >= 10 and all(cases[f"{o.method.upper()} {o.path}"] > 0 for o in operations)
    assert sorted(set(failures)) == []
    assert healthy(url)


def fuzz_one(
    operation: Any,
    url: str,
    session: requests.Session,
    checks: list[Any],
    cases: Counter[str],
    failures: list[str],
) -> Any:
    """A Hypothesis test of one operation: ``EXAMPLES`` generated cases, each called and checked."""
    label = f"{operation.method.upper()} {operation.path}"

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def exercise(case: schemathesis.Case[Any]) -> None:
        cases[label] += 1
        try:
            # This application has no keys (every route open), so the cases reach the code behind the key check;
            # the check itself has its own table test (tests/test_access.py).
            case.call_and_validate(base_url=url, session=session, checks=checks, timeout=120)
        except (AssertionError, FailureGroup) as failure:  # recorded, not raised: no shrinking, every operation
            lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
            titles = [line for line in lines if line.startswith("- ")] or lines[:1]
            received = [line for line in lines if line.startswith("Received")][:1]
            failures.append(f"{label}: {'; '.join(titles + received)}"[:300])

    return exercise
