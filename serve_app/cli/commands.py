"""The work behind each ``facerec`` sub-command. Each returns the process exit code."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from serve_app.evaluation.lfw import embed_lfw_images, evaluate, plot_roc, read_pairs
from serve_app.model.detector import DetectedFace
from serve_app.model.enrollment import embed_for_enrolment
from serve_app.model.gallery import Gallery, GalleryError
from serve_app.model.images import InvalidImageError, decode_image
from serve_app.model.pipeline import Models, load_models
from serve_app.model.recognizer import Recognizer, embed_main_faces
from serve_app.results import image_result_to_dict
from serve_app.settings import RecognitionSettings

log = logging.getLogger("facerec")

EXIT_BAD_INPUT = 2
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def emit(document: object) -> None:
    """One JSON document per line on stdout (logs and progress bars go to stderr)."""
    print(json.dumps(document), flush=True)


def _models(settings: RecognitionSettings) -> Models:
    return load_models(
        settings.checkpoint,
        detector_config=settings.detector_config(),
        flip=settings.flip,
        max_embed_batch=settings.max_embed_batch,
        threshold=settings.threshold,
        embed_precision=settings.embed_precision,
        torch_threads=settings.torch_threads,
    )


def enroll(settings: RecognitionSettings, gallery_dir: Path, photos_dir: Path) -> int:
    if not photos_dir.is_dir():
        log.error("%s is not a directory of <person>/ sub-folders", photos_dir)
        return EXIT_BAD_INPUT
    people = sorted(p for p in photos_dir.iterdir() if p.is_dir())
    if not people:
        log.error("%s has no <person>/ sub-folders", photos_dir)
        return EXIT_BAD_INPUT
    models = _models(settings)
    try:
        gallery = Gallery.load_or_create(gallery_dir, models.embedder.model_id, models.embedder.dim)
    except GalleryError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    enrolled = refused = 0
    for person in tqdm(people, desc="enrolling", unit="person"):
        photos = sorted(p for p in person.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        outcomes = embed_for_enrolment(models.detector, models.embedder, [(p.name, p.read_bytes()) for p in photos])
        vectors = [o.embedding for o in outcomes if o.embedding is not None]
        for outcome in outcomes:
            if outcome.refused:
                refused += 1
                log.warning("%s/%s refused: %s", person.name, outcome.label, outcome.refused)
        if vectors:
            gallery.add(person.name, np.stack(vectors), models.embedder.model_id)
            enrolled += len(vectors)
    gallery.save(gallery_dir)
    emit(
        {"gallery": str(gallery_dir), "enrolled_faces": enrolled, "refused_photos": refused, "people": gallery.people()}
    )
    return 0


def recognize(settings: RecognitionSettings, gallery_dir: Path, images: list[Path], top_k: int) -> int:
    models = _models(settings)
    try:
        gallery = Gallery.load(gallery_dir, expected_model_id=models.embedder.model_id)
    except GalleryError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    recognizer = Recognizer(models.detector, models.embedder, gallery, threshold=models.threshold, top_k=top_k)
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


def show_gallery(gallery_dir: Path) -> int:
    try:
        gallery = Gallery.load(gallery_dir)
    except GalleryError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    emit({"model_id": gallery.model_id, "dim": gallery.dim, "faces": len(gallery), "people": gallery.people()})
    return 0


def import_legacy(data_pt: Path, gallery_dir: Path, model_id: str) -> int:
    try:
        gallery = Gallery.import_legacy(data_pt, model_id)
    except GalleryError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    gallery.save(gallery_dir)
    emit({"gallery": str(gallery_dir), "model_id": model_id, "faces": len(gallery), "people": gallery.people()})
    return 0


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

    def main_faces(payloads: list[bytes]) -> list[np.ndarray | None]:
        return embed_main_faces(models.detector, models.embedder, [decode_image(p) for p in payloads])

    def centre_crops(payloads: list[bytes]) -> list[np.ndarray]:
        # LFW photos are centred on the face (deep-funneled 250x250): where MTCNN finds none at the service's
        # probability threshold, embed the central region instead of dropping the pair.
        out = []
        for payload in payloads:
            image = decode_image(payload)
            side = 0.45 * min(image.width, image.height)
            cx, cy = image.width / 2, image.height / 2
            box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            face = DetectedFace(box=box, probability=0.0, landmarks=((cx, cy),) * 5)
            out.append(models.embedder.embed(models.detector.crops(image, [face]))[0])
        return out

    embedded = embed_lfw_images(wanted, images, main_faces, centre_crops, batch_size=batch_size, progress=progress)
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
                "handling": "no face at the detection threshold: the central 45% square of the photo was embedded",
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
