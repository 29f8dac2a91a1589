"""The open-set identification protocol: the split, DIR/FAR arithmetic on hand-made scores, and one real run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from facerec.cli.main import main
from serve_app.evaluation.identify import (
    REJECTED_SCORE,
    CachedEmbeddings,
    SearchResults,
    apply_margin,
    build_gallery,
    det_curve,
    detection_identification_rate,
    evaluate_identification,
    false_accept_rate,
    list_photos,
    load_embedding_cache,
    margin_sweep,
    rank1_rate,
    save_embedding_cache,
    search,
    split_people,
    threshold_at_far,
    wilson_interval,
)
from serve_app.model.checkpoints import CHECKPOINTS, DEFAULT_CHECKPOINT

DATASETS = Path(os.environ.get("FACEREC_DATASETS", Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))
LFW_IMAGES = DATASETS / "lfw-view1" / "images"


def photo_counts(counts: dict[str, int]) -> dict[str, list[str]]:
    return {name: [f"{name}/{name}_{i:04d}.jpg" for i in range(1, n + 1)] for name, n in counts.items()}


# 40 people with 1-6 photos each: 10 with one photo, 30 enrollable.
PHOTOS = photo_counts({f"P{i:02d}": 1 + i % 6 if i >= 10 else 1 for i in range(40)})


# --- the split -------------------------------------------------------------------------------------------------
def test_split_is_deterministic_for_a_seed_and_ignores_input_order() -> None:
    first = split_people(PHOTOS, seed=7, strangers_fraction=0.2)
    again = split_people(dict(reversed(list(PHOTOS.items()))), seed=7, strangers_fraction=0.2)
    assert first == again
    other = split_people(PHOTOS, seed=8, strangers_fraction=0.2)
    assert (first.gallery, first.strangers) != (other.gallery, other.strangers)


@pytest.mark.parametrize(("gallery_photos", "min_photos", "fraction"), [(1, 2, 0.0), (1, 2, 0.25), (2, 3, 0.1)])
def test_split_is_disjoint_by_person_and_sized_as_asked(gallery_photos: int, min_photos: int, fraction: float) -> None:
    split = split_people(
        PHOTOS, seed=3, gallery_photos=gallery_photos, min_photos=min_photos, strangers_fraction=fraction
    )
    enrolled = set(split.gallery)
    probe_people = {person for person, _ in split.probes}
    strangers = split.stranger_people()
    assert probe_people <= enrolled
    assert not enrolled & strangers
    assert enrolled | strangers == set(PHOTOS)
    eligible = [p for p, photos in PHOTOS.items() if len(photos) >= min_photos]
    assert len(strangers & set(eligible)) == round(fraction * len(eligible))
    # Everyone with too few photos is a stranger; every enrolled person has exactly gallery_photos enrolled.
    assert {p for p, photos in PHOTOS.items() if len(photos) < min_photos} <= strangers
    assert all(len(photos) == gallery_photos for photos in split.gallery.values())
    # Every photo is used exactly once, by its own person.
    used = [p for photos in split.gallery.values() for p in photos] + [p for _, p in split.probes + split.strangers]
    assert sorted(used) == sorted(p for photos in PHOTOS.values() for p in photos)
    assert all(photo.startswith(f"{person}/") for person, photo in split.probes + split.strangers)
    assert all(all(p.startswith(f"{person}/") for p in photos) for person, photos in split.gallery.items())
    assert len(split.probes) == sum(len(PHOTOS[p]) - gallery_photos for p in enrolled)
    assert len(split.photos()) == len(used)


@pytest.mark.parametrize(
    "kwargs", [{"gallery_photos": 0}, {"gallery_photos": 2, "min_photos": 2}, {"strangers_fraction": 1.0}]
)
def test_split_refuses_settings_without_probes_or_enrolment(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        split_people(PHOTOS, seed=0, **kwargs)  # type: ignore[arg-type]


def test_list_photos_reads_an_lfw_style_folder(tmp_path: Path) -> None:
    for name, files in {"Ann": ["Ann_0001.jpg", "Ann_0002.JPG", "notes.txt"], "Bob": ["Bob_0001.png"]}.items():
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_bytes(b"")
    (tmp_path / "Empty").mkdir()
    assert list_photos(tmp_path) == {"Ann": ["Ann/Ann_0001.jpg", "Ann/Ann_0002.JPG"], "Bob": ["Bob/Bob_0001.png"]}
    assert list_photos(tmp_path, {"Bob"}) == {"Bob": ["Bob/Bob_0001.png"]}


# --- scores and rates on hand-made lists ---------------------------------------------------------------------
def test_rates_on_hand_made_scores() -> None:
    assert rank1_rate(["a", "b", "c", "x"], ["a", "b", "c", "d"]) == 0.75
    best = np.array([0.9, 0.8, 0.5, 0.95])
    correct = np.array([True, True, True, False])
    # At 0.6: probes 0 and 1 are named correctly; probe 3 is mis-named however high it scores.
    assert detection_identification_rate(best, correct, 0.6) == 0.5
    assert detection_identification_rate(best, correct, 0.5) == 0.75  # at or above counts
    assert detection_identification_rate(best, correct, 0.96) == 0.0
    strangers = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert false_accept_rate(strangers, 0.75) == 0.3
    assert false_accept_rate(strangers, 0.7) == 0.4
    assert math.isnan(false_accept_rate(np.array([]), 0.5))


def test_threshold_at_far_is_the_lowest_that_keeps_the_rate() -> None:
    strangers = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    t10 = threshold_at_far(strangers, 0.1)  # one of ten may pass: just above the second highest
    assert 0.8 < t10 < 0.8 + 1e-9 and false_accept_rate(strangers, t10) == 0.1
    t0 = threshold_at_far(strangers, 0.05)  # none may pass
    assert 0.9 < t0 < 0.9 + 1e-9 and false_accept_rate(strangers, t0) == 0.0
    assert false_accept_rate(strangers, threshold_at_far(strangers, 0.3)) == 0.3
    assert threshold_at_far(strangers, 1.0) == 0.0
    # Ties at the boundary are all rejected, so the rate stays within the target.
    tied = np.array([0.5, 0.5, 0.5, 0.1])
    assert false_accept_rate(tied, threshold_at_far(tied, 0.5)) == 0.0


def test_det_curve_counts_at_every_threshold() -> None:
    best = np.array([0.9, 0.7, 0.6])
    correct = np.array([True, False, True])
    strangers = np.array([0.8, 0.5])
    curve = det_curve(best, correct, strangers)
    assert curve.thresholds.tolist() == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert curve.far.tolist() == [0.0, 0.5, 0.5, 0.5, 1.0]
    assert np.allclose(curve.fnir, [2 / 3, 2 / 3, 2 / 3, 1 / 3, 1 / 3])


def test_evaluate_identification_on_hand_made_results() -> None:
    probes = SearchResults(("a", "b", "c", "x"), np.array([0.9, 0.8, 0.5, 0.95]), np.zeros(4))
    strangers = SearchResults(tuple("abcdefghij"), np.linspace(0.1, 1.0, 10), np.zeros(10))
    result = evaluate_identification(probes, ["a", "b", "c", "d"], strangers, operating_threshold=0.55)
    assert result.rank1 == 0.75
    point = result.at_operating_threshold
    assert point.threshold == 0.55 and point.false_accepts == 5 and point.far == 0.5 and point.dir == 0.5
    at_10 = result.at_far[0.01]  # 10 strangers: 1% allows none, so the threshold clears the highest (1.0)
    assert at_10.false_accepts == 0 and at_10.dir == 0.0
    assert result.at_far[0.001].threshold == at_10.threshold


def test_margin_rule_rejects_searches_whose_best_person_barely_leads() -> None:
    results = SearchResults(("a", "b", "c"), np.array([0.9, 0.8, 0.7]), np.array([0.3, 0.05, 0.1]))
    assert apply_margin(results, 0.0) is results
    gated = apply_margin(results, 0.1)
    assert gated.best_people == results.best_people and np.array_equal(gated.margins, results.margins)
    assert gated.best_scores.tolist() == [0.9, REJECTED_SCORE, 0.7]  # a margin equal to the rule's passes


def test_margin_rule_trades_ambiguous_strangers_for_dir() -> None:
    # Known probes lead their second-best person clearly, except the last; the strangers' best scores are as high
    # as the probes' but they resemble two people about equally.
    probes = SearchResults(("a", "b", "c", "d"), np.array([0.85, 0.8, 0.7, 0.97]), np.array([0.3, 0.3, 0.3, 0.02]))
    strangers = SearchResults(tuple("abcdefghij"), np.linspace(0.5, 0.95, 10), np.full(10, 0.02))
    strangers.margins[0] = 0.4  # one stranger (the lowest scoring) clearly resembles one person
    people = ["a", "b", "c", "d"]
    plain = evaluate_identification(probes, people, strangers, operating_threshold=0.62, far_targets=(0.1,))
    ruled = evaluate_identification(probes, people, strangers, operating_threshold=0.62, far_targets=(0.1,), margin=0.1)
    assert ruled.rank1 == plain.rank1 == 1.0 and ruled.margin == 0.1 and plain.margin == 0.0
    # 10 strangers, FAR 10%: one may pass. Without the rule the threshold clears the second-highest stranger
    # (0.90): only "d" (0.97) is named. With it only one stranger is left to reject, and it may pass.
    assert plain.at_far[0.1].dir == 0.25 and plain.at_far[0.1].false_accepts == 1
    assert ruled.at_far[0.1].dir == 0.75 and ruled.at_far[0.1].false_accepts == 1
    # At a fixed threshold the rule only removes accepts: the strangers at 0.65 and up (7) all lack the margin.
    assert plain.at_operating_threshold.false_accepts == 7 and ruled.at_operating_threshold.false_accepts == 0
    assert ruled.at_operating_threshold.dir == 0.75
    # The rejected searches are no point of the DET curve.
    assert ruled.curve.thresholds.min() > REJECTED_SCORE

    rows = margin_sweep(probes, people, strangers, margins=(0.1, 0.5), far_targets=(0.1,))
    assert [row["margin"] for row in rows] == [0.1, 0.5]
    assert rows[0]["probes_below_margin"] == 0.25 and rows[0]["strangers_below_margin"] == 0.9
    assert rows[0]["at_far"]["0.1"]["dir"] == 0.75  # type: ignore[index]
    assert rows[1]["at_far"]["0.1"]["dir"] == 0.0  # type: ignore[index]  # nobody leads by 0.5


def test_search_scores_each_person_by_their_closest_face() -> None:
    def unit(*values: float) -> np.ndarray:
        vector = np.asarray(values, dtype=np.float32)
        return vector / np.linalg.norm(vector)

    split = split_people({"ann": ["ann/1", "ann/2", "ann/3"], "bob": ["bob/1", "bob/2"]}, seed=0, gallery_photos=1)
    embeddings = {
        "ann/1": unit(1, 0, 0),
        "ann/2": unit(1, 0.1, 0),
        "ann/3": unit(1, 0, 0.1),
        "bob/1": unit(0, 1, 0),
        "bob/2": unit(0.1, 1, 0),
    }
    # Enrol both of bob's faces by hand: a person's score is the best over their faces.
    gallery = build_gallery(split, embeddings, "m")
    gallery.add("bob", np.stack([embeddings["bob/1"], embeddings["bob/2"]]), "m")
    query = unit(0.1, 1, 0.05)
    results = search(gallery, query[None])
    assert results.best_people == ("bob",)
    assert results.best_scores[0] == pytest.approx(float(query @ embeddings["bob/2"]), abs=1e-6)


def test_embedding_cache_round_trip_and_key(tmp_path: Path) -> None:
    path = tmp_path / "cache.npz"
    assert load_embedding_cache(path, "k").embeddings == {}
    vectors = {"a/a_0001.jpg": np.array([1.0, 0.0], np.float32), "b/b_0001.jpg": np.array([0.0, 1.0], np.float32)}
    save_embedding_cache(path, CachedEmbeddings("k", vectors, frozenset({"b/b_0001.jpg"})))
    loaded = load_embedding_cache(path, "k")
    assert loaded.missing == {"b/b_0001.jpg"}
    assert sorted(loaded.embeddings) == sorted(vectors)
    assert np.array_equal(loaded.embeddings["a/a_0001.jpg"], vectors["a/a_0001.jpg"])
    # Embeddings of another model or detector setting are never mixed in.
    assert load_embedding_cache(path, "other").embeddings == {}


def test_wilson_interval_brackets_the_rate() -> None:
    low, high = wilson_interval(2, 2000)
    assert low < 0.001 < high < 0.004
    assert wilson_interval(0, 100)[0] == 0.0


# --- end to end on real photos -------------------------------------------------------------------------------
def lfw_slice(destination: Path, people: int = 70) -> Path:
    """A small LFW-style folder of links to the first ``people`` View 1 people (about 120 photos)."""
    if not LFW_IMAGES.is_dir():
        pytest.fail(f"the shared LFW View 1 photos are missing at {LFW_IMAGES} (set FACEREC_DATASETS)")
    destination.mkdir()
    for folder in sorted(p for p in LFW_IMAGES.iterdir() if p.is_dir())[:people]:
        (destination / folder.name).symlink_to(folder, target_is_directory=True)
    return destination


@pytest.mark.slow
def test_eval_identify_on_a_slice_of_lfw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = lfw_slice(tmp_path / "images")
    plot = tmp_path / "det.png"
    argv = ["eval", "identify", "--images", str(images), "--seed", "1", "--strangers-fraction", "0.2"]
    code = main([*argv, "--plot", str(plot), "--checkpoint", DEFAULT_CHECKPOINT, "--no-progress"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    split = report["split"]
    photos = sum(len(v) for v in list_photos(images).values())
    assert split["enrolled_people"] == split["gallery_faces"] >= 15
    assert split["gallery_faces"] + split["known_probes"] + split["strangers"] == photos
    assert split["stranger_people"] + split["enrolled_people"] == 70
    # The default checkpoint names almost every enrolled person's other photo right (LFW rank-1 about 0.97).
    assert report["rank1"] >= 0.85, report
    at_1, at_01 = report["at_far"]["0.01"], report["at_far"]["0.001"]
    assert at_01["threshold"] >= at_1["threshold"] and at_01["dir"] <= at_1["dir"] <= report["rank1"]
    assert at_1["far"] <= 0.01
    operating = report["at_operating_threshold"]
    assert operating["threshold"] == CHECKPOINTS[DEFAULT_CHECKPOINT].threshold
    assert 0.0 <= operating["far"] <= 1.0 and operating["dir"] <= report["rank1"]
    service = report["at_service_threshold"]
    assert service["source"] in {"fixed", "false_accept_rate"} and 0.0 <= service["far"] <= 1.0
    assert [row["margin"] for row in report["margin_rule"]] == [0.05, 0.1, 0.15, 0.2, 0.25]
    assert all(row["at_far"]["0.01"]["dir"] <= report["rank1"] for row in report["margin_rule"])
    if report["calibrated"] is not None:  # the shipped calibration exists: the derived thresholds are reported
        derived = report["calibrated"]["at_target_far"]
        assert [d["target_far"] for d in derived] == [0.01, 0.001]
        assert derived[1]["threshold"] >= derived[0]["threshold"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
