"""A match threshold chosen by false-accept rate and gallery size, from a calibration of impostor scores.

Why the gallery size matters: a stranger (someone never enrolled) is compared with every enrolled person, and is
named as someone if the best of those comparisons reaches the threshold. With ``N`` people enrolled and ``F`` the
distribution of one impostor comparison's cosine similarity, the chance that a stranger is falsely accepted is

    FAR(t, N) = P(max over N people >= t) = 1 - (1 - p(t)) ** N,    p(t) = 1 - F(t) = P(one impostor score >= t)

so a threshold that keeps strangers out of an 8-person gallery lets them in at 10,000 people. For a target ``far``
the per-comparison rate must be ``p = 1 - (1 - far) ** (1 / N)`` (about ``far / N``) and the threshold is the
impostor-score quantile with that exceedance: :func:`threshold_for_far`. The inverse, the false-accept rate a
fixed threshold gives at a gallery size, is :func:`far_at_threshold`.

Assumptions, and which way each one errs:

* **People, not faces.** ``gallery_size`` counts independent comparisons. A person enrolled with several faces
  is scored by the best of them (``Gallery.match``), and those faces are of one person, so strongly correlated:
  the model counts such a person as one comparison. Passing the number of enrolled *faces* instead treats the
  faces as independent, an upper bound on the false-accept rate (a higher, conservative threshold). Measured on
  LFW View 1 (``facenet-keras-128``, 364 people enrolled with 2 photos each, 3,611 stranger photos), counting
  people matched the strangers' false-accept rate (0.138 measured vs 0.144 predicted at t = 0.55, 0.022 vs 0.023
  at 0.65); counting faces predicted twice as many.
* **Independent comparisons.** Some strangers resemble many people at once (their scores are correlated across
  the gallery). For a fixed overall ``p``, such a mixture of strangers has ``E[1 - (1 - p_s) ** N] <=
  1 - (1 - E[p_s]) ** N`` (Jensen), so the model over-states the false-accept rate: the threshold errs high.
  Measured: close at small ``N`` or small rates (t = 0.70: 0.0015 vs 0.0022 at N = 100, 0.012 vs 0.023 at
  N = 1,049), up to twice the measured rate where ``N * p`` is large (t = 0.60, N = 1,049: 0.073 vs 0.161).
* **The calibration photos resemble the service's.** The shipped calibrations come from LFW View 1 DevTrain
  (deep-funneled photos of public figures, ``facerec calibrate far``). Another population (ages, ethnicities,
  image quality) has another impostor distribution: recalibrate on photos like the service's own.
* **Calibration pairs are not independent**: every photo appears in thousands of pairs, so the effective sample is
  nearer the number of photos than the number of pairs, and the far tail is estimated less precisely than the
  pair count suggests.

The quantile: where at least :data:`MIN_TAIL_COUNT` calibration scores lie above it, it is the empirical one
(rank ``p * n`` among the ``n`` scores sorted from the top, interpolated in log ``p``). Beyond that - small ``p``,
so large galleries or small targets - an exponential upper tail fitted to the top :data:`TAIL_FIT_COUNT` scores
(their mean excess) carries the quantile on, joined continuously to the empirical part, so thresholds stay finite
and grow monotonically with ``N`` and as the target falls. They are capped at 1.0, the largest cosine similarity:
a threshold of 1.0 says that no threshold keeps the target at that gallery size, and nobody is matched.

Why exponential and not a fitted generalised Pareto shape: cosine scores are bounded, so the tail's fitted shape
is negative (about -0.05 to -0.1 for ``facenet-keras-128``), and extrapolating with it under-stated the real tail.
Fitted on a quarter of the LFW DevTrain people (~360k impostor pairs) and compared with the empirical quantile of
all 5.9M pairs, the Pareto fit fell 0.02-0.04 below it at ``p = 1.7e-5`` in three of four draws (too low a
threshold: more strangers accepted than promised); the exponential one landed within -0.01..+0.03 of it at
``p = 3e-5`` and ``1.7e-5``. Impostor scores are a mixture (some groups of faces resemble one another more, and
LFW has a few people under two names), which makes the far tail heavier than the near tail's shape suggests. The
exponential tail errs high for a light-tailed mixture component, which is the safe side for strangers.
``fit_tail(..., model="gpd")`` keeps the Pareto fit for comparison.

The shipped calibrations (``facenet-keras-128``, ``facenet-keras-128+flip``, ``casia-webface-512``) were made from
LFW View 1 DevTrain only, every pair of its 3,443 photos of different people (about 5.9M pairs; DevTest's people
stay unseen for evaluation), by::

    L=../shared/datasets/lfw-view1
    facerec calibrate far --images $L/images --pairs $L/pairsDevTrain.txt --checkpoint facenet-keras-128 [--flip]

Calibration file (JSON, about 13 kB; one per checkpoint and flip setting, in ``serve_app/model/calibration/``, see
:func:`calibration_path`)::

    {"format": "facerec-impostor-calibration", "version": 1,
     "checkpoint": "facenet-keras-128", "model_id": "facenet-keras-ms-celeb-128-v1", "flip": false,
     "comparisons": 5923194,          # impostor scores summarised (n)
     "top_scores": [...],             # the highest scores, descending: score i (0-based) has exceedance (i+1)/n
     "body": {"exceedance": [...], "score": [...]},   # quantile knots below the top scores, exceedance ascending
     "source": {...}}                 # how it was made: photo folder, pair list, photos, people, precision
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np

FORMAT_NAME = "facerec-impostor-calibration"
FORMAT_VERSION = 1
#: Where the shipped calibrations live, beside the checkpoint registry (``checkpoints.py``).
CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration"
#: A quantile is read off the data only where at least this many scores lie above it (relative error of its
#: exceedance about 1/sqrt(100) = 10% for independent samples); beyond, the fitted tail takes over.
MIN_TAIL_COUNT = 100
#: The generalised Pareto tail is fitted to this many top scores (and the file stores them exactly).
TAIL_FIT_COUNT = 1000
#: Exceedance levels of the stored body knots: every percent, then log-spaced down to the top scores.
_BODY_LINEAR_LEVELS = 100
_BODY_LOG_LEVELS = 120
#: Cosine similarity of L2-normalised vectors never exceeds 1: no threshold above it means anything.
MAX_SIMILARITY = 1.0


class CalibrationError(ValueError):
    """A calibration file or its input is unusable (wrong format, too few scores, another model)."""


@dataclass(frozen=True)
class TailFit:
    """An upper tail: ``P(S >= x) = p_u * (1 + shape * (x - u) / scale) ** (-1 / shape)`` (``shape = 0``:
    ``p_u * exp(-(x - u) / scale)``)."""

    #: Where the tail starts (``u``), and the fraction of all impostor scores above it (``p_u``).
    start: float
    start_exceedance: float
    scale: float
    #: ``0``: exponential tail (the default fit); ``< 0``: bounded generalised Pareto tail.
    shape: float

    def quantile(self, exceedance: float) -> float:
        """The score ``x`` with ``P(S >= x) = exceedance`` (for ``exceedance <= start_exceedance``)."""
        ratio = exceedance / self.start_exceedance
        if self.shape == 0.0:
            return self.start - self.scale * math.log(ratio)
        return self.start + self.scale / self.shape * (float(ratio ** (-self.shape)) - 1.0)

    def exceedance(self, score: float) -> float:
        """``P(S >= score)`` under the tail model (``score >= start``); 0 beyond a bounded tail's end."""
        excess = score - self.start
        if self.shape == 0.0:
            return self.start_exceedance * math.exp(-excess / self.scale)
        base = 1.0 + self.shape * excess / self.scale
        return 0.0 if base <= 0.0 else self.start_exceedance * float(base ** (-1.0 / self.shape))

    @property
    def upper_end(self) -> float:
        """The largest score the tail allows (``inf`` for an exponential tail)."""
        return math.inf if self.shape == 0.0 else self.start - self.scale / self.shape


