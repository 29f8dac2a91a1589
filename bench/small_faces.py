"""Small photos: faces found and verification accuracy on LFW View 1 downscaled to 128, 96 and 64 pixels.

    .venv/bin/python bench/small_faces.py [--sizes 64 96 128] [--limit N]

Every View 1 photo (250x250, deep-funneled) is downscaled (Pillow, Lanczos) and saved as a JPEG (quality 90), as a
legacy client's thumbnails are; nothing is written to disk. For each size, with the detector that ``make run``
ships (the ``recognition`` settings' defaults):

* the share of photos with a face found: at the probability threshold, and counting the weaker candidate that a
  one-person photo falls back to; beside it facenet-pytorch's own ``MTCNN()`` defaults (any box) and this
  detector without small-photo upscaling (``small_photo_side=0``, the previous behaviour);
* verification on the View 1 pairs: DevTest accuracy with the threshold chosen on DevTrain at the same size, and
  at the shipped (full-size) threshold; mean similarity of same-person and different-person pairs;
* false faces on the shared group photos (full size): the count of faces must not grow.

Writes ``bench/results/small_faces.json`` and ``bench/results/small_faces.png``.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from facenet_pytorch import MTCNN
from machine import describe, label, results_dir
from PIL import Image
from tqdm import tqdm

from serve_app.evaluation.lfw import Pair, accuracy_at, best_threshold, pair_similarities, read_pairs
from serve_app.model.detector import DetectorConfig, FaceDetector, centre_face
from serve_app.model.images import DecodedImage, decode_image
from serve_app.model.pipeline import Models
from serve_app.settings import RecognitionConfig, load_models

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
LFW = DATASETS / "lfw-view1"
SCENES = DATASETS / "scenes"
RESULTS = results_dir()
BATCH = 32


def downscale(payload: bytes, side: int | None) -> bytes:
    """The photo as a ``side`` x ``side`` JPEG (quality 90), or unchanged for ``None``."""
    if side is None:
        return payload
    image = Image.open(io.BytesIO(payload)).convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def facenet_default_found(mtcnn: MTCNN, images: Sequence[DecodedImage]) -> list[bool]:
    """Whether facenet-pytorch's ``MTCNN()`` (its defaults, any probability) reports a box in each photo."""
    boxes, _ = mtcnn.detect([Image.fromarray(image.pixels) for image in images])
    return [b is not None and len(b) > 0 for b in boxes]


def measure_size(
    side: int | None, names: Sequence[str], models: Models, before: FaceDetector, mtcnn: MTCNN
) -> dict[str, Any]:
    confident = weak_only = none = facenet_found = before_found = 0
    embeddings: dict[str, np.ndarray] = {}
    detect_s = 0.0
    for start in tqdm(range(0, len(names), BATCH), desc=f"{side or 250}px", unit="batch"):
        chunk = names[start : start + BATCH]
        images = [decode_image(downscale((LFW / "images" / n).read_bytes(), side)) for n in chunk]
        started = time.perf_counter()
        found = models.detector.detect_all(images)
        detect_s += time.perf_counter() - started
        subjects = []
        for image, detections in zip(images, found, strict=True):
            subject = detections.subject()
            confident += bool(detections.faces)
            weak_only += not detections.faces and subject is not None
            none += subject is None
            subjects.append(subject or centre_face(image.width, image.height))
        if side is not None:  # the comparisons are about small photos; full-size ones are not upscaled anyway
            facenet_found += sum(facenet_default_found(mtcnn, images))
            before_found += sum(bool(faces) for faces in before.detect(images))
        crops = torch.cat([models.detector.crops(i, [f]) for i, f in zip(images, subjects, strict=True)])
        embeddings.update(zip(chunk, models.embedder.embed(crops), strict=True))
    train = read_pairs(LFW / "pairsDevTrain.txt")
    test = read_pairs(LFW / "pairsDevTest.txt")
    # With --limit only the pairs whose two photos were measured count.
    train_scores, train_labels = pair_similarities(_measured(train.pairs, embeddings), embeddings)
    test_scores, test_labels = pair_similarities(_measured(test.pairs, embeddings), embeddings)
    threshold = best_threshold(train_scores, train_labels)
    total = len(names)
    return {
        "side": side or 250,
        "photos": total,
        "face_found_confident": round(confident / total, 5),
        "face_found_with_weak_candidate": round((confident + weak_only) / total, 5),
        "weak_candidate_used": weak_only,
        "no_face_centre_crop": none,
        "facenet_default_found": round(facenet_found / total, 5) if side is not None else None,
        "without_upscaling_found": round(before_found / total, 5) if side is not None else None,
        "detect_ms_per_photo": round(1000 * detect_s / total, 2),
        "devtrain_threshold": round(threshold, 4),
        "devtest_accuracy": round(accuracy_at(test_scores, test_labels, threshold), 4),
        "devtest_accuracy_at_shipped_threshold": round(accuracy_at(test_scores, test_labels, models.threshold), 4),
        "same_person_mean_similarity": round(float(test_scores[test_labels].mean()), 4),
        "different_people_mean_similarity": round(float(test_scores[~test_labels].mean()), 4),
    }


