"""Shared fixtures: the datasets beside the repository, and the real models loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.serve_fixtures import moto_endpoint, serve_cluster

__all__ = ["moto_endpoint", "serve_cluster"]

# `pytester` runs a small pytest inside a test (tests/test_timeouts.py checks the time limits that way).
pytest_plugins = ["pytester"]

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

#: The shared photos; FACEREC_DATASETS points elsewhere (default: ``../shared/datasets`` beside the repository).
DATASETS = Path(os.environ.get("FACEREC_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
SCENES = DATASETS / "scenes"
LFW = DATASETS / "lfw-view1"

#: Every enrolled face in scenes/knn/test, left to right (x of the box centre decides the order).
KNN_EXPECTED = {
    "alex_lacamoire1.jpg": ["alex_lacamoire"],
    "johnsnow_test1.jpg": ["kit_harington"],
    "obama1.jpg": ["obama"],
    "obama_and_biden.jpg": ["biden", "obama"],
    "kit_with_rose.jpg": ["rose_leslie", "kit_harington"],
}


#: Tiers beside ``unit`` (pyproject.toml lists them). A module declares its tier with ``pytestmark``; a test in
#: none of them is a unit test: no Ray, no moto, real models and photos allowed, seconds each.
OTHER_TIERS = frozenset({"serve", "aws", "cluster", "slow", "browser"})
#: Fixtures that start Ray or moto, and the tiers allowed to use them (serve_cluster starts moto too).
TIERS_OF_FIXTURE = {"serve_cluster": {"serve", "cluster"}, "moto_endpoint": {"aws", "serve", "cluster"}}
#: Seconds one test may take in each tier, its fixtures' set-up included (pytest-timeout), so that a hung test
#: fails alone instead of holding CI until its limit. Each is several times the slowest test of its tier on an
#: AVX2-only machine (3x slower than the faster ones): a guard against hangs, never a speed check. A test with its
#: own ``@pytest.mark.timeout`` keeps it; a test in several tiers gets the largest.
TIER_TIMEOUT_S = {"unit": 300, "aws": 300, "serve": 900, "browser": 900, "slow": 1800, "cluster": 1800}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        for fixture, allowed in TIERS_OF_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()) and not marks & allowed:
                raise pytest.UsageError(f"{item.nodeid} uses {fixture}: mark its module with one of {sorted(allowed)}")
        if not marks & OTHER_TIERS:
            item.add_marker(pytest.mark.unit)
            marks.add("unit")
        if "timeout" not in marks:
            item.add_marker(pytest.mark.timeout(tier_timeout(marks)))


def tier_timeout(marks: set[str]) -> int:
    """The per-test limit for a test with these marks: the largest of its tiers' (see :data:`TIER_TIMEOUT_S`)."""
    limits = [TIER_TIMEOUT_S[mark] for mark in marks if mark in TIER_TIMEOUT_S]
    if not limits:
        raise pytest.UsageError(f"no tier among the marks {sorted(marks)}: add the tier to TIER_TIMEOUT_S")
    return max(limits)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    # These machines have 2 cores; more threads only contend.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def datasets() -> Path:
    if not DATASETS.is_dir():
        pytest.fail(f"the shared datasets are missing at {DATASETS}")
    return DATASETS


@pytest.fixture(scope="session")
def models():  # type: ignore[no-untyped-def]
    """The configured (default: the default) detector + embedder, loaded once and shared by the tests."""
    from serve_app.settings import RecognitionSettings, load_models

    return load_models(RecognitionSettings())


@pytest.fixture(scope="session")
def real_faces(models):  # type: ignore[no-untyped-def]
    """(people, enrolled embeddings, held-out embeddings) of up to 80 LFW people with two photos or more: one photo
    of each enrolled, another held out as that person's query."""
    from collections import defaultdict

    import numpy as np

    from serve_app.model.enrollment import embed_for_enrolment

    by_person: dict[str, list[Path]] = defaultdict(list)
    for path in sorted((LFW / "images").glob("*/*.jpg")):
        by_person[path.parent.name].append(path)
    people = [p for p, paths in sorted(by_person.items()) if len(paths) >= 2][:80]
    photos = [(f"{p}/{i}", by_person[p][i].read_bytes()) for p in people for i in (0, 1)]
    outcomes = embed_for_enrolment(models.detector, models.embedder, photos)
    found = {key: o.embedding for (key, _), o in zip(photos, outcomes, strict=True) if o.embedding is not None}
    both = [p for p in people if f"{p}/0" in found and f"{p}/1" in found]
    assert len(both) >= 60, "too few LFW people embedded"
    return both, np.stack([found[f"{p}/0"] for p in both]), np.stack([found[f"{p}/1"] for p in both])
