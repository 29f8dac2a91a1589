"""The LFW protocol's arithmetic: pair parsing, threshold choice, AUC and 10-fold cross-validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serve_app.evaluation.lfw import (
    PairsFormatError,
    accuracy_at,
    best_threshold,
    evaluate,
    read_pairs,
    roc_auc,
)

from .conftest import LFW


def test_reads_view1_files_from_the_dataset() -> None:
    train = read_pairs(LFW / "pairsDevTrain.txt")
    test = read_pairs(LFW / "pairsDevTest.txt")
    assert len(train.pairs) == 2200 and len(test.pairs) == 1000
    assert train.folds == test.folds == 1
    assert sum(p.same for p in test.pairs) == 500
    first = test.pairs[0]
    assert first.same and (LFW / "images" / first.left).is_file() and (LFW / "images" / first.right).is_file()
    assert all((LFW / "images" / name).is_file() for name in test.images())


def test_reads_view2_ten_fold_format(tmp_path: Path) -> None:
    lines = ["2 2"]
    for fold in range(2):
        lines += [f"A{fold} 1 2", f"B{fold} 1 3", f"C{fold} 1 D{fold} 2", f"E{fold} 4 F{fold} 1"]
    path = tmp_path / "pairs.txt"
    path.write_text("\n".join(lines) + "\n")
    parsed = read_pairs(path)
    assert parsed.folds == 2
    assert [p.fold for p in parsed.pairs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert parsed.pairs[0].left == "A0/A0_0001.jpg" and parsed.pairs[0].right == "A0/A0_0002.jpg"
    assert not parsed.pairs[2].same and parsed.pairs[2].right == "D0/D0_0002.jpg"


@pytest.mark.parametrize("text", ["", "3\nA 1 2\n", "x y\n", "1\nA 1\nB 1 C 2\n"])
def test_malformed_pairs_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(PairsFormatError):
        read_pairs(path)


def test_best_threshold_separates_separable_scores() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    labels = np.array([True, True, True, False, False, False])
    threshold = best_threshold(scores, labels)
    assert 0.3 < threshold < 0.7
    assert accuracy_at(scores, labels, threshold) == 1.0
    assert roc_auc(scores, labels) == 1.0


def test_best_threshold_is_optimal_by_brute_force() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(400) < 0.5
    scores = np.where(labels, rng.normal(0.6, 0.15, 400), rng.normal(0.3, 0.15, 400))
    chosen = accuracy_at(scores, labels, best_threshold(scores, labels))
    brute = max(accuracy_at(scores, labels, t) for t in np.concatenate([scores, [scores.max() + 1]]))
    assert chosen == pytest.approx(brute)


def test_auc_counts_ties_half_and_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(5)
    labels = rng.random(200) < 0.4
    scores = np.round(rng.random(200), 1)  # many ties
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert roc_auc(scores, labels) == pytest.approx(pairwise)


def _pairs_file(tmp_path: Path, header: str, rows: list[str]) -> Path:
    path = tmp_path / "p.txt"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_calibrated_view1_uses_the_calibration_threshold(tmp_path: Path) -> None:
    # The calibration pairs put the boundary near 0.56; both evaluated pairs score above it, so the different
    # pair is a false accept. A threshold chosen in hindsight on the evaluated pairs would score 1.0 instead.
    angles = {"cal_same": 0.3, "cal_diff": 1.4, "ev_same": 0.2, "ev_diff": 0.5}

    def pair_vectors(angle: float) -> tuple[np.ndarray, np.ndarray]:
        return np.array([1.0, 0.0]), np.array([np.cos(angle), np.sin(angle)])

    embeddings: dict[str, np.ndarray] = {}
    cal_rows: list[str] = []
    ev_rows: list[str] = []
    for i, (kind, angle) in enumerate(angles.items()):
        a, b = pair_vectors(angle)
        embeddings[f"P{i}/P{i}_0001.jpg"], embeddings[f"P{i}/P{i}_0002.jpg"] = a, b
        row = f"P{i} 1 2" if kind.endswith("same") else f"P{i} 1 P{i} 2"
        (cal_rows if kind.startswith("cal") else ev_rows).append(row)
    calibration = read_pairs(_pairs_file(tmp_path, "1", cal_rows))
    (tmp_path / "p.txt").unlink()
    evaluated = read_pairs(_pairs_file(tmp_path, "1", ev_rows))
    result = evaluate(evaluated, embeddings, calibration)
    assert np.cos(1.4) < result.threshold < np.cos(0.3)
    assert result.calibration_accuracy == 1.0
    assert result.accuracy == 0.5
    assert evaluate(evaluated, embeddings).accuracy == 1.0


def test_ten_fold_takes_each_threshold_from_the_other_folds(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    rows, embeddings = [], {}
    for fold in range(10):
        for k in range(6):
            same = k < 3
            name = f"F{fold}K{k}"
            angle = rng.uniform(0.1, 0.9) if same else rng.uniform(1.0, 1.5)
            embeddings[f"{name}/{name}_0001.jpg"] = np.array([1.0, 0.0])
            embeddings[f"{name}/{name}_0002.jpg"] = np.array([np.cos(angle), np.sin(angle)])
            rows.append(f"{name} 1 2" if same else f"{name} 1 {name} 2")
    ordered = [r for fold in range(10) for r in rows[fold * 6 : fold * 6 + 3] + rows[fold * 6 + 3 : fold * 6 + 6]]
    result = evaluate(read_pairs(_pairs_file(tmp_path, "10 3", ordered)), embeddings)
    assert result.protocol.startswith("10-fold")
    assert result.accuracy == 1.0 and result.std == 0.0
