"""The work behind each ``facerec`` sub-command. Each returns the process exit code."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from serve_app.evaluation.identify import (
    CachedEmbeddings,
    IdentifyEvaluation,
    IdentifySplit,
    OperatingPoint,
    build_gallery,
    evaluate_identification,
    list_photos,
    load_embedding_cache,
    operating_point,
    plot_det,
    save_embedding_cache,
    search,
    split_people,
    wilson_interval,
)
from serve_app.evaluation.lfw import EmbeddedImages, embed_lfw_images, evaluate, plot_roc, read_pairs
from serve_app.gallery_store import LocalGalleryStore
from serve_app.model.detector import centre_face
from serve_app.model.enrollment import embed_for_enrolment
from serve_app.model.gallery import Gallery, GalleryError
from serve_app.model.images import InvalidImageError, decode_image
from serve_app.model.open_set import (
    Calibration,
    CalibrationError,
    calibration_path,
    far_at_threshold,
    impostor_scores,
    load_calibration,
    summarize_scores,
    threshold_for_far,
)
from serve_app.model.pipeline import Models
from serve_app.model.recognizer import Recognizer, embed_main_faces
from serve_app.results import image_result_to_dict
from serve_app.settings import RecognitionSettings
from serve_app.snapshot_reembed import load_snapshot

log = logging.getLogger("facerec")

EXIT_BAD_INPUT = 2
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
#: The false-accept rates the open-set commands report (1% and 0.1%).
FAR_TARGETS = (0.01, 0.001)
#: How ``faces_missing`` photos were scored: what ``facerec eval`` output says about its centre-crop fallbacks.
CENTRE_CROP_HANDLING = (
    "no face candidate at all, not even below the detection threshold (a one-person photo uses its best weaker "
    "candidate): the central 45% square of the photo was embedded"
)


def emit(document: object) -> None:
    """One JSON document per line on stdout (logs and progress bars go to stderr)."""
    print(json.dumps(document), flush=True)


def _models(settings: RecognitionSettings) -> Models:
    return settings.load_models(torch_threads=settings.torch_threads)


def enroll(settings: RecognitionSettings, gallery_dir: Path, photos_dir: Path) -> int:
    if not photos_dir.is_dir():
        log.error("%s is not a directory of <person>/ sub-folders", photos_dir)
        return EXIT_BAD_INPUT
    people = sorted(p for p in photos_dir.iterdir() if p.is_dir())
    if not people:
        log.error("%s has no <person>/ sub-folders", photos_dir)
        return EXIT_BAD_INPUT
    models = _models(settings)
    # The directory keeps one snapshot per model, like the service's store: enrolling with another checkpoint
    # starts that model's snapshot beside the others.
    store = LocalGalleryStore(gallery_dir).for_model(models.embedder.model_id)
    try:
        gallery = load_snapshot(store) or Gallery(models.embedder.model_id, models.embedder.dim)
    except GalleryError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    enrolled = refused = 0
    chips = store
    for person in tqdm(people, desc="enrolling", unit="person"):
        photos = sorted(p for p in person.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        outcomes = embed_for_enrolment(models.detector, models.embedder, [(p.name, p.read_bytes()) for p in photos])
        accepted = [o for o in outcomes if o.embedding is not None]
        for outcome in outcomes:
            if outcome.refused:
                refused += 1
                log.warning("%s/%s refused: %s", person.name, outcome.label, outcome.refused)
        if accepted:
            ids = gallery.add(
                person.name,
                np.stack([o.embedding for o in accepted if o.embedding is not None]),
                models.embedder.model_id,
                [o.chip is not None for o in accepted],
            )
            # Chips first, the snapshot that names them last (as the service's GalleryWriter does).
            for face_id, outcome in zip(ids, accepted, strict=True):
                if outcome.chip is not None:
                    chips.write_chip(face_id, outcome.chip)
            enrolled += len(accepted)
    store.write(gallery.to_bytes())
    emit(
        {"gallery": str(gallery_dir), "enrolled_faces": enrolled, "refused_photos": refused, "people": gallery.people()}
    )
    return 0


def recognize(settings: RecognitionSettings, gallery_dir: Path, images: list[Path], top_k: int) -> int:
    models = _models(settings)
    try:
        gallery = load_snapshot(LocalGalleryStore(gallery_dir).for_model(models.embedder.model_id))
        if gallery is None:
            raise GalleryError(f"no gallery of {models.embedder.model_id} in {gallery_dir}")
    except GalleryError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    recognizer = Recognizer(models.detector, models.embedder, gallery, threshold=models.threshold_rule, top_k=top_k)
    status = 0
    for path in tqdm(images, desc="recognising", unit="img", disable=len(images) < 20):
        try:
            payload = path.read_bytes()
        except OSError as exc:
            emit({"image": str(path), "error": str(exc)})
            status = EXIT_BAD_INPUT
            continue
        result = recognizer.recognize_bytes([payload])[0]
        if isinstance(result, InvalidImageError):
            emit({"image": str(path), "error": str(result), "reason": result.reason})
            status = EXIT_BAD_INPUT
        else:
            emit({"image": str(path), **image_result_to_dict(result)})
    return status


def verify(settings: RecognitionSettings, image_a: Path, image_b: Path) -> int:
    models = _models(settings)
    try:
        decoded = [decode_image(image_a.read_bytes()), decode_image(image_b.read_bytes())]
    except (OSError, InvalidImageError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    first, second = embed_main_faces(models.detector, models.embedder, decoded)
    if first is None or second is None:
        missing = [str(p) for p, v in ((image_a, first), (image_b, second)) if v is None]
        emit({"same_person": None, "error": "no face found", "images_without_face": missing})
        return EXIT_BAD_INPUT
    similarity = float(np.dot(first, second))
    emit(
        {
            "same_person": similarity >= models.threshold,
            "similarity": round(similarity, 4),
            "threshold": models.threshold,
            "model_id": models.embedder.model_id,
        }
    )
    return 0


def import_legacy(data_pt: Path, gallery_dir: Path, model_id: str) -> int:
    try:
        gallery = Gallery.import_legacy(data_pt, model_id)
        LocalGalleryStore(gallery_dir).for_model(model_id).write(gallery.to_bytes())
    except (GalleryError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    emit(
        {
            "gallery": str(gallery_dir),
            "model_id": model_id,
            "faces": len(gallery),
            "people": gallery.people(),
            # The legacy file holds embeddings only: nothing to show in the console or to embed again with
            # another checkpoint.
            "faces_with_chips": 0,
            "note": "legacy faces have no chips (the legacy file holds embeddings only); enrol photos to add some",
        }
    )
    return 0


def _embed_photos(models: Models, photos: list[str], root: Path, *, batch_size: int, progress: bool) -> EmbeddedImages:
    """The main face of each LFW-style photo ``root/<relative path>``, as the service embeds it."""

    def main_faces(payloads: list[bytes]) -> list[np.ndarray | None]:
        return embed_main_faces(models.detector, models.embedder, [decode_image(p) for p in payloads])

    def centre_crops(payloads: list[bytes]) -> list[np.ndarray]:
        # LFW photos are centred on the face (deep-funneled 250x250): where MTCNN finds no candidate at all, not
        # even one below the probability threshold, embed the central region instead of dropping the pair.
        images = [decode_image(payload) for payload in payloads]
        crops = [models.detector.crops(image, [centre_face(image.width, image.height)]) for image in images]
        return list(models.embedder.embed(torch.cat(crops)))

    return embed_lfw_images(photos, root, main_faces, centre_crops, batch_size=batch_size, progress=progress)


def _embed_photos_cached(
    models: Models,
    settings: RecognitionSettings,
    photos: list[str],
    root: Path,
    cache: Path | None,
    *,
    batch_size: int,
    progress: bool,
) -> EmbeddedImages:
    """:func:`_embed_photos`, reading and extending an embeddings cache file where one is given."""
    if cache is None:
        return _embed_photos(models, photos, root, batch_size=batch_size, progress=progress)
    key = f"{models.embedder.model_id}|{settings.detector_config()!r}"
    cached = load_embedding_cache(cache, key)
    todo = [p for p in photos if p not in cached.embeddings]
    fresh = _embed_photos(models, todo, root, batch_size=batch_size, progress=progress)
    merged = CachedEmbeddings(key, {**cached.embeddings, **fresh.embeddings}, cached.missing | set(fresh.missing))
    if todo:
        save_embedding_cache(cache, merged)
    log.info("%d photos from the embeddings cache %s, %d embedded", len(photos) - len(todo), cache, len(todo))
    return EmbeddedImages(
        {p: merged.embeddings[p] for p in photos}, [p for p in photos if p in merged.missing], fresh.seconds
    )


def eval_lfw(
    settings: RecognitionSettings,
    *,
    pairs: Path,
    images: Path,
    calibrate: Path | None,
    plot: Path | None,
    batch_size: int,
    progress: bool,
) -> int:
    evaluated = read_pairs(pairs)
    calibration = read_pairs(calibrate) if calibrate else None
    wanted = list(dict.fromkeys(evaluated.images() + (calibration.images() if calibration else [])))
    models = _models(settings)
    embedded = _embed_photos(models, wanted, images, batch_size=batch_size, progress=progress)
    result = evaluate(evaluated, embedded.embeddings, calibration)
    if plot is not None:
        plot_roc(result, plot, f"LFW {pairs.name} - {models.embedder.model_id}")
    emit(
        {
            "accuracy": round(result.accuracy, 4),
            "std": round(result.std, 4),
            "threshold": round(result.threshold, 4),
            "auc": round(result.auc, 5),
            "pairs": result.pairs,
            "images": len(wanted),
            "faces_missing": {
                "count": len(embedded.missing),
                "handling": CENTRE_CROP_HANDLING,
                "images": embedded.missing[:20],
            },
            "seconds": round(embedded.seconds, 1),
            "protocol": result.protocol,
            "calibration_accuracy": None
            if result.calibration_accuracy is None
            else round(result.calibration_accuracy, 4),
            "model_id": models.embedder.model_id,
            "checkpoint": settings.checkpoint,
            "plot": str(plot) if plot else None,
        }
    )
    return 0


def eval_identify(
    settings: RecognitionSettings,
    *,
    images: Path,
    seed: int,
    gallery_photos: int,
    min_photos: int,
    strangers_fraction: float,
    people_from: Path | None,
    calibration: Path | None,
    plot: Path | None,
    embeddings_cache: Path | None,
    batch_size: int,
    progress: bool,
) -> int:
    """Open-set identification (``serve_app.evaluation.identify``) on an LFW-style folder, as one JSON line."""
    from serve_app.evaluation.identify import margin_sweep

    split_settings = {
        "seed": seed,
        "gallery_photos": gallery_photos,
        "min_photos": min_photos,
        "strangers_fraction": strangers_fraction,
        "people_from": str(people_from) if people_from else None,
    }
    split = _identify_split(images, people_from, seed, gallery_photos, min_photos, strangers_fraction)
    if split is None:
        return EXIT_BAD_INPUT
    models = _models(settings)
    calibration_file = calibration or calibration_path(settings.checkpoint, settings.flip)
    try:
        impostors = (
            load_calibration(calibration_file, expected_model_id=models.embedder.model_id)
            if calibration is not None or calibration_file.is_file()
            else None
        )
    except CalibrationError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT

    embedded = _embed_photos_cached(
        models, settings, split.photos(), images, embeddings_cache, batch_size=batch_size, progress=progress
    )
    vectors = embedded.embeddings
    gallery = build_gallery(split, vectors, models.embedder.model_id)
    probes = search(gallery, np.stack([vectors[photo] for _, photo in split.probes]))
    strangers = search(gallery, np.stack([vectors[photo] for _, photo in split.strangers]))
    probe_people = [person for person, _ in split.probes]
    result = evaluate_identification(probes, probe_people, strangers, operating_threshold=models.threshold)

    gallery_size = len(split.gallery)
    # The threshold the service itself would use for a gallery of this size (its configured rule), and why.
    service = models.threshold_rule.for_gallery(gallery_size)
    service_point = operating_point(result.best_scores, result.correct, result.stranger_scores, service.value)
    calibrated, derived_points = (
        _calibrated_report(result, impostors, calibration_file, gallery_size, len(split.strangers))
        if impostors is not None
        else (None, {})
    )
    if plot is not None:
        title = f"{images.parent.name}/{images.name}: {models.embedder.model_id}, {gallery_size} people enrolled"
        plot_det(result, plot, title, derived_points)
    emit(
        {
            "protocol": "open-set identification (ISO/IEC 19795): rank-1, DIR at FAR, FAR at the operating threshold",
            "split": {
                **split_settings,
                "enrolled_people": gallery_size,
                "gallery_faces": len(gallery),
                "known_probes": len(split.probes),
                "stranger_people": len(split.stranger_people()),
                "strangers": len(split.strangers),
            },
            "rank1": round(result.rank1, 4),
            "at_far": {f"{far:g}": point.as_dict() for far, point in result.at_far.items()},
            "at_operating_threshold": result.at_operating_threshold.as_dict(),
            "at_service_threshold": {
                **service_point.as_dict(),
                "source": service.source,
                "false_accept_rate": service.false_accept_rate,
            },
            "calibrated": calibrated,
            # Name somebody only if they lead the second-best person by the margin too (identify.apply_margin).
            "margin_rule": margin_sweep(probes, probe_people, strangers),
            "faces_missing": {
                "count": len(embedded.missing),
                "handling": CENTRE_CROP_HANDLING,
                "images": embedded.missing[:20],
            },
            "seconds": round(embedded.seconds, 1),
            "model_id": models.embedder.model_id,
            "checkpoint": settings.checkpoint,
            "flip": settings.flip,
            "plot": str(plot) if plot else None,
        }
    )
    return 0


def _identify_split(
    images: Path, people_from: Path | None, seed: int, gallery_photos: int, min_photos: int, strangers_fraction: float
) -> IdentifySplit | None:
    """The people enrolled, their probes and the strangers (``None``, said why, when there can be none)."""
    if not images.is_dir():
        log.error("%s is not a directory of <Name>/<Name>_NNNN.jpg", images)
        return None
    people = {name.split("/")[0] for name in read_pairs(people_from).images()} if people_from else None
    try:
        split = split_people(
            list_photos(images, people),
            seed=seed,
            gallery_photos=gallery_photos,
            min_photos=min_photos,
            strangers_fraction=strangers_fraction,
        )
    except ValueError as exc:
        log.error("%s", exc)
        return None
    if not (split.gallery and split.probes and split.strangers):
        log.error("%s gives no enrolled people, known probes or strangers with these settings", images)
        return None
    return split


def _calibrated_report(
    result: IdentifyEvaluation,
    impostors: Calibration,
    calibration_file: Path,
    gallery_size: int,
    strangers: int,
) -> tuple[dict[str, object], dict[str, OperatingPoint]]:
    """The thresholds the service would derive for this gallery size from ``impostors``, measured on the split's
    strangers, and the model's FAR against the measured one at thresholds chosen without them."""
    targets = []
    derived_points: dict[str, OperatingPoint] = {}
    for target in FAR_TARGETS:
        point = operating_point(
            result.best_scores,
            result.correct,
            result.stranger_scores,
            threshold_for_far(impostors, target, gallery_size),
        )
        derived_points[f"derived for FAR {target:.1%}"] = point
        low, high = wilson_interval(point.false_accepts, strangers)
        targets.append({"target_far": target, **point.as_dict(), "far_ci95": [round(low, 5), round(high, 5)]})
    calibrated: dict[str, object] = {
        "calibration": str(calibration_file),
        "gallery_size": gallery_size,
        "at_target_far": targets,
        "model_vs_measured_far": [
            {
                "threshold": round(point.threshold, 4),
                "predicted": round(far_at_threshold(impostors, point.threshold, gallery_size), 5),
                "measured": round(point.far, 5),
            }
            for point in (result.at_operating_threshold, *result.at_far.values())
        ],
    }
    return calibrated, derived_points


