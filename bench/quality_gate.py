"""Does a face's detection quality keep strangers out? Probability and size gates under the identify protocol.

    .venv/bin/python bench/quality_gate.py [--images DIR] [--probe-sides 0 64] [--limit N]

The open-set protocol of ``facerec eval identify`` (seed 0, one gallery photo per person, strangers held out), with
the shipped settings (``RecognitionConfig()`` defaults: its margin rule included). Enrolled photos are full size;
probes and strangers are full size (``0``) or downscaled to ``side`` x ``side`` JPEGs (as ``small_faces.py`` makes
them), so the same gates are measured where faces are large and where they are thumbnails.

For each probe size it reports DIR at FAR 1 % and 0.1 % (thresholds set on these strangers) with no gate and with
each quality gate, where a gate turns every probe or stranger whose face is below it into ``Unknown``:

* ``probability``: MTCNN's face probability of the face that was embedded;
* ``width``: that face's width in the probe's own pixels.

A gate is worth shipping only if it raises DIR at the same FAR. It also reports the FAR and DIR that the service's
own threshold (derived from the false-accept rate and this gallery's size) gives, so the shift of similarity at
64 x 64 shows as a change of FAR and DIR at the threshold users actually get.

Writes ``bench/results/identify/quality-gate.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import describe, label, results_dir
from small_faces import downscale
from tqdm import tqdm

from serve_app.evaluation.identify import (
    REJECTED_SCORE,
    IdentifySplit,
    SearchResults,
    apply_margin,
    build_gallery,
    evaluate_identification,
    list_photos,
    operating_point,
    search,
    split_people,
)
from serve_app.model.detector import centre_face
from serve_app.model.gallery import Gallery
from serve_app.model.images import decode_image
from serve_app.model.pipeline import Models
from serve_app.settings import RecognitionConfig

LFW_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lfw-view1" / "images"
BATCH = 32
FAR_TARGETS = (0.01, 0.001)
PROBABILITY_GATES = (0.9, 0.95, 0.99, 0.999, 0.9999)
#: Face widths as a share of the probe's shorter side (LFW's deep-funneled faces fill about 40 % of it).
WIDTH_SHARES = (0.25, 0.3, 0.35, 0.4)


@dataclass(frozen=True)
class Embedded:
    vectors: dict[str, np.ndarray]
    probability: dict[str, float]
    width: dict[str, float]


def embed(models: Models, root: Path, photos: list[str], side: int | None) -> Embedded:
    """Each photo's subject (the face a one-person photo is taken to show), with its probability and width."""
    vectors: dict[str, np.ndarray] = {}
    probability: dict[str, float] = {}
    width: dict[str, float] = {}
    for start in tqdm(range(0, len(photos), BATCH), desc=f"{side or 'full'}px", unit="batch"):
        chunk = photos[start : start + BATCH]
        images = [decode_image(downscale((root / name).read_bytes(), side)) for name in chunk]
        crops = []
        for name, image, found in zip(chunk, images, models.detector.detect_all(images), strict=True):
            # No face at all: the centre of the photo, as the CLI's evaluation does; its quality is zero.
            subject = found.subject()
            face = subject or centre_face(image.width, image.height)
            probability[name] = subject.probability if subject else 0.0
            width[name] = face.width / min(image.width, image.height)
            crops.append(models.detector.crops(image, [face]))
        for name, vector in zip(chunk, models.embedder.embed(torch.cat(crops)), strict=True):
            vectors[name] = vector
    return Embedded(vectors, probability, width)


def gated(results: SearchResults, quality: np.ndarray, minimum: float) -> SearchResults:
    """Searches whose face is below ``minimum`` quality rejected (answered ``Unknown``)."""
    scores = np.where(quality >= minimum, results.best_scores, REJECTED_SCORE)
    return SearchResults(results.best_people, scores, results.margins)


def at_far(
    probes: SearchResults, probe_people: list[str], strangers: SearchResults
) -> dict[str, dict[str, float | int]]:
    result = evaluate_identification(
        probes, probe_people, strangers, operating_threshold=math.inf, far_targets=FAR_TARGETS
    )
    return {f"{far:g}": point.as_dict() for far, point in result.at_far.items()}


