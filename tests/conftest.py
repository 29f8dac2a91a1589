"""Shared fixtures: the datasets beside the repository, and the real models loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.serve_fixtures import moto_endpoint, serve_cluster

__all__ = ["moto_endpoint", "serve_cluster"]

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
    from serve_app.model.pipeline import load_models
    from serve_app.settings import RecognitionSettings

    return load_models(RecognitionSettings().checkpoint)
