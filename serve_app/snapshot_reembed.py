"""Re-embedding a store's snapshot with another checkpoint: the target model's snapshot, beside the source's.

Used by ``facerec gallery reembed`` and by the GalleryWriter's ``reembed`` operation alike. Progress is saved to
the target's partial snapshot (``models/<model id>.partial.npz``, never served) every ``save_every`` faces, so a
run that crashes resumes where it stopped; the finished snapshot replaces the target's in one write, and the
source's stays as it was (for a rollback) until an operator drops it. Run it before the target model serves: a
GalleryWriter of the target model writes that snapshot too, and its changes made during a run are not merged.
"""

from __future__ import annotations

from collections.abc import Callable

from serve_app.gallery_journal import load_gallery
from serve_app.gallery_store import GalleryStore
from serve_app.model.embedder import Embedder
from serve_app.model.gallery import Gallery, GalleryError
from serve_app.model.reembedding import CarryOverReport, carry_over, chip_embedder, plan_carry_over


def load_snapshot(store: GalleryStore) -> Gallery | None:
    """The bound model's gallery: its snapshot and the changes after it (``None`` while it has neither)."""
    if store.model_id is None:
        data = store.read()
        return None if data is None else Gallery.from_bytes(data)
    return load_gallery(store, store.model_id)


def source_model(store: GalleryStore, target_model: str, named: str | None = None) -> str:
    """The snapshot to re-embed from: ``named``, or the store's only snapshot of another model."""
    others = [info.model_id for info in store.snapshots() if info.model_id != target_model]
    if named is not None:
        if named == target_model:
            raise GalleryError(f"{named} is the target model itself")
        if named not in others:
            raise GalleryError(f"no snapshot of {named} in the store (it has: {', '.join(others) or 'none'})")
        return named
    if len(others) != 1:
        raise GalleryError(
            f"the store has {len(others)} snapshots of other models ({', '.join(others) or 'none'}): "
            "name the one to re-embed from"
        )
    return others[0]


def faces_to_embed(store: GalleryStore, source: Gallery, target_model: str, dim: int) -> int:
    """How many faces a re-embedding would embed now (for a progress bar's total)."""
    return len(plan_carry_over(source, _start(store.for_model(target_model), target_model, dim)).to_embed)


def reembed_snapshot(
    store: GalleryStore,
    source: Gallery,
    embedder: Embedder,
    *,
    progress: Callable[[int], None] | None = None,
    save_every: int = 1024,
    batch_size: int = 64,
) -> CarryOverReport:
    """Carry ``source`` (a snapshot of ``store``) over to ``embedder``'s model and store the result."""
    if source.model_id == embedder.model_id:
        raise GalleryError(f"the snapshot is already of {embedder.model_id}")
    target_store = store.for_model(embedder.model_id)
    target = _start(target_store, embedder.model_id, embedder.dim)
    report = carry_over(
        source,
        target,
        store.read_chip,
        chip_embedder(embedder),
        batch_size=batch_size,
        progress=progress,
        save=lambda partial: target_store.write_partial(partial.to_bytes()),
        save_every=save_every,
    )
    target_store.write_gallery(target)
    target_store.delete_partial()
    return report


def _start(target_store: GalleryStore, model_id: str, dim: int) -> Gallery:
    """Where an interrupted run left off, else the target's snapshot (a rollback target catching up), else empty.

    A partial grows from the snapshot it started from, so its revision is at least that snapshot's; a snapshot
    newer than the partial (its model's writer changed it since) wins, and the partial is left behind."""
    partial_data = target_store.read_partial()
    partial = None if partial_data is None else Gallery.from_bytes(partial_data, expected_model_id=model_id)
    snapshot = load_gallery(target_store, model_id, dim)
    if partial is not None and (snapshot is None or partial.revision >= snapshot.revision):
        return partial
    return snapshot if snapshot is not None else Gallery(model_id, dim)
