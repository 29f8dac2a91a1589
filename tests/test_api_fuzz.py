"""Schema fuzzing: every operation of the live application's /openapi.json, generated cases, no 5xx, and every
answer as the schema documents it (status, content type, body).

Two runs: every operation on its own, then stateful sequences that follow the API's OpenAPI links (an
enrolment's answer names the person and face that the person, chip and removal operations take), so those are
reached with something to find. Half the generated multipart bodies get their file parts replaced by real photos
of one face, so that cases reach the code behind the upload checks; every operation must then answer 2xx at
least once. Bounded for `make test` (``FACEREC_FUZZ_EXAMPLES`` cases per operation, 50 by default); `make fuzz`
runs many more, with a fresh seed each time (``FACEREC_FUZZ_SEED`` repeats one; `make test` is derandomized, so
a failure there repeats on the next run).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err, Ok

from tests.serve_fixtures import ServeCluster, healthy
from tests.waiting import wait_until

from .conftest import SCENES

pytestmark = pytest.mark.serve

EXAMPLES = int(os.environ.get("FACEREC_FUZZ_EXAMPLES", "50"))
#: ``make fuzz`` sets a seed (fresh each run, printed); unset: derandomized, the same cases every run.
SEED = os.environ.get("FACEREC_FUZZ_SEED")
#: The file parts of each operation that takes photos, and a photo of one face for them.
FILE_PARTS = {
    "/": ("inputFile",),
    "/v1/recognize": ("image",),
    "/v1/detect": ("image",),
    "/v1/verify": ("image1", "image2"),
    "/v1/people/{name}/faces": ("images",),
}
PHOTO = SCENES / "knn" / "train" / "obama" / "obama.jpg"


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


def hypothesis_settings(**extra: Any) -> settings:
    return settings(
        deadline=None,
        database=None,
        derandomize=SEED is None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        **extra,
    )


def with_photos(schema: Any) -> None:
    """Half the generated multipart bodies: their file parts are a real photo of one face; half the names: one the
    API accepts."""
    photo = PHOTO.read_bytes()

    @schema.hook("flatmap_body")  # type: ignore[untyped-decorator]
    def real_photos(context: Any, body: Any) -> Any:
        parts = FILE_PARTS.get(context.operation.path) if context.operation is not None else None
        if not parts:
            return st.just(body)
        replaced = {part: [photo] if part == "images" else photo for part in parts}
        return st.sampled_from([body, replaced])

    @schema.hook("flatmap_path_parameters")  # type: ignore[untyped-decorator]
    def a_valid_name(context: Any, parameters: Any) -> Any:
        # Half the time a name the API accepts, so that enrolments succeed and their links lead somewhere.
        if not isinstance(parameters, dict) or "name" not in parameters:
            return st.just(parameters)
        return st.sampled_from([parameters, {**parameters, "name": "Fuzz Person"}])


@dataclass
class FuzzRun:
    """What both runs share: where and how to call, and what they found."""

    url: str
    session: requests.Session
    checks: list[Any]
    cases: Counter[str] = field(default_factory=Counter)
    succeeded: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def answered(self, label: str, status: int) -> None:
        self.cases[label] += 1
        if 200 <= status < 300:
            self.succeeded[label] += 1

    def failed(self, label: str, failure: BaseException) -> None:
        self.failures.append(_failure_line(label, failure))


def label_of(operation: Any) -> str:
    return f"{operation.method.upper()} {operation.path}"


def named_files(case: schemathesis.Case[Any]) -> dict[str, Any]:
    """Send a multipart body's bytes as files with names, as clients do (schemathesis sends binary parts without a
    file name, which the web framework reads as text fields: the handlers would never see a file)."""
    if case.operation.path not in FILE_PARTS or not isinstance(case.body, dict):
        return {}
    files: list[tuple[str, tuple[str, Any, str]]] = []
    fields: dict[str, Any] = {}
    for name, value in case.body.items():
        values = value if isinstance(value, list) else [value]
        if values and all(isinstance(v, bytes) for v in values):
            files += [(name, (f"{name}-{i}.jpg", v, "image/jpeg")) for i, v in enumerate(values)]
        else:
            fields[name] = value if isinstance(value, (str, int)) else str(value)
    return {"files": files, "data": fields} if files else {}


def test_every_operation_answers_as_documented_and_never_5xx(fuzzed_app: str) -> None:
    url = fuzzed_app
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=30)
    with_photos(schema)
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
    session = requests.Session()
    statuses: Counter[tuple[str, int]] = Counter()

    def count(response: requests.Response, *_: Any, **__: Any) -> None:
        request = response.request
        statuses[(str(request.method), response.status_code)] += 1

    session.hooks["response"].append(count)
    run = FuzzRun(url, session, checks)
    if SEED is not None:
        print(f"\nschema fuzzing with seed {SEED} (FACEREC_FUZZ_SEED={SEED} repeats it)")
    for operation in operations:
        fuzz_one(operation, run)()
    follow_links(schema, run)
    cases, succeeded, failures = run.cases, run.succeeded, run.failures
    print(f"\nschema fuzzing: {len(operations)} operations, {sum(cases.values())} cases, {len(failures)} failures")
    for label in sorted(cases):
        print(f"   {label}: {cases[label]} cases, {succeeded[label]} answered 2xx")
    print("   answers by method and status:", dict(sorted(statuses.items())))
    for failure in sorted(set(failures)):
        print("  ", failure)
    labels = [label_of(o) for o in operations]
    assert len(operations) >= 10 and all(cases[label] > 0 for label in labels)
    assert sorted(set(failures)) == []
    assert [label for label in labels if succeeded[label] == 0] == [], "operations never answered 2xx"
    assert healthy(url)


def follow_links(schema: Any, run: FuzzRun) -> None:
    """Stateful sequences along the OpenAPI links: enrol, then look the person and face up, read the chip,
    forget them."""
    url, session = run.url, run.session

    class Sequences(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            # Every sequence starts from an empty gallery: what a step can follow then depends on that sequence
            # alone (Hypothesis refuses a run whose choices change with what earlier sequences left behind).
            people = session.get(f"{url}/v1/people", timeout=120).json()["people"]
            for person in people:
                session.delete(f"{url}/v1/people/{quote(person['name'], safe='')}", timeout=120)

        def get_call_kwargs(self, case: schemathesis.Case[Any]) -> dict[str, Any]:
            return {"base_url": url, "session": session, "timeout": 120, **named_files(case)}

        def after_call(self, response: Any, case: schemathesis.Case[Any]) -> None:
            run.answered(label_of(case.operation), response.status_code)

        def validate_response(self, response: Any, case: schemathesis.Case[Any], **kwargs: Any) -> None:
            try:
                case.validate_response(response, checks=run.checks)
            except (AssertionError, FailureGroup) as failure:
                run.failed(label_of(case.operation), failure)

    # Enough sequences and steps that every link is followed from a successful enrolment many times over.
    Sequences.run(settings=hypothesis_settings(max_examples=max(50, EXAMPLES // 2), stateful_step_count=10))


def _failure_line(label: str, failure: BaseException) -> str:
    lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
    titles = [line for line in lines if line.startswith("- ")] or lines[:1]
    received = [line for line in lines if line.startswith("Received")][:1]
    return f"{label}: {'; '.join(titles + received)}"[:300]


def fuzz_one(operation: Any, run: FuzzRun) -> Any:
    """A Hypothesis test of one operation: ``EXAMPLES`` generated cases, each called and checked."""
    label = label_of(operation)

    # The schema's own examples (a checkpoint to re-embed with) half the time, generated cases the other half.
    examples = operation.get_strategies_from_examples()
    strategy = st.one_of(operation.as_strategy(), st.one_of(examples)) if examples else operation.as_strategy()

    @hypothesis_settings(max_examples=EXAMPLES)
    @given(case=strategy)
    def exercise(case: schemathesis.Case[Any]) -> None:
        try:
            # This application has no keys (every route open), so the cases reach the code behind the key check;
            # the check itself has its own table test (tests/test_access.py).
            response = case.call_and_validate(
                base_url=run.url, session=run.session, checks=run.checks, timeout=120, **named_files(case)
            )
            run.answered(label, response.status_code)
        except (AssertionError, FailureGroup) as failure:  # recorded, not raised: no shrinking, every operation
            run.cases[label] += 1
            run.failed(label, failure)

    if SEED is not None:
        from hypothesis import seed

        exercise = seed(int(SEED))(exercise)
    return exercise
