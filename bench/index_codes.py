"""How the approximate index stores faces: recall@1 and query time of each coding, one gallery, one run.

    .venv/bin/python bench/index_codes.py [--faces 1000000] [--real 1000]

The gallery: real faces (LFW View 1 photos embedded by the shipped model, one photo of each person enrolled,
another held out as the query) among distractors drawn from a Gaussian with the real embeddings' mean and
covariance (not isotropic noise). Each coding is an IVF index over the same k-means cells (as many as the service
makes for this size, ``list_count``), searched one query at a time for the first depth of candidates matching
asks for (``FIRST_DEPTH``); the candidates are scored exactly, as matching does, and recall@1 is the share of
queries whose best face is exact search's. The shipped coding is :class:`serve_app.model.gallery_index.FaceIndex`'s;
the others are what it was chosen against. Writes ``bench/results/index_codes.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import faiss
import numpy as np
from gallery_changes import distractors, real_faces
from machine import describe, label, results_dir
from replica_join import DRAW_CHUNK

from serve_app.model.gallery import FIRST_DEPTH
from serve_app.model.gallery_index import (
    CODE_BITS,
    PROBED_FRACTION,
    SUBVECTOR_DIM,
    TRAINING_ITERATIONS,
    TRAINING_POINTS_PER_LIST,
    FaceIndex,
    list_count,
)

RESULTS = results_dir()
#: One cell in this many probed: the shipped fraction and the cheaper ones it was chosen against.
FRACTIONS = (PROBED_FRACTION, 2 * PROBED_FRACTION, 4 * PROBED_FRACTION)
#: What the indexes use and do not own (their quantisers), kept alive as long as they are.
KEPT: list[Any] = []


def codings(dim: int, lists: int) -> dict[str, Any]:
    """Each coding's index, untrained, over ``lists`` cells."""

    def ivf(make: Any) -> Any:
        quantizer = faiss.IndexFlatIP(dim)
        KEPT.append(quantizer)  # an index does not own its quantizer
        index = make(quantizer)
        index.cp.niter = TRAINING_ITERATIONS
        return index

    face_index = FaceIndex(dim, lists)
    KEPT.append(face_index)
    shipped = face_index._index
    return {
        f"PQ fast scan, {CODE_BITS} bits per {SUBVECTOR_DIM} coordinates (shipped)": shipped,
        f"PQ fast scan, {CODE_BITS} bits per {2 * SUBVECTOR_DIM} coordinates": ivf(
            lambda q: faiss.IndexIVFPQFastScan(
                q, dim, lists, dim // (2 * SUBVECTOR_DIM), CODE_BITS, faiss.METRIC_INNER_PRODUCT
            )
        ),
        "8 bits a coordinate (scalar quantiser)": ivf(
            lambda q: faiss.IndexIVFScalarQuantizer(
                q, dim, lists, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        ),
    }


def measure(
    name: str, index: Any, rows: np.ndarray, queries: np.ndarray, exact: np.ndarray, lists: int
) -> dict[str, Any]:
    sample = rows[np.random.default_rng(1).choice(len(rows), TRAINING_POINTS_PER_LIST * lists, replace=False)]
    started = time.perf_counter()
    index.train(sample)
    trained = time.perf_counter() - started
    for start in range(0, len(rows), DRAW_CHUNK):
        chunk = rows[start : start + DRAW_CHUNK]
        index.add_with_ids(chunk, np.arange(start, start + len(chunk), dtype=np.int64))
    filled = time.perf_counter() - started - trained
    probes = []
    for fraction in FRACTIONS:
        index.nprobe = max(1, lists // fraction)
        latencies, hits = [], 0
        for query, best in zip(queries, exact, strict=True):
            started = time.perf_counter()
            _, keys = index.search(query[None], FIRST_DEPTH)
            latencies.append(time.perf_counter() - started)
            keys = keys[0][keys[0] >= 0]
            hits += bool(len(keys)) and int(keys[np.argmax(rows[keys] @ query)]) == int(best)
        probes.append(
            {
                "probed_fraction": 1 / fraction,
                "recall_at_1": hits / len(queries),
                "query_ms_median": 1000 * statistics.median(latencies),
                "query_ms_p95": 1000 * float(np.percentile(latencies, 95)),
            }
        )
        print(name, json.dumps(probes[-1]), flush=True)
    return {
        "coding": name,
        "bytes_a_face": int(index.code_size),
        "train_s": trained,
        "fill_s": filled,
        "probes": probes,
    }


def plot(result: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for coding in result["codings"]:
        probes = coding["probes"]
        axes.plot(
            [p["query_ms_median"] for p in probes],
            [p["recall_at_1"] for p in probes],
            marker="o",
            label=f"{coding['coding']}: {coding['bytes_a_face']} B a face",
        )
    axes.axhline(0.99, color="grey", linestyle="--", label="recall@1 target")
    axes.set_xlabel("one query, median ms (probing 1/16, 1/8, 1/4 of the cells)")
    axes.set_ylabel("recall@1 against exact search")
    axes.legend(fontsize=7)
    figure.suptitle(f"Index codings at {result['faces']:,} faces ({label(result['machine'])})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--real", type=int, default=1000, help="LFW photos embedded (half enrolled, half queries)")
    args = parser.parse_args()
    enrolled, held_out = real_faces(args.real)
    people = sorted(set(enrolled) & set(held_out))
    real = np.stack([enrolled[p] for p in people] + [held_out[p] for p in people]).astype(np.float32)
    rows = np.empty((args.faces, real.shape[1]), dtype=np.float32)
    rows[: len(people)] = np.stack([enrolled[p] for p in people])
    for start in range(len(people), args.faces, DRAW_CHUNK):
        count = min(DRAW_CHUNK, args.faces - start)
        rows[start : start + count] = distractors(real, count, seed=start)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    queries = np.stack([held_out[p] for p in people]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.concatenate([np.argmax(queries[i : i + 64] @ rows.T, axis=1) for i in range(0, len(queries), 64)])
    lists = list_count(args.faces)
    result = {
        "benchmark": "index_codes",
        "faces": args.faces,
        "real_faces": len(people),
        "lists": lists,
        "first_depth": FIRST_DEPTH,
        "distractors": "Gaussian with the mean and covariance of the real embeddings, normalised",
        "codings": [
            measure(name, index, rows, queries, exact, lists) for name, index in codings(rows.shape[1], lists).items()
        ],
        "machine": describe(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "index_codes.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / "index_codes.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
