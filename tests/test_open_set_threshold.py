"""Thresholds from a target false-accept rate and the gallery size: the model, the tail fit, the files."""

from __future__ import annotations

import logging
import math
import statistics
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from serve_app.model.checkpoints import CHECKPOINTS
from serve_app.model.match_threshold import ThresholdRule
from serve_app.model.open_set import (
    CALIBRATION_DIR,
    Calibration,
    CalibrationError,
    calibration_path,
    far_at_threshold,
    fit_tail,
    impostor_scores,
    load_calibration,
    per_comparison_rate,
    summarize_scores,
    threshold_for_far,
)

SIZES = [1, 2, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000]
#: Impostor-like scores with a known distribution, so that the tail extrapolation can be checked against truth.
TRUE = statistics.NormalDist(0.1, 0.1)


@pytest.fixture(scope="module")
def normal_scores() -> np.ndarray:
    return np.random.default_rng(0).normal(TRUE.mean, TRUE.stdev, 400_000)


@pytest.fixture(scope="module")
def calibration(normal_scores: np.ndarray) -> Calibration:
    return summarize_scores(normal_scores, checkpoint="test", model_id="test-model", flip=False)


def test_per_comparison_rate_solves_the_max_of_n_model() -> None:
    assert per_comparison_rate(0.01, 1) == pytest.approx(0.01)
    for n in SIZES:
        p = per_comparison_rate(0.001, n)
        assert 1.0 - (1.0 - p) ** n == pytest.approx(0.001, rel=1e-6)
    assert per_comparison_rate(0.001, 10**7) == pytest.approx(1e-10, rel=1e-3)  # about far / N, no cancellation
    with pytest.raises(ValueError):
        per_comparison_rate(0.0, 10)
    with pytest.raises(ValueError):
        per_comparison_rate(0.01, 0)


def test_threshold_grows_with_gallery_size_and_with_a_lower_target(calibration: Calibration) -> None:
    for far in (0.1, 0.01, 0.001, 1e-4):
        thresholds = [threshold_for_far(calibration, far, n) for n in SIZES]
        assert all(b > a for a, b in pairwise(thresholds)), (far, thresholds)
        assert all(math.isfinite(t) and t <= 1.0 for t in thresholds)
    for n in SIZES:
        by_target = [threshold_for_far(calibration, far, n) for far in (0.1, 0.01, 0.001, 1e-4)]
        assert all(b > a for a, b in pairwise(by_target)), (n, by_target)


def test_threshold_is_monotonic_across_the_junction_with_the_fitted_tail(calibration: Calibration) -> None:
    # Dense around where the empirical quantile hands over to the tail (p = 100 / n): no step down.
    limit = calibration.empirical_limit
    levels = np.geomspace(limit * 20, limit / 20, 400)
    thresholds = [calibration.quantile(float(p)) for p in levels]
    assert all(b >= a for a, b in pairwise(thresholds))


def test_threshold_equals_the_empirical_quantile_where_samples_suffice(
    calibration: Calibration, normal_scores: np.ndarray
) -> None:
    for far, n in [(0.01, 1), (0.1, 10), (0.01, 10), (0.001, 1)]:
        p = per_comparison_rate(far, n)
        assert p * len(normal_scores) >= 100
        threshold = threshold_for_far(calibration, far, n)
        # The rank rule: the score with p * n scores at or above it.
        assert threshold == pytest.approx(float(np.quantile(normal_scores, 1.0 - p)), abs=2e-4)
        assert float(np.mean(normal_scores >= threshold)) == pytest.approx(p, rel=0.02)


def test_the_fitted_tail_extrapolates_on_the_safe_side(calibration: Calibration) -> None:
    # 400k samples are read off down to p = 2.5e-4; at N = 10^7 and FAR 0.001 the model needs p = 1e-10. A normal
    # tail is lighter than the exponential one fitted to it: the threshold errs high (fewer strangers accepted).
    for far, n in [(0.001, 1_000), (0.001, 100_000), (0.001, 10_000_000)]:
        p = per_comparison_rate(far, n)
        truth = TRUE.inv_cdf(1.0 - p)
        assert truth - 0.005 <= threshold_for_far(calibration, far, n) <= truth + 0.2


def test_far_at_threshold_inverts_threshold_for_far(calibration: Calibration) -> None:
    for far in (0.01, 0.001):
        for n in (10, 1_000, 100_000):
            threshold = threshold_for_far(calibration, far, n)
            assert far_at_threshold(calibration, threshold, n) == pytest.approx(far, rel=0.02)
    # The same threshold lets more strangers through a larger gallery.
    rates = [far_at_threshold(calibration, 0.45, n) for n in SIZES]
    assert all(b > a for a, b in pairwise(rates[:6])) and all(b >= a for a, b in pairwise(rates))
    assert rates[-1] <= 1.0
    assert far_at_threshold(calibration, -1.0, 10) == 1.0


