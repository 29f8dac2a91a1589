"""The standard LFW face-verification protocol over this service's detector and embedder.

Pair files:

* View 1 (``pairsDevTrain.txt``/``pairsDevTest.txt``): a header ``N``, then N same-person lines ``Name i j`` and
  N different-person lines ``Name1 i Name2 j``. Choose the threshold on DevTrain (``--calibrate``), report DevTest.
* View 2 (``pairs.txt``): a header ``10 300``, then 10 folds of 300 same + 300 different pairs. Ten-fold
  cross-validation: the threshold comes from 9 folds and is scored on the 10th.

Similarity is the cosine of the two main-face embeddings; "same" means similarity >= threshold.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class PairsFormatError(ValueError):
    """The pairs file is not in either LFW format."""


@dataclass(frozen=True)
class Pair:
    left: str
    right: str
    same: bool
    fold: int


@dataclass(frozen=True)
class PairsFile:
    pairs: tuple[Pair, ...]
    folds: int

    def images(self) -> list[str]:
        """Every image the pairs use, each once, in first-use order (relative paths ``Name/Name_0001.jpg``)."""
        return list(dict.fromkeys(p for pair in self.pairs for p in (pair.left, pair.right)))


def lfw_image(name: str, number: str) -> str:
    return f"{name}/{name}_{int(number):04d}.jpg"


def read_pairs(path: Path) -> PairsFile:
    """Parse a View 1 (header ``N``) or View 2 (header ``folds N``) LFW pairs file."""
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise PairsFormatError(f"{path} is empty")
    header = lines[0]
    try:
        folds, per_side = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
    except ValueError as exc:
        raise PairsFormatError(f"{path}: bad header {' '.join(header)!r}") from exc
    body = lines[1:]
    if len(body) != folds * 2 * per_side:
        raise PairsFormatError(f"{path}: header promises {folds * 2 * per_side} pairs, found {len(body)}")
    pairs = []
    for number, fields in enumerate(body):
        fold = number // (2 * per_side)
        if len(fields) == 3:
            pairs.append(Pair(lfw_image(fields[0], fields[1]), lfw_image(fields[0], fields[2]), True, fold))
        elif len(fields) == 4:
            pairs.append(Pair(lfw_image(fields[0], fields[1]), lfw_image(fields[2], fields[3]), False, fold))
        else:
            raise PairsFormatError(f"{path}: line {number + 2} has {len(fields)} fields, expected 3 or 4")
    return PairsFile(tuple(pairs), folds)


def pair_similarities(pairs: Sequence[Pair], embeddings: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity and same-person label of each pair (embeddings are L2-normalised)."""
    scores = np.array([float(np.dot(embeddings[p.left], embeddings[p.right])) for p in pairs], dtype=np.float64)
    labels = np.array([p.same for p in pairs], dtype=bool)
    return scores, labels


