"""Open-set identification on an LFW-style photo folder: who is this, among the enrolled - or nobody?

The question the service answers is identification with a reject option, not verification: a probe photo is
compared with every enrolled person and named as the best-scoring one if that score reaches the threshold,
``Unknown`` otherwise. Vocabulary follows ISO/IEC 19795-1 and 19795-2 (and NIST FRVT 1:N):

* **enrolled people** form the gallery, ``gallery_photos`` photos each (the service's enrolment);
* **known probes** (mated searches) are the enrolled people's other photos;
* **strangers** (non-mated searches) are photos of people who were never enrolled;
* a person's score is the best cosine similarity over that person's enrolled faces (``Gallery.match``);
* **rank-1 identification rate**: fraction of known probes whose best-scoring person is the right one
  (no threshold: closed-set accuracy);
* **DIR(t)**, detection and identification rate: fraction of known probes whose best-scoring person is the right
  one *and* reaches ``t``; **FNIR(t) = 1 - DIR(t)**, the false-negative identification rate (the FRR of
  identification: a known person missed or mis-named);
* **FAR(t)**, the false-accept rate (FPIR in ISO/IEC 19795-2): fraction of strangers whose best score reaches
  ``t``, i.e. who are named as somebody;
* **DIR at FAR = x**: the DIR at the lowest threshold whose FAR on these strangers is at most ``x``
  (:func:`threshold_at_far`); the threshold is reported beside it;
* the **DET curve** plots FNIR against FAR as the threshold sweeps;
* the **margin** of a search is its best person's score minus the second-best person's; a **margin rule**
  (:func:`apply_margin`) names somebody only if the score reaches the threshold *and* the margin reaches ``m``.
  A stranger resembles several enrolled people about equally, a known person mostly one: on LFW View 1 a margin
  rule chosen on DevTrain's people raises DevTest's DIR at FAR 1% and, more, at FAR 0.1% (README). The margin of
  both known people and strangers shrinks as the gallery grows, so ``m`` holds for galleries of about the size it
  was chosen on, and a calibrated threshold's predicted FAR no longer describes a rule with a margin (it is lower).

The split (:func:`split_people`) is deterministic for a seed. People with at least ``min_photos`` photos are
eligible for enrolment; a seeded ``strangers_fraction`` of them is held out as strangers, together with every
person with fewer photos (LFW's many one-photo people). Each enrolled person's photos are shuffled with the same
seed; the first ``gallery_photos`` are enrolled, the rest are known probes. Enrolled people, known probes'
people and strangers are disjoint by person by construction: a stranger's photos never appear in the gallery.

The false-accept rate depends on how many people are enrolled (see ``serve_app.model.open_set``), so figures from
this protocol hold for a gallery of the split's size; ``facerec eval identify`` reports that size beside them.

Reading the figures: a FAR measured on ``n`` strangers moves in steps of ``1/n``; on LFW View 1 (about 2,200
stranger photos at the defaults) FAR 0.1% allows 2 false accepts, so its threshold is the third-highest stranger
score and DIR there is noisy. LFW also names a few people twice (``Sung_Hong_Choi`` and ``Choi_Sung-hong``,
``Hasan_Wirayuda`` and ``Hassan_Wirajuda``): such "strangers" are enrolled people under another name and count as
false accepts. Usage::

    facerec eval identify --images ../shared/datasets/lfw-view1/images [--seed 0] [--gallery-photos 1]
        [--min-photos 2] [--strangers-fraction 0.1] [--people-from PAIRS] [--calibration JSON] [--plot det.png]
        [--checkpoint NAME] [--flip] [--embeddings-cache FILE.npz]

``--people-from ../shared/datasets/lfw-view1/pairsDevTest.txt`` keeps only DevTest's people, whom the shipped
calibrations (made on DevTrain) have never seen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve_app.model.gallery import Gallery

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True)
class IdentifySplit:
    """Who is enrolled with which photos, and the probes. Photos are paths relative to the image folder."""

    #: Enrolled person -> the photos enrolled for them.
    gallery: dict[str, tuple[str, ...]]
    #: (person, photo) of every known probe: an enrolled person's photo that was not enrolled.
    probes: tuple[tuple[str, str], ...]
    #: (person, photo) of every stranger photo: people never enrolled.
    strangers: tuple[tuple[str, str], ...]

    def photos(self) -> list[str]:
        """Every photo the protocol uses, each once."""
        enrolled = [photo for photos in self.gallery.values() for photo in photos]
        return list(dict.fromkeys(enrolled + [p for _, p in self.probes] + [p for _, p in self.strangers]))

    def stranger_people(self) -> set[str]:
        return {person for person, _ in self.strangers}


def list_photos(root: Path, people: set[str] | None = None) -> dict[str, list[str]]:
    """``root/<Person>/*.jpg`` as person -> sorted relative photo paths (only ``people`` if given)."""
    photos: dict[str, list[str]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if people is not None and folder.name not in people:
            continue
        files = sorted(f"{folder.name}/{f.name}" for f in folder.iterdir() if f.suffix.lower() in PHOTO_SUFFIXES)
        if files:
            photos[folder.name] = files
    return photos


def split_people(
    photos: Mapping[str, Sequence[str]],
    *,
    seed: int,
    gallery_photos: int = 1,
    min_photos: int = 2,
    strangers_fraction: float = 0.1,
) -> IdentifySplit:
    """The protocol's split (module docstring). Only the set of people and photos matters, not their order."""
    if gallery_photos < 1:
        raise ValueError(f"gallery_photos must be >= 1, got {gallery_photos}")
    if min_photos <= gallery_photos:
        raise ValueError(f"min_photos ({min_photos}) must exceed gallery_photos ({gallery_photos}): probes needed")
    if not 0.0 <= strangers_fraction < 1.0:
        raise ValueError(f"strangers_fraction must be in [0, 1), got {strangers_fraction}")
    rng = np.random.default_rng(seed)
    people = sorted(photos)
    eligible = [p for p in people if len(photos[p]) >= min_photos]
    order = rng.permutation(len(eligible))
    held_out = {eligible[i] for i in order[: round(strangers_fraction * len(eligible))]}
    gallery: dict[str, tuple[str, ...]] = {}
    probes: list[tuple[str, str]] = []
    strangers: list[tuple[str, str]] = []
    for person in people:
        own = sorted(photos[person])
        if person in held_out or len(own) < min_photos:
            strangers.extend((person, photo) for photo in own)
            continue
        shuffled = [own[i] for i in rng.permutation(len(own))]
        gallery[person] = tuple(shuffled[:gallery_photos])
        probes.extend((person, photo) for photo in shuffled[gallery_photos:])
    return IdentifySplit(gallery, tuple(probes), tuple(strangers))


@dataclass(frozen=True)
class SearchResults:
    """The best-scoring enrolled person for each probe, that score, and the margin to the second person."""

    best_people: tuple[str, ...]
    best_scores: np.ndarray
    margins: np.ndarray


def search(gallery: Gallery, queries: np.ndarray, batch: int = 1024) -> SearchResults:
    """Each query against the whole gallery, with the service's own matching (``Gallery.match``)."""
    people: list[str] = []
    scores: list[float] = []
    margins: list[float] = []
    for start in range(0, len(queries), batch):
        # No threshold here: the protocol applies thresholds afterwards, so every best candidate is kept.
        for match in gallery.match(queries[start : start + batch], threshold=math.inf, top_k=2):
            people.append(match.candidates[0].name if match.candidates else "")
            scores.append(match.similarity)
            margins.append(match.margin)
    return SearchResults(tuple(people), np.asarray(scores, dtype=np.float64), np.asarray(margins, dtype=np.float64))


#: Margins that ``facerec eval identify`` reports DIR at FAR under (person-level cosine differences).
MARGIN_SWEEP = (0.05, 0.10, 0.15, 0.20, 0.25)
#: The score given to a search that a margin rule rejects: below any cosine similarity, so no threshold names it.
REJECTED_SCORE = -2.0


def apply_margin(results: SearchResults, margin: float) -> SearchResults:
    """The searches under a margin rule: a search whose best person leads the second by less than ``margin`` is
    rejected whatever its score (its score becomes :data:`REJECTED_SCORE`). ``margin <= 0`` changes nothing."""
    if margin <= 0.0:
        return results
    gated = np.where(results.margins >= margin, results.best_scores, REJECTED_SCORE)
    return SearchResults(results.best_people, gated, results.margins)


def margin_sweep(
    probe_results: SearchResults,
    probe_people: Sequence[str],
    stranger_results: SearchResults,
    margins: Sequence[float] = MARGIN_SWEEP,
    far_targets: Sequence[float] = (0.01, 0.001),
) -> list[dict[str, object]]:
    """DIR at each target FAR under each margin rule, with the share of known probes and strangers it rejects."""
    rows: list[dict[str, object]] = []
    for margin in margins:
        result = evaluate_identification(
            probe_results,
            probe_people,
            stranger_results,
            operating_threshold=math.inf,
            far_targets=far_targets,
            margin=margin,
        )
        rows.append(
            {
                "margin": margin,
                "probes_below_margin": round(float(np.mean(probe_results.margins < margin)), 4),
                "strangers_below_margin": round(float(np.mean(stranger_results.margins < margin)), 4),
                "at_far": {f"{far:g}": point.as_dict() for far, point in result.at_far.items()},
            }
        )
    return rows


def build_gallery(split: IdentifySplit, embeddings: Mapping[str, np.ndarray], model_id: str) -> Gallery:
    """A service gallery holding each enrolled person's enrolled photos."""
    dim = len(next(iter(embeddings.values())))
    gallery = Gallery(model_id, dim)
    for person, photos in split.gallery.items():
        gallery.add(person, np.stack([embeddings[p] for p in photos]), model_id)
    return gallery


# --- embedding cache -------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CachedEmbeddings:
    """Main-face embeddings of photos, for one embedding space (``key``: model id and detector settings)."""

    key: str
    embeddings: dict[str, np.ndarray]
    #: Photos where no face was found and the centre of the photo was embedded instead.
    missing: frozenset[str]


def load_embedding_cache(path: Path, key: str) -> CachedEmbeddings:
    """The cache at ``path`` if it was made under ``key``; an empty one otherwise (a new model or detector)."""
    empty = CachedEmbeddings(key, {}, frozenset())
    if not path.is_file():
        return empty
    with np.load(path, allow_pickle=False) as archive:
        if str(archive["key"]) != key:
            return empty
        names = [str(n) for n in archive["names"]]
        vectors = np.asarray(archive["embeddings"], dtype=np.float32)
        missing = frozenset(str(n) for n in archive["missing"])
    return CachedEmbeddings(key, dict(zip(names, vectors, strict=True)), missing)


def save_embedding_cache(path: Path, cache: CachedEmbeddings) -> None:
    """Write the cache as a pickle-free ``.npz`` (``key``, ``names``, ``embeddings``, ``missing``)."""
    names = sorted(cache.embeddings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(
            handle,
            key=np.array(cache.key),
            names=np.array(names, dtype=np.str_),
            embeddings=np.stack([cache.embeddings[n] for n in names]).astype(np.float32),
            missing=np.array(sorted(cache.missing), dtype=np.str_),
        )


# --- rates ---------------------------------------------------------------------------------------------------
def rank1_rate(best_people: Sequence[str], true_people: Sequence[str]) -> float:
    """Fraction of known probes whose best-scoring enrolled person is the right one (closed-set rank-1)."""
    if len(best_people) != len(true_people):
        raise ValueError("one best person per probe is needed")
    if not true_people:
        return math.nan
    return sum(b == t for b, t in zip(best_people, true_people, strict=True)) / len(true_people)


def detection_identification_rate(best_scores: np.ndarray, correct: np.ndarray, threshold: float) -> float:
    """DIR: fraction of known probes named correctly (rank-1 right) with a score at or above ``threshold``."""
    if len(best_scores) == 0:
        return math.nan
    return float(np.mean(np.asarray(correct, dtype=bool) & (np.asarray(best_scores) >= threshold)))


def false_accept_rate(stranger_scores: np.ndarray, threshold: float) -> float:
    """FAR (FPIR): fraction of strangers whose best score reaches ``threshold`` (named as somebody)."""
    if len(stranger_scores) == 0:
        return math.nan
    return float(np.mean(np.asarray(stranger_scores) >= threshold))


def threshold_at_far(stranger_scores: np.ndarray, far: float) -> float:
    """The lowest threshold at which at most ``far`` of the strangers are accepted.

    With ``n`` strangers that allows ``k = floor(far * n)`` accepts: the threshold lies just above the
    ``(k+1)``-th highest stranger score (ties there are all rejected). With ``k >= n`` everyone may pass.
    """
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far must be in [0, 1], got {far}")
    ordered = np.sort(np.asarray(stranger_scores, dtype=np.float64))[::-1]
    if len(ordered) == 0:
        raise ValueError("no stranger scores")
    # The small tolerance keeps far * n = 2.0000000001 from allowing 2 when it means exactly 2.
    allowed = math.floor(far * len(ordered) + 1e-9)
    if allowed >= len(ordered):
        return float(ordered[-1])
    return float(np.nextafter(ordered[allowed], math.inf))


@dataclass(frozen=True)
class OperatingPoint:
    """The protocol's figures at one threshold."""

    threshold: float
    #: Fraction of strangers named as somebody.
    far: float
    #: Strangers named as somebody (the count behind ``far``).
    false_accepts: int
    #: Detection and identification rate on known probes.
    dir: float

    def as_dict(self, digits: int = 4) -> dict[str, float | int]:
        return {
            "threshold": round(self.threshold, digits),
            "far": round(self.far, 6),
            "false_accepts": self.false_accepts,
            "dir": round(self.dir, digits),
            "fnir": round(1.0 - self.dir, digits),
        }


def operating_point(
    best_scores: np.ndarray, correct: np.ndarray, stranger_scores: np.ndarray, threshold: float
) -> OperatingPoint:
    """DIR and FAR at ``threshold``."""
    accepted = int(np.sum(np.asarray(stranger_scores) >= threshold))
    return OperatingPoint(
        threshold=threshold,
        far=false_accept_rate(stranger_scores, threshold),
        false_accepts=accepted,
        dir=detection_identification_rate(best_scores, correct, threshold),
    )


@dataclass(frozen=True)
class DetCurve:
    """FAR and FNIR at every distinct threshold, thresholds descending (FAR ascending)."""

    thresholds: np.ndarray
    far: np.ndarray
    fnir: np.ndarray


def det_curve(best_scores: np.ndarray, correct: np.ndarray, stranger_scores: np.ndarray) -> DetCurve:
    """The DET curve: at each distinct score as threshold, the strangers accepted and the known probes missed."""
    mated = np.asarray(best_scores, dtype=np.float64)
    hits = np.sort(mated[np.asarray(correct, dtype=bool)])
    strangers = np.sort(np.asarray(stranger_scores, dtype=np.float64))
    thresholds = np.unique(np.concatenate([mated, strangers]))[::-1]
    thresholds = thresholds[thresholds > REJECTED_SCORE]  # a margin rule's rejections are no threshold
    # Counts at or above each threshold, all at once from the sorted arrays.
    far = (len(strangers) - np.searchsorted(strangers, thresholds, side="left")) / max(1, len(strangers))
    dir_ = (len(hits) - np.searchsorted(hits, thresholds, side="left")) / max(1, len(mated))
    return DetCurve(thresholds, far, 1.0 - dir_)


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (95% by default): how far a measured FAR could be from the truth."""
    if trials == 0:
        return (math.nan, math.nan)
    rate = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class IdentifyEvaluation:
    """Everything the protocol measured on one split."""

    rank1: float
    #: The margin rule the figures are under (0: none); rank-1 ignores it.
    margin: float
    at_far: dict[float, OperatingPoint]
    at_operating_threshold: OperatingPoint
    curve: DetCurve
    best_scores: np.ndarray
    correct: np.ndarray
    stranger_scores: np.ndarray


def evaluate_identification(
    probe_results: SearchResults,
    probe_people: Sequence[str],
    stranger_results: SearchResults,
    *,
    operating_threshold: float,
    far_targets: Sequence[float] = (0.01, 0.001),
    margin: float = 0.0,
) -> IdentifyEvaluation:
    """Rank-1, DIR at each target FAR (threshold from these strangers) and at the operating threshold, under a
    margin rule if ``margin > 0`` (:func:`apply_margin`)."""
    rank1 = rank1_rate(probe_results.best_people, probe_people)
    probe_results, stranger_results = apply_margin(probe_results, margin), apply_margin(stranger_results, margin)
    correct = np.array([b == t for b, t in zip(probe_results.best_people, probe_people, strict=True)], dtype=bool)
    best, strangers = probe_results.best_scores, stranger_results.best_scores
    return IdentifyEvaluation(
        rank1=rank1,
        margin=margin,
        at_far={
            far: operating_point(best, correct, strangers, threshold_at_far(strangers, far)) for far in far_targets
        },
        at_operating_threshold=operating_point(best, correct, strangers, operating_threshold),
        curve=det_curve(best, correct, strangers),
        best_scores=best,
        correct=correct,
        stranger_scores=strangers,
    )


def plot_det(
    evaluation: IdentifyEvaluation,
    path: Path,
    title: str,
    extra_points: Mapping[str, OperatingPoint] | None = None,
) -> None:
    """Write the DET curve (FAR vs FNIR, both logarithmic) as a PNG, with the operating points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = evaluation.curve
    figure, axes = plt.subplots(figsize=(6, 5), dpi=120)
    # Log axes cannot show zero: the curve's ends at FAR = 0 or FNIR = 0 are dropped from the drawing only.
    shown = (curve.far > 0) & (curve.fnir > 0)
    axes.plot(curve.far[shown], curve.fnir[shown], color="tab:blue", label="DET (threshold sweeps)")
    points: dict[str, OperatingPoint] = {
        f"FAR {far:.1%} on these strangers": point for far, point in evaluation.at_far.items()
    }
    points[f"operating threshold {evaluation.at_operating_threshold.threshold:.2f}"] = evaluation.at_operating_threshold
    points.update(extra_points or {})
    floor = 0.5 / max(1, len(evaluation.stranger_scores))
    for (label, point), marker in zip(points.items(), "osD^v<>", strict=False):
        axes.scatter(
            [max(point.far, floor)],
            [max(1.0 - point.dir, 1e-4)],
            marker=marker,
            zorder=3,
            label=f"{label}: t={point.threshold:.3f}, FAR={point.far:.4f}, DIR={point.dir:.3f}",
        )
    axes.axhline(1.0 - evaluation.rank1, color="grey", linestyle=":", label=f"1 - rank-1 ({evaluation.rank1:.3f})")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlim(floor, 1.0)
    # Explicit limits: with few distinct FNIR values matplotlib's log autoscaling collapses the axes.
    lowest = min([*curve.fnir[shown], 1.0 - evaluation.rank1, *(1.0 - p.dir for p in points.values())])
    axes.set_ylim(max(lowest, 1e-4) / 2.0, 1.0)
    axes.set_xlabel("FAR: strangers named as somebody")
    axes.set_ylabel("FNIR = 1 - DIR: known people missed or mis-named")
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower left", fontsize=6)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