def test_tail_fit_recovers_known_tails() -> None:
    rng = np.random.default_rng(1)
    exponential = np.sort(rng.exponential(0.05, 1_000_000))[::-1][:1000]
    fit = fit_tail(exponential, 1_000_000)
    assert fit.shape == 0.0 and fit.scale == pytest.approx(0.05, rel=0.1)
    assert fit.exceedance(fit.quantile(1e-7)) == pytest.approx(1e-7)
    assert fit_tail(exponential, 1_000_000, model="gpd").shape > -0.1
    # A bounded distribution (uniform on [0, 1]): the Pareto fit finds a negative shape and the end point, 1.
    bounded = fit_tail(np.sort(rng.random(1_000_000))[::-1][:1000], 1_000_000, model="gpd")
    assert bounded.shape < -0.5 and bounded.upper_end == pytest.approx(1.0, abs=0.01)
    assert bounded.exceedance(bounded.quantile(1e-5)) == pytest.approx(1e-5)


def test_json_round_trip_is_small_and_checked(calibration: Calibration, tmp_path: Path) -> None:
    text = calibration.to_json()
    assert len(text) < 100_000
    again = Calibration.from_json(text)
    for far, n in [(0.01, 10), (0.001, 10_000), (0.001, 10_000_000)]:
        # Scores are stored to 1e-6; the extrapolated tail moves by less than 1e-4 with that rounding.
        assert threshold_for_far(again, far, n) == pytest.approx(threshold_for_far(calibration, far, n), abs=1e-4)
    path = calibration.save(tmp_path / "c.json")
    assert load_calibration(path, expected_model_id="test-model").comparisons == calibration.comparisons
    with pytest.raises(CalibrationError, match="embeddings come from"):
        load_calibration(path, expected_model_id="other-model")
    with pytest.raises(CalibrationError):
        Calibration.from_json('{"format": "something-else", "version": 1}')
    with pytest.raises(CalibrationError):
        Calibration.from_json("not json")
    with pytest.raises(CalibrationError):
        load_calibration(tmp_path / "missing.json")


def test_too_few_scores_are_refused() -> None:
    with pytest.raises(CalibrationError):
        summarize_scores(np.linspace(0, 1, 500), checkpoint="x", model_id="x", flip=False)


def test_impostor_scores_are_every_different_person_pair_once() -> None:
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(9, 4)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    people = ["a", "a", "b", "c", "c", "c", "d", "e", "e"]
    expected = sorted(
        float(vectors[i] @ vectors[j]) for i in range(9) for j in range(i + 1, 9) if people[i] != people[j]
    )
    scores = impostor_scores(vectors, people, block=4)  # blocks smaller than the set: the seams are covered
    assert len(scores) == 36 - (1 + 3 + 1)
    assert np.allclose(sorted(scores.tolist()), expected, atol=1e-6)


def test_calibration_path_names() -> None:
    assert calibration_path("facenet-keras-128", False) == CALIBRATION_DIR / "facenet-keras-128.json"
    assert calibration_path("facenet-keras-128", True) == CALIBRATION_DIR / "facenet-keras-128+flip.json"
    assert calibration_path("/models/mine.pt", False, Path("/c")) == Path("/c/mine.json")


@pytest.mark.parametrize(
    ("checkpoint", "flip"), [("facenet-keras-128", False), ("facenet-keras-128", True), ("casia-webface-512", False)]
)
def test_shipped_calibrations(checkpoint: str, flip: bool) -> None:
    path = calibration_path(checkpoint, flip)
    assert path.stat().st_size < 100_000
    model_id = CHECKPOINTS[checkpoint].model_id + ("+flip" if flip else "")
    shipped = load_calibration(path, expected_model_id=model_id)
    assert shipped.checkpoint == checkpoint and shipped.flip == flip
    # Made from LFW View 1 DevTrain only: every different-person pair of its 3,443 photos.
    assert shipped.source["pairs"] == "pairsDevTrain.txt" and shipped.source["photos"] == 3443
    assert shipped.comparisons > 5_000_000
    for far in (0.01, 0.001):
        thresholds = [threshold_for_far(shipped, far, n) for n in SIZES]
        assert all(b >= a for a, b in pairwise(thresholds))
        assert all(math.isfinite(t) and 0.0 < t <= 1.0 for t in thresholds)


def test_a_rate_that_cannot_be_held_is_reported(calibration: Calibration, caplog: pytest.LogCaptureFixture) -> None:
    """Where the derived threshold reaches 1.0 nobody can be named: the operator is told how to fix it."""
    rule = ThresholdRule(0.4, false_accept_rate=1e-6, calibration=calibration)
    # The module logs under Serve's logger (so a replica's log shows it); Ray stops that logger's records from
    # reaching the root logger once imported, so listen on the module's logger itself.
    logger = logging.getLogger("ray.serve.serve_app.model.match_threshold")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            small = rule.for_gallery(10)
            assert small.value < 1.0
            assert not caplog.records
            huge = rule.for_gallery(10**12)
    finally:
        logger.removeHandler(caplog.handler)
    assert huge.value == pytest.approx(1.0)
    assert huge.source == "false_accept_rate"
    # One warning (seen once or twice: through the module's logger, and through the root where Ray is not loaded).
    [message] = {record.getMessage() for record in caplog.records}
    assert "every face answers Unknown" in message
    assert f"{10**12} people enrolled" in message