def calibrate_far(
    settings: RecognitionSettings,
    *,
    images: Path,
    pairs: Path | None,
    out: Path | None,
    embeddings_cache: Path | None,
    batch_size: int,
    progress: bool,
) -> int:
    """Impostor scores of every different-person pair of photos, summarised as a calibration file."""
    if not images.is_dir():
        log.error("%s is not a directory of <Name>/<Name>_NNNN.jpg", images)
        return EXIT_BAD_INPUT
    photos = read_pairs(pairs).images() if pairs else [p for group in list_photos(images).values() for p in group]
    models = _models(settings)
    embedded = _embed_photos_cached(
        models, settings, photos, images, embeddings_cache, batch_size=batch_size, progress=progress
    )
    people = [photo.split("/")[0] for photo in photos]
    scores = impostor_scores(np.stack([embedded.embeddings[p] for p in photos]), people)
    source = {
        "images": f"{images.parent.name}/{images.name}",
        "pairs": pairs.name if pairs else None,
        "photos": len(photos),
        "people": len(set(people)),
        "faces_missing": len(embedded.missing),
        "embed_precision": models.embedder.precision,
        "pairs_scored": "every pair of photos of different people",
    }
    try:
        calibration = summarize_scores(
            scores, checkpoint=settings.checkpoint, model_id=models.embedder.model_id, flip=settings.flip, source=source
        )
    except CalibrationError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    target = calibration.save(out or calibration_path(settings.checkpoint, settings.flip))
    sizes = (10, 100, 1_000, 10_000)
    emit(
        {
            "out": str(target),
            "bytes": target.stat().st_size,
            "model_id": calibration.model_id,
            "comparisons": calibration.comparisons,
            **source,
            "tail": {
                "start": round(calibration.tail.start, 4),
                "start_exceedance": float(f"{calibration.tail.start_exceedance:.4g}"),
                "exponential_scale": round(calibration.tail.scale, 5),
                "empirical_down_to": float(f"{calibration.empirical_limit:.4g}"),
            },
            "threshold_for_far": {
                f"{far:g}": {str(n): round(threshold_for_far(calibration, far, n), 4) for n in sizes}
                for far in FAR_TARGETS
            },
            "far_at_operating_threshold": {
                "threshold": models.threshold,
                **{str(n): round(far_at_threshold(calibration, models.threshold, n), 5) for n in sizes},
            },
            "seconds": round(embedded.seconds, 1),
        }
    )
    return 0
