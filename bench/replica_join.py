"""A Recognizer replica joining a large gallery: how long until it serves, and the memory it needs.

    .venv/bin/python bench/replica_join.py [--sizes 1000000 10000000] [--real 1000]

For each size, a base snapshot in the documented format (``serve_app.model.gallery``) is written to a local store
directory: real faces (LFW View 1 photos embedded by the shipped model, people with 2+ photos: one photo enrolled,
another held out as that person's query) among distractors drawn from a Gaussian with the real embeddings' mean and
covariance (not isotropic noise), normalised, 5 per synthetic person, with ids as the service makes them. Then a
fresh process joins it exactly as a Recognizer replica does (``load_gallery`` with the replica's float16 rows, then
``build_index`` with the shipped policy) and reports:

* the time to read the base (from local disk: downloading it from S3 is modelled in the README from its size) and
  the replica's memory (RSS growth of the process, and its peak) after the read and with the index;
* one query's latency while the index is built (exact search, which answers meanwhile) and once it serves;
* the index's training and filling time, and its recall@1 against exact search over the held-out real faces.

Writes ``bench/results/replica_join.json`` and ``.png`` and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gallery_changes import FACES_PER_DISTRACTOR, distractors, real_faces, rss_bytes, timed
from machine import describe, label, results_dir

from serve_app.gallery_journal import load_gallery
from serve_app.gallery_store import LocalGalleryStore
from serve_app.model.gallery import FORMAT_NAME, FORMAT_VERSION, write_column, write_member
from serve_app.model.gallery_index import DEFAULT_INDEX_POLICY, build_index
from serve_app.model.gallery_rows import REPLICA_HALF_ROWS_FROM
from serve_app.settings import RecognitionConfig

RESULTS = results_dir()
MODEL_ID = RecognitionConfig().model_id
#: Distractors drawn and written at a time (the base is written in pieces, never held whole).
DRAW_CHUNK = 1_000_000
#: A worker's memory (c6i.xlarge).
WORKER_BYTES = 8 * 1024**3


def peak_rss_bytes() -> int:
    """This process's peak RSS (``VmHWM``: unlike ``ru_maxrss``, not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def write_base(directory: Path, size: int, enrolled: dict[str, np.ndarray], real: np.ndarray) -> Path:
    """A base snapshot of ``size`` faces in the documented format, written column by column to a zip."""
    rng = np.random.default_rng(size)
    people = sorted(enrolled)
    synthetic = size - len(people)
    path = directory / "models" / f"{MODEL_ID}.npz"
    path.parent.mkdir(parents=True)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model_id": MODEL_ID, "dim": real.shape[1]}
    dim = real.shape[1]

    def embeddings() -> Iterator[np.ndarray]:
        yield np.stack([enrolled[p] for p in people]).astype(np.float32)
        for start in range(0, synthetic, DRAW_CHUNK):
            yield distractors(real, min(DRAW_CHUNK, synthetic - start), seed=start)

    with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
        write_member(archive, "meta", np.array(json.dumps({**meta, "revision": 1})))
        write_column(archive, "embeddings", np.dtype("<f4"), (size, dim), embeddings())
        numbers = (np.arange(synthetic) // FACES_PER_DISTRACTOR).astype(str)
        names = np.concatenate([np.array(people), np.char.add("distractor-", np.char.zfill(numbers, 8))])
        write_member(archive, "names", names)
        ids = np.char.zfill(np.char.mod("%x", rng.integers(0, 1 << 48, size)), 12)
        write_member(archive, "face_ids", ids.astype("U12"))
        write_member(archive, "has_chip", np.zeros(size, dtype=bool))
        write_member(archive, "removed_ids", np.array([], dtype="U12"))
    return path


def join(directory: Path, queries_path: Path) -> dict[str, Any]:
    """Join the gallery in ``directory`` as a replica does (run in a fresh process)."""
    held_out = np.load(queries_path)
    queries, people = held_out["queries"], held_out["people"]
    before = rss_bytes()
    started = time.perf_counter()
    store = LocalGalleryStore(directory).for_model(MODEL_ID)
    gallery = load_gallery(store, MODEL_ID, half_rows_from=REPLICA_HALF_ROWS_FROM)
    assert gallery is not None
    read_s = time.perf_counter() - started
    after_read = rss_bytes() - before
    exact_ms = [timed(gallery, q, exact=True) for q in queries[:10]]
    exact_top1 = []
    for start in range(0, len(queries), 16):  # batches of 16: the product is 16 x faces floats
        exact_top1 += [m.name for m in gallery.match(queries[start : start + 16], threshold=-1.0, exact=True)]
    started = time.perf_counter()
    index = build_index(gallery, threading.Lock(), DEFAULT_INDEX_POLICY)
    index_s = time.perf_counter() - started
    served_ms = [timed(gallery, q) for q in queries]
    served_top1 = [gallery.match(q[None], threshold=-1.0)[0].name for q in queries]
    agreement = float(np.mean([a == b for a, b in zip(served_top1, exact_top1, strict=True)]))
    return {
        "faces": len(gallery),
        "read_base_s": round(read_s, 1),
        "rows_in_half": gallery.rows_in_half,
        "memory_after_read_bytes": after_read,
        "memory_with_index_bytes": rss_bytes() - before,
        "gallery_arrays_bytes": gallery.nbytes,
        "peak_rss_bytes": peak_rss_bytes(),
        "process_rss_before_bytes": before,
        "exact_query_ms": round(1000 * statistics.median(exact_ms), 1),
        "index": None
        if index is None
        else {"lists": index.lists, "probed": index.probed, "build_s": round(index_s, 1)},
        "served_query_ms": {
            "median": round(1000 * statistics.median(served_ms), 2),
            "p95": round(1000 * float(np.percentile(served_ms, 95)), 2),
        },
        "recall_at_1_vs_exact": round(agreement, 4),
        "held_out_named_right": round(float(np.mean([a == b for a, b in zip(served_top1, people, strict=True)])), 4),
        "queries": len(queries),
    }


def measure(size: int, enrolled: dict[str, np.ndarray], held_out: dict[str, np.ndarray], real: np.ndarray) -> Any:
    with tempfile.TemporaryDirectory(prefix="replica-join-") as folder:
        directory = Path(folder) / "store"
        started = time.perf_counter()
        base = write_base(directory, size, enrolled, real)
        written_s = time.perf_counter() - started
        queries_path = Path(folder) / "queries.npz"
        people = sorted(held_out)
        np.savez(queries_path, queries=np.stack([held_out[p] for p in people]), people=np.array(people))
        child = subprocess.run(
            [sys.executable, __file__, "--join", str(directory), str(queries_path)],
            check=True,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        row = json.loads(child.stdout.strip().splitlines()[-1])
        row["base_bytes"] = base.stat().st_size
        row["base_written_s"] = round(written_s, 1)
        print(json.dumps(row), flush=True)
        return row


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["sizes"]
    faces = [r["faces"] for r in rows]
    figure, (memory, timing) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    memory.plot(faces, [r["memory_after_read_bytes"] / 1e9 for r in rows], marker="o", label="after reading the base")
    memory.plot(faces, [r["memory_with_index_bytes"] / 1e9 for r in rows], marker="o", label="with the index")
    memory.axhline(WORKER_BYTES / 1e9, color="grey", linestyle="--", label="c6i.xlarge memory")
    memory.set_xscale("log")
    memory.set_xlabel("faces in the gallery")
    memory.set_ylabel("GB (gallery only, the model apart)")
    memory.legend(fontsize=8)
    timing.plot(faces, [r["read_base_s"] for r in rows], marker="o", label="read the base (serving exactly after)")
    timing.plot(
        faces,
        [r["read_base_s"] + (r["index"]["build_s"] if r["index"] else 0) for r in rows],
        marker="o",
        label="+ index built (serving fast)",
    )
    timing.set_xscale("log")
    timing.set_xlabel("faces in the gallery")
    timing.set_ylabel("seconds from start")
    timing.legend(fontsize=8)
    figure.suptitle(f"A replica joining a large gallery ({label(result['machine'])})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--real", type=int, default=1000, help="LFW photos embedded (half enrolled, half queries)")
    parser.add_argument("--join", nargs=2, metavar=("STORE", "QUERIES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.join:
        print(json.dumps(join(Path(args.join[0]), Path(args.join[1]))))
        return
    enrolled, held_out = real_faces(args.real)
    real = np.stack([enrolled[p] for p in sorted(enrolled)] + [held_out[p] for p in sorted(held_out)])
    rows = [measure(size, enrolled, held_out, real) for size in args.sizes]
    result = {
        "benchmark": "replica_join",
        "store": "a local directory (the S3 download is modelled from the base's size)",
        "real_faces": len(enrolled),
        "distractors": "Gaussian with the mean and covariance of the real embeddings, normalised",
        "worker_memory_bytes": WORKER_BYTES,
        "sizes": rows,
        "machine": describe(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "replica_join.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / "replica_join.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
