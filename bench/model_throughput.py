"""Model floor: detect + embed throughput on LFW photos, one image at a time vs batched, in one process.

    .venv/bin/python bench/model_throughput.py [--images 256] [--batch 32] [--threads 2]

Prints one JSON object (and writes it to bench/results/model_throughput.json): images/s for each mode and
their ratio, measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from machine import describe, results_dir

from serve_app.model.images import decode_image
from serve_app.model.pipeline import Models
from serve_app.model.recognizer import embed_main_faces
from serve_app.settings import RecognitionConfig, load_models

LFW_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lfw-view1" / "images"
RESULTS = results_dir()


def lfw_payloads(count: int, skip: int = 0) -> list[bytes]:
    """The bytes of ``count`` LFW photos in a fixed order (sorted by path), after the first ``skip``."""
    return [p.read_bytes() for p in sorted(LFW_IMAGES.glob("*/*.jpg"))[skip : skip + count]]


def images_per_s(models: Models, payloads: Sequence[bytes], batch: int) -> float:
    """Decode, detect and embed the main face of ``payloads``, ``batch`` photos at a time: images per second."""
    started = time.perf_counter()
    for start in range(0, len(payloads), batch):
        images = [decode_image(p) for p in payloads[start : start + batch]]
        embed_main_faces(models.detector, models.embedder, images)
    return len(payloads) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", default="facenet-keras-128")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = load_models(
        RecognitionConfig(checkpoint=args.checkpoint, max_embed_batch=args.batch, false_accept_rate=None)
    )
    payloads = lfw_payloads(args.images)
    images_per_s(models, payloads, 8)  # warm-up: first calls allocate and pick kernels
    single = images_per_s(models, payloads, 1)
    batched = images_per_s(models, payloads, args.batch)
    result = {
        "benchmark": "model_throughput",
        "images": len(payloads),
        "checkpoint": args.checkpoint,
        "threads": args.threads,
        "batch": args.batch,
        "single_images_per_s": round(single, 2),
        "batched_images_per_s": round(batched, 2),
        "batched_over_single": round(batched / single, 3),
        "machine": describe(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "model_throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