TailModel = Literal["exponential", "gpd"]


def fit_tail(top_scores: np.ndarray, comparisons: int, model: TailModel = "exponential") -> TailFit:
    """Fit an upper tail to the highest scores (descending) of ``comparisons`` impostor scores.

    ``exponential``: scale = mean excess over the lowest of the top scores (its maximum-likelihood estimate).
    ``gpd``: a generalised Pareto tail by probability-weighted moments (Hosking & Wallis 1987, Technometrics
    29:339), closed form and better behaved than maximum likelihood for a thousand exceedances; a heavy shape
    (> 0) falls back to the exponential, because similarities are bounded. See the module docstring for why the
    exponential is the default.
    """
    scores = np.asarray(top_scores, dtype=np.float64)
    if len(scores) < 3:
        raise CalibrationError(f"at least 3 top scores are needed to fit a tail, got {len(scores)}")
    start = float(scores[-1])
    excesses = np.sort(scores[:-1] - start)  # ascending, >= 0
    count = len(excesses)
    mean = float(excesses.mean())
    if mean <= 0.0:
        raise CalibrationError("the top impostor scores are all equal: no tail to fit")
    shape, scale = 0.0, mean
    if model == "gpd":
        plotting_positions = (np.arange(1, count + 1) - 0.35) / count
        weighted = float(np.mean((1.0 - plotting_positions) * excesses))
        pwm_shape = -(mean / (mean - 2.0 * weighted) - 2.0)  # Hosking's k is minus the shape
        pwm_scale = 2.0 * mean * weighted / (mean - 2.0 * weighted)
        if pwm_shape < 0.0 and pwm_scale > 0.0:
            # A shape below -1 would mean a density that grows towards its end point: not a tail we believe.
            shape, scale = max(pwm_shape, -1.0), pwm_scale
    return TailFit(start=start, start_exceedance=count / comparisons, scale=scale, shape=shape)


