"""Embedding alone at batch 1, 8 and 32, and how close it comes to this machine's matrix-multiply peak.

    .venv/bin/python bench/embedding_peak.py [--images 96] [--crops 96] [--batches 1 8 32] [--threads 2]

The default embedder from ``load_models`` runs on face crops of its input size, cut once by our detector from
LFW photos (the same crops the recognizer embeds), so no detection is timed. Its FLOPs per image are counted
with ``FlopCounterMode`` on one forward pass; achieved GFLOP/s is that count times images/s, set against the best
of several ``torch.mm`` runs on large float32 square matrices with the same torch threads. The whole-pipeline
floor (detect + embed) is ``bench/model_throughput.py``'s. Writes ``bench/results/embedding_peak.json`` and
``bench/results/embedding_peak.png`` and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from machine import describe, label, results_dir
from model_throughput import lfw_payloads
from torch.utils.flop_counter import FlopCounterMode

from serve_app.model.detector import main_face_index
from serve_app.model.embedder import Embedder
from serve_app.model.images import decode_image
from serve_app.model.pipeline import Models
from serve_app.settings import RecognitionConfig, load_models

RESULTS = results_dir()


def face_crops(models: Models, payloads: list[bytes], count: int, batch: int = 16) -> torch.Tensor:
    """``count`` main-face crops (``(count, 3, size, size)``, 0..255), repeated in order if the photos gave fewer."""
    crops: list[torch.Tensor] = []
    for start in range(0, len(payloads), batch):
        images = [decode_image(p) for p in payloads[start : start + batch]]
        for image, faces in zip(images, models.detector.detect(images), strict=True):
            main = main_face_index(faces, image.width, image.height)
            if main is not None:
                crops.append(models.detector.crops(image, [faces[main]]))
    if not crops:
        raise SystemExit("no face found in the photos: use more --images")
    found = torch.cat(crops)
    repeats = -(-count // len(found))
    return found.repeat(repeats, 1, 1, 1)[:count].contiguous()


def flops_per_image(embedder: Embedder, crop: torch.Tensor) -> int:
    """FLOPs of one forward pass on one crop, as PyTorch counts them (convolutions and matmuls, 2 per MAC)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        embedder.network(crop[None].to(embedder.device, torch.float32))
    return int(counter.get_total_flops())


def embed_images_per_s(embedder: Embedder, crops: torch.Tensor, batch: int) -> float:
    """``Embedder.embed`` over ``crops`` in forward passes of ``batch``: images per second."""
    embedder.embed(crops[:batch])  # warm-up: oneDNN picks its kernels per input shape
    started = time.perf_counter()
    for start in range(0, len(crops), batch):
        embedder.embed(crops[start : start + batch])
    return len(crops) / (time.perf_counter() - started)


def matmul_peak_gflops(size: int, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of ``torch.mm`` on two ``size`` x ``size`` matrices of ``dtype`` (a square matmul is ``2 n^3``)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["per_batch"]
    labels = [str(r["batch"]) for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    left.bar(labels, [r["images_per_s"] for r in rows], color="tab:blue")
    left.set_xlabel("embedder batch size")
    left.set_ylabel("images / s (embedding only)")
    right.bar(labels, [r["gflops_per_s"] for r in rows], color="tab:orange", label="embedder")
    right.axhline(result["matmul_peak_gflops_per_s"], color="black", linestyle="--", label="torch.mm peak")
    for position, r in enumerate(rows):
        right.annotate(f"{100 * r['fraction_of_peak']:.0f}%", (position, r["gflops_per_s"]), ha="center", va="bottom")
    right.set_xlabel("embedder batch size")
    right.set_ylabel("GFLOP/s")
    right.legend(fontsize=8)
    figure.suptitle(f"{result['checkpoint']} embedding vs matmul peak ({label(result['machine'])})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="LFW photos to cut face crops from")
    parser.add_argument("--crops", type=int, default=96, help="crops embedded per batch size (a multiple of each)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", default="facenet-keras-128")
    parser.add_argument("--mm-size", type=int, default=2048)
    parser.add_argument("--mm-repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    models = load_models(
        RecognitionConfig(checkpoint=args.checkpoint, max_embed_batch=max(args.batches), false_accept_rate=None)
    )
    crops = face_crops(models, lfw_payloads(args.images), args.crops)
    flops = flops_per_image(models.embedder, crops[0])
    # The peak in the arithmetic the embedder runs in (bfloat16 where the CPU has it natively: see Embedder).
    dtype = torch.bfloat16 if models.embedder.precision == "bfloat16" else torch.float32
    # Half the matmul runs before the embedding and half after: best-of is then robust to a neighbour's burst.
    peak = matmul_peak_gflops(args.mm_size, -(-args.mm_repeats // 2), dtype)
    per_batch = []
    for batch in args.batches:
        rate = embed_images_per_s(models.embedder, crops, batch)
        achieved = flops * rate / 1e9
        per_batch.append(
            {
                "batch": batch,
                "images_per_s": round(rate, 2),
                "gflops_per_s": round(achieved, 2),
            }
        )
        print(json.dumps(per_batch[-1]), flush=True)
    peak = max(peak, matmul_peak_gflops(args.mm_size, max(1, args.mm_repeats // 2), dtype))
    float32_peak = matmul_peak_gflops(args.mm_size, max(1, args.mm_repeats // 2))
    for row in per_batch:
        row["fraction_of_peak"] = round(float(row["gflops_per_s"]) / peak, 3)
    best = max(per_batch, key=lambda r: float(r["images_per_s"]))
    smallest = min(per_batch, key=lambda r: int(r["batch"]))
    result = {
        "benchmark": "embedding_peak",
        "checkpoint": args.checkpoint,
        "crops": len(crops),
        "input_size": list(crops.shape[1:]),
        "threads": args.threads,
        "gflop_per_image": round(flops / 1e9, 3),
        "per_batch": per_batch,
        "best_batch": best["batch"],
        "best_over_smallest_batch": round(float(best["images_per_s"]) / float(smallest["images_per_s"]), 3),
        "matmul_size": args.mm_size,
        "embedder_precision": models.embedder.precision,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_peak_gflops_per_s": round(peak, 2),
        "float32_matmul_peak_gflops_per_s": round(float32_peak, 2),
        # A neighbour's load skews 2-thread runs badly (small ops wait on a descheduled thread): show it.
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": describe(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "embedding_peak.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / "embedding_peak.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