def _measured(pairs: Sequence[Pair], embeddings: dict[str, np.ndarray]) -> list[Pair]:
    return [p for p in pairs if p.left in embeddings and p.right in embeddings]


def group_photo_faces(models: Models, before: FaceDetector) -> list[dict[str, Any]]:
    rows = []
    for path in sorted([*SCENES.glob("*.jpg"), *SCENES.glob("*.png"), *(SCENES / "knn" / "test").glob("*.jpg")]):
        image = decode_image(path.read_bytes())
        rows.append(
            {
                "photo": str(path.relative_to(SCENES)),
                "size": f"{image.width}x{image.height}",
                "faces": len(models.detector.detect([image])[0]),
                "faces_without_upscaling": len(before.detect([image])[0]),
            }
        )
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    labels = [f"{s['side']}px" for s in sizes]
    x = np.arange(len(sizes))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for offset, (key, name) in enumerate(
        (
            ("without_upscaling_found", "before (no upscaling, >= 0.95)"),
            ("facenet_default_found", "facenet-pytorch MTCNN() defaults"),
            ("face_found_confident", "shipped, >= 0.95"),
            ("face_found_with_weak_candidate", "shipped, with weak candidate"),
        )
    ):
        left.bar(x + (offset - 1.5) * 0.2, [100 * (s[key] or 0) for s in sizes], 0.2, label=name)
    left.set_xticks(x, labels)
    left.set_ylim(95, 100.2)
    left.set_ylabel("photos with a face found (%)")
    left.legend(fontsize=7, loc="lower right")
    right.plot(labels, [s["devtest_accuracy"] for s in sizes], "-o", label="threshold from DevTrain, same size")
    right.plot(labels, [s["devtest_accuracy_at_shipped_threshold"] for s in sizes], "-s", label="shipped threshold")
    right.set_ylabel("LFW View 1 DevTest accuracy")
    right.legend(fontsize=8)
    figure.suptitle(f"small photos, {result['checkpoint']} ({label(result['machine'])})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--limit", type=int, default=None, help="only the first N photos (pairs need all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-full-size", action="store_true", help="skip the 250x250 reference (LFW accuracy there: README)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shipped = RecognitionConfig()
    models = load_models(shipped)
    before = FaceDetector(
        DetectorConfig(
            probability_threshold=shipped.detect_probability,
            min_face_size=shipped.min_face_size,
            max_side=shipped.detect_max_side,
            small_photo_side=0,
        )
    )
    mtcnn = MTCNN()
    names = sorted(str(p.relative_to(LFW / "images")) for p in (LFW / "images").glob("*/*.jpg"))[: args.limit]
    sides: list[int | None] = [*sorted(args.sizes), *([] if args.no_full_size else [None])]
    sizes = [measure_size(side, names, models, before, mtcnn) for side in sides]
    for row in sizes:
        print(json.dumps(row), flush=True)
    result = {
        "benchmark": "small_faces",
        "checkpoint": shipped.checkpoint,
        "shipped_threshold": models.threshold,
        "sizes": sizes,
        "group_photos": group_photo_faces(models, before),
        "machine": describe(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "small_faces.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / "small_faces.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
