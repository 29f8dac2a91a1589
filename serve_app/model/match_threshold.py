"""Which similarity names a face: a fixed threshold, or one held to a false-accept rate at the gallery's size.

Identification compares a stranger with everybody enrolled, so a fixed threshold names more strangers as the
gallery grows (see :mod:`serve_app.model.open_set`). With ``false_accept_rate`` set, the threshold is derived
from the checkpoint's shipped impostor calibration and the number of people enrolled, every time the gallery
changes, so that the chance that a stranger is named as anyone stays at the target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from serve_app.model.open_set import (
    MAX_SIMILARITY,
    Calibration,
    calibration_path,
    load_calibration,
    threshold_for_far,
)

log = logging.getLogger(f"ray.serve.{__name__}")

ThresholdSource = Literal["fixed", "false_accept_rate", "request"]


@dataclass(frozen=True)
class MatchThreshold:
    """The threshold one answer used, and why (it travels with the answer)."""

    value: float
    #: ``fixed``: configured (or the checkpoint's verification threshold); ``false_accept_rate``: derived for the
    #: gallery's size; ``request``: the client asked for it.
    source: ThresholdSource
    false_accept_rate: float | None = None
    gallery_people: int | None = None
    #: How far the best person must lead the second-best for a name (0: no margin rule).
    min_margin: float = 0.0


@dataclass(frozen=True)
class ThresholdRule:
    """A fixed threshold, or a target false-accept rate with the calibration it is derived from; and a margin."""

    fixed: float
    false_accept_rate: float | None = None
    calibration: Calibration | None = None
    min_margin: float = 0.0

    def __post_init__(self) -> None:
        if (self.false_accept_rate is None) != (self.calibration is None):
            raise ValueError("a false-accept rate needs its calibration, and only then")

    def for_gallery(self, people: int) -> MatchThreshold:
        """The threshold for a gallery of ``people`` enrolled people."""
        if self.false_accept_rate is None or self.calibration is None:
            return MatchThreshold(self.fixed, "fixed", min_margin=self.min_margin)
        value = threshold_for_far(self.calibration, self.false_accept_rate, max(1, people))
        if value >= MAX_SIMILARITY:
            # Not an error (strangers do stay out), but nobody enrolled can be named either: say so loudly.
            log.warning(
                "false_accept_rate %g cannot be held with %d people enrolled: the derived threshold is %.2f, so "
                "every face answers Unknown; raise recognition.false_accept_rate or set recognition.threshold",
                self.false_accept_rate,
                people,
                value,
            )
        return MatchThreshold(value, "false_accept_rate", self.false_accept_rate, people, self.min_margin)


@lru_cache(maxsize=8)
def shipped_calibration(checkpoint: str, flip: bool, model_id: str) -> Calibration:
    """The impostor calibration shipped beside a checkpoint (read once per process)."""
    return load_calibration(calibration_path(checkpoint, flip), expected_model_id=model_id)


def threshold_rule(
    *,
    fixed: float,
    false_accept_rate: float | None,
    checkpoint: str,
    flip: bool,
    model_id: str,
    min_margin: float = 0.0,
) -> ThresholdRule:
    """The rule the settings ask for. A configured ``threshold`` wins over a false-accept rate (the caller passes
    ``false_accept_rate=None`` then); a rate needs the checkpoint's calibration file."""
    if false_accept_rate is None:
        return ThresholdRule(fixed, min_margin=min_margin)
    calibration = shipped_calibration(checkpoint, flip, model_id)
    return ThresholdRule(fixed, false_accept_rate, calibration, min_margin)
