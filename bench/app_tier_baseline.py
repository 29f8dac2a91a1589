"""The original app tier's way of recognising a photo, next to our batched model floor, in one run.

    .venv/bin/python bench/app_tier_baseline.py [--images 256] [--gallery-faces 100] [--batch 32] [--threads 2]

1. Baseline, as the three-tier app tier did it, one photo per request: open the photo with PIL, run
   ``facenet_pytorch.MTCNN(image_size=240, margin=0, min_face_size=20)`` on it, embed the returned face at batch 1
   (resized to the embedder's input, standardised as our checkpoint wants), then load the gallery file from disk
   and match. The app tier reloaded its gallery for every request; so does this.
2. Floor: ``bench/model_throughput.py``'s batched decode + detect + embed on the same photos.

The gallery holds ``--gallery-faces`` LFW photos taken after the timed ones, enrolled once with our batched code
into a temporary directory in ``serve_app.model.gallery``'s format. Writes ``bench/results/app_tier_baseline.json``
(images/s of each, their ratio against the 3x target, and the baseline's milliseconds per stage) and prints it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from facenet_pytorch import MTCNN
from machine import describe, results_dir
from model_throughput import LFW_IMAGES, images_per_s, lfw_payloads
from PIL import Image

from serve_app.model.gallery import Gallery
from serve_app.model.images import decode_image
from serve_app.model.pipeline import Models
from serve_app.model.recognizer import embed_main_faces
from serve_app.settings import RecognitionConfig, load_models

RESULTS = results_dir()
#: What the project set out to beat the original app tier by (model floor over baseline, same photos, same run).
TARGET_RATIO = 3.0


def enrol_gallery(models: Models, count: int, skip: int, directory: Path) -> Gallery:
    """Enrol the main face of ``count`` LFW photos (after the first ``skip``), batched, and save the gallery."""
    paths = sorted(LFW_IMAGES.glob("*/*.jpg"))[skip : skip + count]
    gallery = Gallery(models.embedder.model_id, models.embedder.dim)
    for start in range(0, len(paths), 16):
        chunk = paths[start : start + 16]
        vectors = embed_main_faces(models.detector, models.embedder, [decode_image(p.read_bytes()) for p in chunk])
        for path, vector in zip(chunk, vectors, strict=True):
            if vector is not None:
                gallery.add(path.parent.name, vector, gallery.model_id)
    gallery.save(directory)
    return gallery


class LegacyAppTier:
    """One request at a time, the way the original app tier handled it; ``stage_s`` adds up where time goes."""

    def __init__(self, models: Models, gallery_dir: Path) -> None:
        # The app tier's detector, verbatim, except post_process=False: it returns 0..255 pixels, so that our
        # checkpoint's own standardisation (the Embedder's) is applied instead of facenet-pytorch's fixed one.
        self.mtcnn = MTCNN(image_size=240, margin=0, min_face_size=20, post_process=False)
        self.mtcnn.eval()
        # The app tier's embedder: the same weights as ours in plain float32, NCHW, one face per forward pass (ours
        # runs channels-last and, where the CPU has it, in bfloat16: part of what the floor measures).
        self.network = models.embedder.checkpoint.load().eval()
        self.standardize = models.embedder.standardize
        self.models = models
        self.gallery_dir = gallery_dir
        self.input_size = models.detector.config.crop_size
        self.stage_s: dict[str, float] = defaultdict(float)
        self.faces = 0

    def recognise(self, payload: bytes) -> str | None:
        """The best-matching enrolled person for the photo's face, ``None`` if no face or nobody close enough."""
        started = time.perf_counter()
        image = Image.open(io.BytesIO(payload)).convert("RGB")
        started = self._lap("decode", started)
        with torch.inference_mode():
            face = self.mtcnn(image)
        started = self._lap("detect", started)
        if face is None:
            return None
        self.faces += 1
        crop = torch.nn.functional.interpolate(
            face[None], size=(self.input_size, self.input_size), mode="bilinear", antialias=True
        )
        with torch.inference_mode():
            vector = self.network(self.standardize(crop.float()))
        embedding = torch.nn.functional.normalize(vector, dim=1).numpy()
        started = self._lap("embed", started)
        gallery = Gallery.load(self.gallery_dir, expected_model_id=self.models.embedder.model_id)
        started = self._lap("gallery_load", started)
        match = gallery.match(embedding, threshold=self.models.threshold)[0]
        self._lap("match", started)
        return match.name

    def images_per_s(self, payloads: Sequence[bytes]) -> float:
        started = time.perf_counter()
        for payload in payloads:
            self.recognise(payload)
        return len(payloads) / (time.perf_counter() - started)

    def _lap(self, stage: str, started: float) -> float:
        now = time.perf_counter()
        self.stage_s[stage] += now - started
        return now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--gallery-faces", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", default="facenet-keras-128")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    models = load_models(
        RecognitionConfig(checkpoint=args.checkpoint, max_embed_batch=args.batch, false_accept_rate=None)
    )
    payloads = lfw_payloads(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        gallery_dir = Path(tmp)
        gallery = enrol_gallery(models, args.gallery_faces, skip=args.images, directory=gallery_dir)
        gallery_bytes = (gallery_dir / "gallery.npz").stat().st_size
        # Warm-up, each side at its own shapes: oneDNN builds kernels per input shape on first use, which a short
        # run would otherwise charge to whichever side meets a shape first.
        LegacyAppTier(models, gallery_dir).images_per_s(payloads[:4])
        images_per_s(models, payloads[: args.batch], args.batch)
        legacy = LegacyAppTier(models, gallery_dir)
        baseline = legacy.images_per_s(payloads)
        floor = images_per_s(models, payloads, args.batch)
    ratio = floor / baseline
    result = {
        "benchmark": "app_tier_baseline",
        "images": len(payloads),
        "checkpoint": args.checkpoint,
        "threads": args.threads,
        "batch": args.batch,
        "gallery_faces": len(gallery),
        "gallery_people": len(gallery.people()),
        "gallery_file_bytes": gallery_bytes,
        "baseline_images_per_s": round(baseline, 2),
        "baseline_faces_found": legacy.faces,
        "baseline_ms_per_image": {
            stage: round(1000 * seconds / len(payloads), 2) for stage, seconds in legacy.stage_s.items()
        },
        "floor_images_per_s": round(floor, 2),
        "floor_over_baseline": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
        # A neighbour's load skews 2-thread runs badly (small ops wait on a descheduled thread): show it.
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": describe(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "app_tier_baseline.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