def accuracy_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(np.mean((scores >= threshold) == labels))


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold that maximises accuracy, placed midway between neighbouring scores (ties: the lowest)."""
    ordered = np.unique(scores)
    candidates = np.concatenate([[ordered[0] - 1e-6], (ordered[:-1] + ordered[1:]) / 2.0, [ordered[-1] + 1e-6]])
    # Accuracy for every candidate at once: same pairs at or above it plus different pairs below it.
    same_sorted = np.sort(scores[labels])
    diff_sorted = np.sort(scores[~labels])
    true_accepts = len(same_sorted) - np.searchsorted(same_sorted, candidates, side="left")
    true_rejects = np.searchsorted(diff_sorted, candidates, side="left")
    return float(candidates[int(np.argmax(true_accepts + true_rejects))])


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a same pair outscores a different pair (ties count half)."""
    positives, negatives = scores[labels], scores[~labels]
    if len(positives) == 0 or len(negatives) == 0:
        return math.nan
    ranks = _average_ranks(np.concatenate([positives, negatives]))
    rank_sum = ranks[: len(positives)].sum()
    return float((rank_sum - len(positives) * (len(positives) + 1) / 2.0) / (len(positives) * len(negatives)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return np.asarray(sums[inverse] / counts[inverse])


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates as the threshold sweeps from high to low."""
    order = np.argsort(-scores, kind="mergesort")
    hits = labels[order]
    tpr = np.concatenate([[0.0], np.cumsum(hits) / max(1, hits.sum())])
    fpr = np.concatenate([[0.0], np.cumsum(~hits) / max(1, (~hits).sum())])
    return fpr, tpr


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    std: float
    threshold: float
    auc: float
    pairs: int
    protocol: str
    calibration_accuracy: float | None
    scores: np.ndarray
    labels: np.ndarray
    calibration_scores: np.ndarray | None = None
    calibration_labels: np.ndarray | None = None


def evaluate(
    pairs: PairsFile,
    embeddings: dict[str, np.ndarray],
    calibration: PairsFile | None = None,
) -> Evaluation:
    """Accuracy under the protocol the files call for (see the module docstring)."""
    scores, labels = pair_similarities(pairs.pairs, embeddings)
    auc = roc_auc(scores, labels)
    if pairs.folds > 1:
        folds = np.array([p.fold for p in pairs.pairs])
        accuracies, thresholds = [], []
        for fold in range(pairs.folds):
            test = folds == fold
            threshold = best_threshold(scores[~test], labels[~test])
            thresholds.append(threshold)
            accuracies.append(accuracy_at(scores[test], labels[test], threshold))
        return Evaluation(
            accuracy=float(np.mean(accuracies)),
            std=float(np.std(accuracies)),
            threshold=float(np.mean(thresholds)),
            auc=auc,
            pairs=len(pairs.pairs),
            protocol=f"{pairs.folds}-fold cross-validation",
            calibration_accuracy=None,
            scores=scores,
            labels=labels,
        )
    if calibration is not None:
        cal_scores, cal_labels = pair_similarities(calibration.pairs, embeddings)
        threshold = best_threshold(cal_scores, cal_labels)
        return Evaluation(
            accuracy=accuracy_at(scores, labels, threshold),
            std=0.0,
            threshold=threshold,
            auc=auc,
            pairs=len(pairs.pairs),
            protocol="threshold chosen on the calibration pairs, accuracy on the evaluated pairs",
            calibration_accuracy=accuracy_at(cal_scores, cal_labels, threshold),
            scores=scores,
            labels=labels,
            calibration_scores=cal_scores,
            calibration_labels=cal_labels,
        )
    threshold = best_threshold(scores, labels)
    return Evaluation(
        accuracy=accuracy_at(scores, labels, threshold),
        std=0.0,
        threshold=threshold,
        auc=auc,
        pairs=len(pairs.pairs),
        protocol="threshold chosen on the evaluated pairs themselves (optimistic: pass --calibrate)",
        calibration_accuracy=None,
        scores=scores,
        labels=labels,
    )


def plot_roc(evaluation: Evaluation, path: Path, title: str) -> None:
    """Write the ROC curve(s) as a PNG, with the chosen operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 5), dpi=120)
    curves: list[tuple[str, np.ndarray, np.ndarray]] = [("evaluated pairs", evaluation.scores, evaluation.labels)]
    if evaluation.calibration_scores is not None and evaluation.calibration_labels is not None:
        curves.append(("calibration pairs", evaluation.calibration_scores, evaluation.calibration_labels))
    for label, scores, labels in curves:
        fpr, tpr = roc_curve(scores, labels)
        axes.plot(fpr, tpr, label=f"{label} (AUC {roc_auc(scores, labels):.4f})")
    accept = evaluation.scores >= evaluation.threshold
    op_fpr = float(np.mean(accept[~evaluation.labels])) if (~evaluation.labels).any() else 0.0
    op_tpr = float(np.mean(accept[evaluation.labels])) if evaluation.labels.any() else 0.0
    axes.scatter([op_fpr], [op_tpr], color="black", zorder=3, label=f"threshold {evaluation.threshold:.3f}")
    axes.set_xscale("symlog", linthresh=0.01)
    axes.set_xlim(0, 1)
    axes.set_ylim(0.8, 1.001)
    axes.set_xlabel("false accept rate (log above 1%)")
    axes.set_ylabel("true accept rate")
    axes.set_title(f"{title}\naccuracy {evaluation.accuracy:.4f} ({evaluation.protocol.split(',')[0]})", fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


@dataclass(frozen=True)
class EmbeddedImages:
    embeddings: dict[str, np.ndarray]
    missing: list[str]
    seconds: float


def embed_lfw_images(
    images: Sequence[str],
    root: Path,
    embed_batch: Callable[[list[bytes]], list[np.ndarray | None]],
    fallback: Callable[[list[bytes]], list[np.ndarray]],
    batch_size: int = 32,
    progress: bool = True,
) -> EmbeddedImages:
    """Embed each image's main face in batches; images with no face found go through ``fallback``."""
    from tqdm import tqdm

    started = time.perf_counter()
    embeddings: dict[str, np.ndarray] = {}
    missing: list[str] = []
    with tqdm(total=len(images), desc="embedding LFW images", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            names = list(images[start : start + batch_size])
            payloads = [(root / name).read_bytes() for name in names]
            found = embed_batch(payloads)
            lost = [i for i, v in enumerate(found) if v is None]
            rescued = dict(zip(lost, fallback([payloads[i] for i in lost]), strict=True)) if lost else {}
            missing.extend(names[i] for i in lost)
            for i, (name, vector) in enumerate(zip(names, found, strict=True)):
                embeddings[name] = vector if vector is not None else rescued[i]
            bar.update(len(names))
    return EmbeddedImages(embeddings, missing, time.perf_counter() - started)