def enrolled_gallery(models: Models, root: Path, split: IdentifySplit) -> Gallery:
    """The split's gallery, from full-size photos: every probe size searches the same one."""
    enrolled = [photo for photos in split.gallery.values() for photo in photos]
    return build_gallery(split, embed(models, root, enrolled, None).vectors, models.embedder.model_id)


def measure(
    models: Models,
    config: RecognitionConfig,
    root: Path,
    split: IdentifySplit,
    gallery: Gallery,
    side: int | None,
    limit: int | None,
) -> dict[str, Any]:
    probes = list(split.probes[:limit] if limit else split.probes)
    strangers = list(split.strangers[:limit] if limit else split.strangers)
    queried = embed(models, root, [p for _, p in probes] + [p for _, p in strangers], side)
    probe_people = [person for person, _ in probes]

    def searched(pairs: list[tuple[str, str]]) -> tuple[SearchResults, np.ndarray, np.ndarray]:
        results = search(gallery, np.stack([queried.vectors[p] for _, p in pairs]))
        return (
            apply_margin(results, config.min_margin),
            np.array([queried.probability[p] for _, p in pairs]),
            np.array([queried.width[p] for _, p in pairs]),
        )

    probe_results, probe_probability, probe_width = searched(probes)
    stranger_results, stranger_probability, stranger_width = searched(strangers)
    service = models.threshold_rule.for_gallery(len(split.gallery))
    correct = np.array([best == true for best, true in zip(probe_results.best_people, probe_people, strict=True)])
    gates: list[dict[str, Any]] = []
    for kind, minimums, probe_quality, stranger_quality in (
        ("probability", PROBABILITY_GATES, probe_probability, stranger_probability),
        ("width", WIDTH_SHARES, probe_width, stranger_width),
    ):
        for minimum in minimums:
            gates.append(
                {
                    "gate": kind,
                    "minimum": minimum,
                    "probes_gated": round(float(np.mean(probe_quality < minimum)), 4),
                    "strangers_gated": round(float(np.mean(stranger_quality < minimum)), 4),
                    "at_far": at_far(
                        gated(probe_results, probe_quality, minimum),
                        probe_people,
                        gated(stranger_results, stranger_quality, minimum),
                    ),
                }
            )
    return {
        "probe_side": side or "full (250)",
        "enrolled_people": len(split.gallery),
        "known_probes": len(probes),
        "strangers": len(strangers),
        "weak_subjects": int(np.sum(probe_probability < config.detect_probability))
        + int(np.sum(stranger_probability < config.detect_probability)),
        "width_share_median": round(float(np.median(np.concatenate([probe_width, stranger_width]))), 3),
        "same_person_mean_similarity": round(
            float(np.mean(probe_results.best_scores[correct & (probe_results.best_scores > REJECTED_SCORE)])), 4
        ),
        "service_threshold": {
            **operating_point(
                probe_results.best_scores, correct, stranger_results.best_scores, service.value
            ).as_dict(),
            "source": service.source,
        },
        "no_gate": at_far(probe_results, probe_people, stranger_results),
        "gates": gates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=LFW_IMAGES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-sides", type=int, nargs="+", default=[0, 64], help="0: full size")
    parser.add_argument("--limit", type=int, default=None, help="at most this many probes and strangers (a trial)")
    args = parser.parse_args()
    config = RecognitionConfig()
    models = config.load_models()
    machine = describe()
    split = split_people(list_photos(args.images), seed=args.seed)
    gallery = enrolled_gallery(models, args.images, split)
    runs = [measure(models, config, args.images, split, gallery, side or None, args.limit) for side in args.probe_sides]
    for run in runs:
        print(f"probes {run['probe_side']}: service {run['service_threshold']}")
        print(f"  no gate: {run['no_gate']}")
        for gate in run["gates"]:
            far1 = gate["at_far"]["0.01"]["dir"]
            far01 = gate["at_far"]["0.001"]["dir"]
            print(
                f"  {gate['gate']} >= {gate['minimum']}: DIR@1% {far1} DIR@0.1% {far01}"
                f" (probes gated {gate['probes_gated']}, strangers {gate['strangers_gated']})"
            )
    out = results_dir() / "identify" / "quality-gate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"machine": machine, "cpu": label(machine), "settings": config.model_dump(), "runs": runs}, indent=2)
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
