"""``facerec gallery show | reembed | drop``: a store's snapshots (one per model), a model change, its clean-up.

A store (a directory or ``s3://bucket/prefix``) keeps one snapshot per embedding model beside the face chips they
share (see :mod:`serve_app.gallery_store`). ``reembed`` writes the snapshot of another checkpoint from the chips,
keeping every face id; the running service then switches to it with ``serve deploy`` (README, "Changing the
model"); ``drop`` deletes a snapshot nobody will roll back to.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm import tqdm

from serve_app.gallery_journal import load_gallery
from serve_app.gallery_store import GalleryStore, GalleryStoreError, open_gallery_store
from serve_app.model.embedder import Embedder
from serve_app.model.gallery import Gallery, GalleryError
from serve_app.settings import RecognitionSettings
from serve_app.snapshot_reembed import faces_to_embed, load_snapshot, reembed_snapshot, source_model

log = logging.getLogger("facerec")

EXIT_BAD_INPUT = 2


def emit(document: object) -> None:
    print(json.dumps(document), flush=True)


def show(gallery: str, model: str | None = None, chips_dir: Path | None = None) -> int:
    """Every snapshot in the store (model id, revision, faces, people); the chosen one (``model``, or the only one)
    in detail; with ``chips_dir``, its faces' chips written to ``chips_dir/<person>/<face id>.jpg``."""
    try:
        store = open_gallery_store(gallery)
        infos = store.snapshots()
        if not infos:
            raise GalleryError(f"no gallery in {gallery}")
        chosen = _choose(infos_ids := [i.model_id for i in infos], model)
        snapshots = []
        loaded: Gallery | None = None
        for info in infos:
            snapshot = load_gallery(store.for_model(info.model_id), info.model_id)  # its base and changes
            if snapshot is None:
                continue
            snapshots.append(
                {"model_id": info.model_id, "revision": snapshot.revision, "faces": len(snapshot), "key": info.key}
            )
            if info.model_id == chosen:
                loaded = snapshot
        if loaded is None:
            raise GalleryError(f"no snapshot of {chosen} (the store has {', '.join(infos_ids)})")
    except (GalleryError, GalleryStoreError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    faces = loaded.faces()
    without = [{"name": name, "face_id": face_id} for name, face_id, chip in faces if not chip]
    document: dict[str, object] = {
        "model_id": loaded.model_id,
        "dim": loaded.dim,
        "revision": loaded.revision,
        "faces": len(loaded),
        "faces_with_chips": len(faces) - len(without),
        "people": loaded.people(),
        "snapshots": snapshots,
    }
    if without:
        document["faces_without_chips"] = without
    if chips_dir is not None:
        document["chips_written"] = {"directory": str(chips_dir), "count": _export_chips(store, loaded, chips_dir)}
    emit(document)
    return 0


def _choose(models: list[str], wanted: str | None) -> str:
    if wanted is not None:
        return wanted
    if len(models) > 1:
        raise GalleryError(f"the store has snapshots of {', '.join(models)}: choose one with --model")
    return models[0]


def _export_chips(store: GalleryStore, gallery: Gallery, chips_dir: Path) -> int:
    written = 0
    for name, face_id, _ in tqdm([f for f in gallery.faces() if f[2]], desc="exporting chips", unit="face"):
        data = store.read_chip(face_id)
        if data is None:
            log.warning("%s: the chip of face %s is missing from the store", name, face_id)
            continue
        target = chips_dir / safe_folder(name) / f"{face_id}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written += 1
    return written


def safe_folder(name: str) -> str:
    """A person's name as a folder name (names may hold spaces and apostrophes, never a path separator)."""
    return name.replace("/", "_").replace("\\", "_").strip(". ") or "_"


def reembed(settings: RecognitionSettings, gallery: str, source: str | None = None) -> int:
    """Write the snapshot of ``settings``' model from the chips of the store's other snapshot (``source``).

    Resumable: progress is saved as it goes, and a second run embeds only what the first did not finish. The
    source snapshot is not changed."""
    started = time.perf_counter()
    try:
        target_model = settings.model_id
        store = open_gallery_store(gallery)
        from_model = source_model(store, target_model, source)
        source_gallery = load_snapshot(store.for_model(from_model))
        if source_gallery is None:
            raise GalleryError(f"no snapshot of {from_model}")
        checkpoint = settings.resolved_checkpoint()
        total = faces_to_embed(store, source_gallery, target_model, checkpoint.dim)
        embedder = Embedder(
            checkpoint,
            flip=settings.flip,
            max_batch=settings.max_embed_batch,
            precision=settings.embed_precision,
        )
        with tqdm(total=total, desc=f"re-embedding into {target_model}", unit="face") as bar:
            report = reembed_snapshot(store, source_gallery, embedder, progress=bar.update)
    except (GalleryError, GalleryStoreError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    seconds = time.perf_counter() - started
    for name, face_id in report.without_chip:
        log.warning("%s: face %s has no chip (a legacy import): left out of %s", name, face_id, target_model)
    emit(
        {
            **report.as_dict(),
            "target_threshold": settings.verification_threshold,
            "snapshot": store.for_model(target_model).describe(),
            "seconds": round(seconds, 1),
            "next": f"set recognition.checkpoint to {settings.checkpoint} and run serve deploy",
        }
    )
    return 0


def drop(gallery: str, model: str) -> int:
    """Delete ``model``'s snapshot (after a model change is confirmed): the chips stay for the other snapshots."""
    try:
        store = open_gallery_store(gallery).for_model(model)
        if model not in [info.model_id for info in store.snapshots()]:
            raise GalleryError(f"no snapshot of {model} in {gallery}")
        where = store.describe()
        store.drop_snapshot()
        store.delete_partial()
    except (GalleryError, GalleryStoreError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    emit({"dropped": model, "snapshot": where})
    return 0
