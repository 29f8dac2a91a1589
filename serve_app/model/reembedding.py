"""Carrying a gallery over to another checkpoint: every face embedded again from its chip, under the same id.

A gallery is bound to the checkpoint that embedded it (embeddings of two checkpoints live in different spaces).
Each face's chip (the aligned crop that was embedded, see :mod:`serve_app.model.chips`) is what makes a model
change cheap: the target checkpoint embeds the chips, and the target model's snapshot gets the same people and
the same face ids, so links to a face (its chip, an operator's records) survive the change.

:func:`carry_over` is a one-way sync from a source snapshot to a target snapshot, by face id:

* a face of the source that the target neither has nor has removed is embedded from its chip and added;
* a face the source has removed (its tombstone) is removed from the target too, and the tombstone kept;
* faces only the target has (enrolled there) stay.

So it is idempotent and resumable (a second run embeds only what the first did not finish), and the same step
serves the first re-embedding, the catch-up of enrolments made while the model was being switched, and a
rollback (the old model's snapshot catches up with what was enrolled and removed under the new one). Faces
without a chip (imported from the legacy app tier) cannot be embedded again: they are reported, never dropped
silently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from serve_app.model.chips import chip_tensor
from serve_app.model.embedder import Embedder
from serve_app.model.gallery import Gallery

#: What the detector crops and the embedder takes (``DetectorConfig.crop_size``); other chips are not usable.
CHIP_SHAPE = (3, 160, 160)
#: Chips read at once (a chip read from S3 is a round trip; 16 is the gallery store's connection pool).
CHIP_READERS = 16
#: Reads one face's chip (JPEG bytes; ``None`` when it is not there).
ReadChip = Callable[[str], bytes | None]
#: Embeds chips (JPEG bytes) with the target checkpoint: ``(n, dim)`` L2-normalised rows.
EmbedChips = Callable[[list[bytes]], np.ndarray]


@dataclass(frozen=True)
class CarryOverPlan:
    """What :func:`carry_over` would do, decided from the two snapshots alone."""

    #: ``(name, face id)`` of each source face to embed into the target, in the source's order.
    to_embed: list[tuple[str, str]]
    #: ``(name, face id)`` of each source face missing from the target that has no chip (legacy imports).
    without_chip: list[tuple[str, str]]
    #: Face ids the source has removed, to remove (or remember as removed) in the target.
    to_forget: frozenset[str]

    @property
    def changes_nothing(self) -> bool:
        return not self.to_embed and not self.to_forget


@dataclass
class CarryOverReport:
    source_model: str
    target_model: str
    #: Faces embedded from their chips and added to the target.
    embedded: int = 0
    #: Faces removed from the target because the source had removed them.
    removed: int = 0
    #: Source faces the target already had (embedded by an earlier run, or enrolled there).
    already: int = 0
    #: ``(name, face id)``: faces without a chip (legacy imports), left out.
    without_chip: list[tuple[str, str]] = field(default_factory=list)
    #: ``(name, face id)``: faces whose chip should exist but could not be read (removed meanwhile) or decoded, left
    #: out.
    missing_chip: list[tuple[str, str]] = field(default_factory=list)
    #: Faces still to embed after a call with a ``limit``.
    left: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "source_model": self.source_model,
            "target_model": self.target_model,
            "embedded": self.embedded,
            "removed": self.removed,
            "already": self.already,
            "without_chip": [{"name": n, "face_id": f} for n, f in self.without_chip],
            "missing_chip": [{"name": n, "face_id": f} for n, f in self.missing_chip],
            "left": self.left,
        }


class CarryOverTarget(Protocol):
    """What a carry-over changes: a gallery, or changes staged on one (the GalleryWriter's group commit)."""

    model_id: str

    def face_ids(self) -> set[str]: ...

    @property
    def removed_ids(self) -> frozenset[str]: ...

    def forget(self, face_ids: set[str] | frozenset[str]) -> int: ...

    def add_faces(
        self,
        names: Sequence[str],
        embeddings: np.ndarray,
        model_id: str,
        has_chip: Sequence[bool] | None = None,
        face_ids: Sequence[str] | None = None,
    ) -> list[str]: ...


def plan_carry_over(source: Gallery, target: CarryOverTarget) -> CarryOverPlan:
    have = target.face_ids() | target.removed_ids
    to_embed: list[tuple[str, str]] = []
    without_chip: list[tuple[str, str]] = []
    for name, face_id, has_chip in source.faces():
        if face_id in have:
            continue
        (to_embed if has_chip else without_chip).append((name, face_id))
    return CarryOverPlan(to_embed, without_chip, frozenset(source.removed_ids - target.removed_ids))


def carry_over(
    source: Gallery,
    target: CarryOverTarget,
    read_chip: ReadChip,
    embed_chips: EmbedChips,
    *,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    save: Callable[[Any], None] | None = None,
    save_every: int = 1024,
    limit: int | None = None,
    skip: frozenset[str] = frozenset(),
) -> CarryOverReport:
    """Bring ``target`` up to date with ``source`` (see the module docstring), changing ``target`` in place.

    ``progress`` is told how many faces each batch handled; ``save`` is handed ``target`` every ``save_every``
    embedded faces (a crash then loses at most that much work); ``limit`` embeds at most that many faces (the
    rest is left for the next call: a writer that must not hold its lock for minutes); ``skip`` leaves out faces
    whose chips an earlier call could not use.
    """
    plan = plan_carry_over(source, target)
    if skip:
        plan = CarryOverPlan([f for f in plan.to_embed if f[1] not in skip], plan.without_chip, plan.to_forget)
    report = CarryOverReport(source.model_id, target.model_id, without_chip=list(plan.without_chip))
    report.already = len(source) - len(plan.to_embed) - len(plan.without_chip)
    if limit is not None:
        report.left = max(0, len(plan.to_embed) - limit)
        plan = CarryOverPlan(plan.to_embed[:limit], plan.without_chip, plan.to_forget)
    if plan.to_forget:
        report.removed = target.forget(plan.to_forget)
    unsaved = 0
    batches = [plan.to_embed[start : start + batch_size] for start in range(0, len(plan.to_embed), batch_size)]
    # Chips are read (many at once: from S3 each read is a round trip) for the next batch while this one embeds.
    with ThreadPoolExecutor(CHIP_READERS) as readers, ThreadPoolExecutor(1) as prefetch:

        def usable(face_id: str) -> bytes | None:
            chip = read_chip(face_id)
            try:
                if chip is not None and tuple(chip_tensor(chip).shape) == CHIP_SHAPE:
                    return chip
            except (OSError, ValueError, SyntaxError):  # what PIL raises for bytes that are not a readable image
                pass
            return None

        def fetch(faces: list[tuple[str, str]]) -> list[tuple[str, str, bytes | None]]:
            return [
                (name, face_id, chip)
                for (name, face_id), chip in zip(faces, readers.map(usable, [f for _, f in faces]), strict=True)
            ]

        upcoming = prefetch.submit(fetch, batches[0]) if batches else None
        for index in range(len(batches)):
            assert upcoming is not None
            chips = upcoming.result()
            upcoming = prefetch.submit(fetch, batches[index + 1]) if index + 1 < len(batches) else None
            readable = [(name, face_id, chip) for name, face_id, chip in chips if chip is not None]
            report.missing_chip += [(name, face_id) for name, face_id, chip in chips if chip is None]
            if readable:
                vectors = embed_chips([chip for _, _, chip in readable])
                target.add_faces(
                    [name for name, _, _ in readable],
                    vectors,
                    target.model_id,
                    has_chip=[True] * len(readable),
                    face_ids=[face_id for _, face_id, _ in readable],
                )
                report.embedded += len(readable)
                unsaved += len(readable)
            if progress is not None:
                progress(len(chips))
            if save is not None and unsaved >= save_every:
                save(target)
                unsaved = 0
    return report


def chip_embedder(embedder: Embedder) -> EmbedChips:
    """Chips through ``embedder``: what the Recognizer would compute for the same crops."""

    def embed(chips: list[bytes]) -> np.ndarray:
        return embedder.embed(torch.stack([chip_tensor(chip) for chip in chips]))

    return embed
