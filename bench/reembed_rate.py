"""Re-embedding rate: a 10,000-face gallery carried over to another checkpoint, against that embedder's own rate.

    .venv/bin/python bench/reembed_rate.py [--faces 10000] [--photos 600] [--checkpoint casia-webface-512]

The chips are the main-face crops of LFW View 1 photos (cut once by the detector, stored as JPEG the way an
enrolment stores them) in a local gallery store, under ``--faces`` face ids (photos repeat when there are fewer).
Timed in one run on one machine: (a) the target embedder alone at batch 32 on the same crops (what
``bench/embedding_peak.py`` measures for ``make bench``), before and after (b), the higher of the two kept (a
neighbour's burst during one of them would flatter the ratio), and (b) ``reembed_snapshot`` over the whole store,
as ``facerec gallery reembed`` runs it (chip reads, JPEG decoding, embedding, partial saves, the final
snapshot). The figure is (b) / (a). Writes ``bench/results/reembed_rate.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from embedding_peak import embed_images_per_s, face_crops
from machine import describe, results_dir
from model_throughput import lfw_payloads
from tqdm import tqdm

from serve_app.gallery_store import LocalGalleryStore
from serve_app.model.chips import chip_jpeg, chip_tensor
from serve_app.model.gallery import Gallery
from serve_app.settings import RecognitionConfig, load_models
from serve_app.snapshot_reembed import reembed_snapshot

RESULTS = results_dir()


def build_source(store: LocalGalleryStore, chips: list[bytes], faces: int, model_id: str, dim: int) -> Gallery:
    """A ``faces``-face gallery of ``model_id`` (one person per distinct chip), each face's chip in ``store``."""
    source = Gallery(model_id, dim)
    rng = np.random.default_rng(0)
    names, ids, flags = [], [], []
    for index in tqdm(range(faces), desc="storing chips", unit="face"):
        face_id = f"{index:012x}"
        store.write_chip(face_id, chips[index % len(chips)])
        names.append(f"person_{index % len(chips):05d}")
        ids.append(face_id)
        flags.append(True)
    # The source's own vectors never enter a re-embedding (only names, face ids and chips do).
    vectors = rng.standard_normal((faces, dim)).astype(np.float32)
    source.add_faces(names, vectors, model_id, flags, ids)
    return source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=10_000)
    parser.add_argument("--photos", type=int, default=600, help="LFW photos to cut the distinct chips from")
    parser.add_argument("--checkpoint", default="casia-webface-512", help="the model re-embedded into")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source_models = load_models(RecognitionConfig(false_accept_rate=None))
    crops = face_crops(source_models, lfw_payloads(args.photos), args.photos)
    chips = [chip_jpeg(crop) for crop in crops]
    target = load_models(RecognitionConfig(checkpoint=args.checkpoint, false_accept_rate=None)).embedder
    decoded = torch.stack([chip_tensor(chip) for chip in chips[:512]])
    alone_before = embed_images_per_s(target, decoded, 32)
    with tempfile.TemporaryDirectory() as directory:
        store = LocalGalleryStore(Path(directory))
        source_id = source_models.embedder.model_id
        source = build_source(store, chips, args.faces, source_id, source_models.embedder.dim)
        store.for_model(source_id).write(source.to_bytes())
        started = time.perf_counter()
        with tqdm(total=args.faces, desc=f"re-embedding into {target.model_id}", unit="face") as bar:
            report = reembed_snapshot(store, source, target, progress=bar.update)
        seconds = time.perf_counter() - started
    alone_after = embed_images_per_s(target, decoded, 32)
    alone = max(alone_before, alone_after)
    rate = report.embedded / seconds
    result = {
        "benchmark": "reembed_rate",
        "faces": args.faces,
        "distinct_chips": len(chips),
        "source_model": source_id,
        "target_model": target.model_id,
        "threads": args.threads,
        "embedder_alone_batch32_faces_per_s": round(alone, 2),
        "embedder_alone_before_after": [round(alone_before, 2), round(alone_after, 2)],
        "reembed_faces_per_s": round(rate, 2),
        "reembed_seconds": round(seconds, 1),
        "reembed_over_embedder": round(rate / alone, 3),
        "embedded": report.embedded,
        "machine": describe(),
    }
    (RESULTS / "reembed_rate.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