@dataclass(frozen=True, eq=False)  # arrays inside: compare calibrations by their fields, not with ==
class Calibration:
    """Impostor cosine scores of one checkpoint (and flip setting), summarised as quantile knots and a top tail."""

    checkpoint: str
    model_id: str
    flip: bool
    #: How many impostor scores were summarised (``n``).
    comparisons: int
    #: The highest scores, descending; score ``i`` (0-based) has empirical exceedance ``(i + 1) / n``.
    top_scores: np.ndarray
    #: Quantile knots below the top scores: exceedance ascending, score descending.
    body_exceedance: np.ndarray
    body_scores: np.ndarray
    source: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.comparisons < len(self.top_scores) or len(self.top_scores) < 3:
            raise CalibrationError("a calibration needs at least 3 top scores and no more than its comparisons")
        if np.any(np.diff(self.top_scores) > 0) or np.any(np.diff(self.body_scores) > 0):
            raise CalibrationError("calibration scores must be in descending order")
        if len(self.body_exceedance) != len(self.body_scores) or np.any(np.diff(self.body_exceedance) <= 0):
            raise CalibrationError("body knots must pair exceedances (ascending) with scores")

    # --- the impostor score distribution ---------------------------------------------------------------------
    @cached_property
    def tail(self) -> TailFit:
        return fit_tail(self.top_scores, self.comparisons)

    @cached_property
    def _knots(self) -> tuple[np.ndarray, np.ndarray]:
        """All knots as (log exceedance ascending, score descending)."""
        top_exceedance = np.arange(1, len(self.top_scores) + 1) / self.comparisons
        keep = self.body_exceedance > top_exceedance[-1]
        exceedance = np.concatenate([top_exceedance, self.body_exceedance[keep]])
        scores = np.concatenate([self.top_scores, self.body_scores[keep]])
        return np.log(exceedance), scores.astype(np.float64)

    @property
    def empirical_limit(self) -> float:
        """The smallest exceedance read off the data; smaller ones come from the fitted tail."""
        return min(MIN_TAIL_COUNT, len(self.top_scores) - 1) / self.comparisons

    def quantile(self, exceedance: float) -> float:
        """The score ``t`` with ``P(one impostor score >= t) = exceedance``, capped at 1.0."""
        if not 0.0 < exceedance <= 1.0:
            raise ValueError(f"exceedance must be in (0, 1], got {exceedance}")
        log_p, scores = self._knots
        limit = self.empirical_limit
        if exceedance >= limit:
            # np.interp wants ascending x: log exceedance ascends as the score descends.
            return min(float(np.interp(math.log(exceedance), log_p, scores)), MAX_SIMILARITY)
        # Beyond the data: the fitted tail's growth from the empirical quantile at the junction, so the two
        # join without a step (a step down would make thresholds fall as the gallery grows).
        junction = float(np.interp(math.log(limit), log_p, scores))
        return min(junction + self.tail.quantile(exceedance) - self.tail.quantile(limit), MAX_SIMILARITY)

    def exceedance(self, score: float) -> float:
        """``P(one impostor score >= score)``: the inverse of :meth:`quantile`."""
        log_p, scores = self._knots
        limit = self.empirical_limit
        junction = float(np.interp(math.log(limit), log_p, scores))
        if score <= junction:
            if score <= scores[-1]:
                return 1.0
            return float(math.exp(np.interp(score, scores[::-1], log_p[::-1])))
        tail_score = score - junction + self.tail.quantile(limit)
        return self.tail.exceedance(tail_score)

    # --- persistence -----------------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The documented JSON form (scores rounded to 1e-6: far below the embedder's own noise)."""
        document = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "checkpoint": self.checkpoint,
            "model_id": self.model_id,
            "flip": self.flip,
            "comparisons": self.comparisons,
            "top_scores": [round(float(s), 6) for s in self.top_scores],
            "body": {
                "exceedance": [float(f"{p:.6g}") for p in self.body_exceedance],
                "score": [round(float(s), 6) for s in self.body_scores],
            },
            "source": dict(self.source),
        }
        return json.dumps(document, indent=None, separators=(",", ":")) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        try:
            document = json.loads(text)
            if document.get("format") != FORMAT_NAME or document.get("version") != FORMAT_VERSION:
                raise CalibrationError(
                    f"not a {FORMAT_NAME} v{FORMAT_VERSION} file: {document.get('format')!r} v{document.get('version')}"
                )
            return cls(
                checkpoint=str(document["checkpoint"]),
                model_id=str(document["model_id"]),
                flip=bool(document["flip"]),
                comparisons=int(document["comparisons"]),
                top_scores=np.asarray(document["top_scores"], dtype=np.float64),
                body_exceedance=np.asarray(document["body"]["exceedance"], dtype=np.float64),
                body_scores=np.asarray(document["body"]["score"], dtype=np.float64),
                source=dict(document.get("source", {})),
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CalibrationError(f"not a calibration file: {exc}") from exc

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path


def load_calibration(path: Path, expected_model_id: str | None = None) -> Calibration:
    """Read a calibration file; refuse one made for another embedding space than ``expected_model_id``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration {path}: {exc}") from exc
    calibration = Calibration.from_json(text)
    if expected_model_id is not None and calibration.model_id != expected_model_id:
        raise CalibrationError(
            f"{path} calibrates {calibration.model_id!r}, but the embeddings come from {expected_model_id!r}"
        )
    return calibration


def calibration_path(checkpoint: str, flip: bool, directory: Path = CALIBRATION_DIR) -> Path:
    """Where the calibration of a checkpoint lives: ``<directory>/<checkpoint-name>[+flip].json``.

    A checkpoint given as a ``.pt`` path is named by its file stem.
    """
    name = Path(checkpoint).stem if checkpoint.endswith(".pt") else checkpoint
    return directory / f"{name}{'+flip' if flip else ''}.json"


# --- the threshold ---------------------------------------------------------------------------------------------
def per_comparison_rate(target_far: float, gallery_size: int) -> float:
    """The per-comparison exceedance ``p`` with ``1 - (1 - p) ** N = target_far`` (computed without cancellation)."""
    _check_rate(target_far)
    if gallery_size < 1:
        raise ValueError(f"gallery_size must be >= 1, got {gallery_size}")
    return -math.expm1(math.log1p(-target_far) / gallery_size)


def threshold_for_far(calibration: Calibration, target_far: float, gallery_size: int) -> float:
    """The cosine threshold at which a stranger is named as one of ``gallery_size`` people with ``target_far``.

    ``gallery_size`` counts enrolled people (see the module docstring for why, and for the conservative
    alternative of counting faces). Grows with the gallery and as the target falls; at most 1.0.
    """
    return calibration.quantile(per_comparison_rate(target_far, gallery_size))


def far_at_threshold(calibration: Calibration, threshold: float, gallery_size: int) -> float:
    """The chance that a stranger reaches ``threshold`` against at least one of ``gallery_size`` people."""
    if gallery_size < 1:
        raise ValueError(f"gallery_size must be >= 1, got {gallery_size}")
    p = calibration.exceedance(threshold)
    if p >= 1.0:
        return 1.0
    return -math.expm1(gallery_size * math.log1p(-p))


def _check_rate(rate: float) -> None:
    if not 0.0 < rate < 1.0:
        raise ValueError(f"a false-accept rate must be in (0, 1), got {rate}")


# --- making a calibration ----------------------------------------------------------------------------------------
def impostor_scores(embeddings: np.ndarray, people: Sequence[str], block: int = 1024) -> np.ndarray:
    """Cosine similarity of every pair of photos of different people (each unordered pair once), float32.

    ``embeddings`` are L2-normalised rows; ``people[i]`` is the person in photo ``i``. Computed a block of rows at
    a time so that memory stays at ``block x photos`` similarities plus the result.
    """
    vectors = np.asarray(embeddings, dtype=np.float32)
    labels = np.unique(np.asarray(people, dtype=np.str_), return_inverse=True)[1]
    if len(vectors) != len(labels):
        raise CalibrationError(f"{len(vectors)} embeddings but {len(labels)} labels")
    parts = []
    for start in range(0, len(vectors), block):
        rows = slice(start, min(start + block, len(vectors)))
        similarity = vectors[rows] @ vectors.T
        row_index = np.arange(rows.start, rows.stop)[:, None]
        column_index = np.arange(len(vectors))[None, :]
        # Upper triangle only (each pair once), and only pairs of different people.
        keep = (column_index > row_index) & (labels[rows][:, None] != labels[None, :])
        parts.append(similarity[keep])
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)


def summarize_scores(
    scores: np.ndarray,
    *,
    checkpoint: str,
    model_id: str,
    flip: bool,
    source: Mapping[str, object] | None = None,
    top_count: int = TAIL_FIT_COUNT,
) -> Calibration:
    """A :class:`Calibration` from raw impostor scores: the top ``top_count`` exactly, the rest as quantile knots."""
    values = np.sort(np.asarray(scores, dtype=np.float64))[::-1]  # descending
    count = len(values)
    if count < 10 * MIN_TAIL_COUNT:
        raise CalibrationError(f"{count} impostor scores are too few: use at least {10 * MIN_TAIL_COUNT}")
    top = min(top_count, count // 10)
    top_exceedance = top / count
    levels = np.unique(
        np.concatenate(
            [
                np.geomspace(top_exceedance, 0.01, _BODY_LOG_LEVELS) if top_exceedance < 0.01 else [],
                np.linspace(0.01, 1.0, _BODY_LINEAR_LEVELS),
            ]
        )
    )
    levels = levels[levels > top_exceedance]
    # The same rank rule as the top scores: exceedance p <-> rank p * n from the top (1-based), interpolated.
    ranks = levels * count - 1.0
    body = np.interp(ranks, np.arange(count, dtype=np.float64), values)
    return Calibration(
        checkpoint=checkpoint,
        model_id=model_id,
        flip=flip,
        comparisons=count,
        top_scores=values[:top].copy(),
        body_exceedance=levels,
        body_scores=body,
        source=dict(source or {}),
    )
