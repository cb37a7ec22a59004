"""How good an engine is: classification metrics on a labelled folder, and engine-vs-engine comparison.

Metrics are plain numpy. Conventions follow scikit-learn's so numbers can be cross-checked:
per-class rows cover every label that occurs in the truth or the predictions; a ratio with a
zero denominator (precision of a never-predicted label, recall of a label absent from the
data) is 0; macro averages are unweighted means over those rows. One-vs-rest AUC-ROC is the
Mann-Whitney statistic with average ranks for ties, computed for each label that has both
positives and negatives in the truth, and macro-averaged over them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from engine_build.imagefolder import ImageSource, iter_batches, labelled_images, path_sources
from stream_worker.backends.base import Backend
from stream_worker.calibration import Calibration
from stream_worker.errors import ConfigError
from stream_worker.preprocess import PreprocessSpec
from stream_worker.settings import LabelSettings
from stream_worker.taxonomy import UNKNOWN, Taxonomy

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
EVAL_BATCH = 16


@dataclass(frozen=True, slots=True)
class ClassMetrics:
    """Precision, recall, F1 and support (number of true examples) of one label."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True, slots=True)
class EvaluationReport:
    """The metrics of one engine on one labelled set."""

    n: int
    labels: tuple[str, ...]
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    auc_roc_macro: float | None
    per_class: dict[str, ClassMetrics]
    auc_roc_per_class: dict[str, float]
    confusion: list[list[int]]
    meta: dict[str, Any] = field(default_factory=dict)
    published: PublishedReport | None = None
    """The label the worker would publish, scored against the truth (see :func:`score_published`)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``confusion`` rows are true labels, columns predicted."""
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "macro_precision": self.macro_precision,
            "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1,
            "auc_roc_macro": self.auc_roc_macro,
            "auc_roc_per_class": self.auc_roc_per_class,
            "per_class": {
                label: {"precision": m.precision, "recall": m.recall, "f1": m.f1, "support": m.support}
                for label, m in self.per_class.items()
            },
            "confusion": {"labels": list(self.labels), "matrix": self.confusion},
            **({"published": self.published.to_dict()} if self.published is not None else {}),
            **self.meta,
        }


def confusion_matrix(y_true: IntArray, y_pred: IntArray, n_labels: int) -> IntArray:
    """Counts of (true, predicted) label index pairs: rows true, columns predicted."""
    matrix = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _safe_ratio(num: FloatArray, den: FloatArray) -> FloatArray:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def precision_recall_f1(matrix: IntArray) -> tuple[FloatArray, FloatArray, FloatArray, IntArray]:
    """Per-label precision, recall, F1 and support from a confusion matrix (0 where undefined)."""
    true_pos = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1)
    precision = _safe_ratio(true_pos, predicted)
    recall = _safe_ratio(true_pos, support.astype(np.float64))
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    return precision, recall, f1, support.astype(np.int64)


def average_ranks(values: FloatArray) -> FloatArray:
    """1-based ranks of ``values``; tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    bounds = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1], True])
    group_ranks = (bounds[:-1] + bounds[1:] + 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(group_ranks, np.diff(bounds))
    return ranks


def auc_roc(positive: npt.NDArray[np.bool_], scores: FloatArray) -> float | None:
    """Area under the ROC curve of ``scores`` for the binary truth ``positive``.

    Equals the probability that a random positive outscores a random negative, ties
    counting one half. ``None`` when the truth has no positives or no negatives.
    """
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def evaluate_predictions(
    true_labels: Sequence[str],
    pred_labels: Sequence[str],
    scores: FloatArray,
    score_labels: Sequence[str],
) -> EvaluationReport:
    """Metrics for single-label predictions and their per-label scores.

    ``scores[i, j]`` is example ``i``'s score for ``score_labels[j]`` (the AUC input).
    """
    if not true_labels:
        raise ConfigError("nothing to evaluate: no examples")
    if len(true_labels) != len(pred_labels) or scores.shape != (len(true_labels), len(score_labels)):
        raise ConfigError("true labels, predictions and scores must describe the same examples")
    present = set(true_labels) | set(pred_labels)
    labels = [lab for lab in score_labels if lab in present]
    labels += sorted(present - set(labels))
    index = {label: i for i, label in enumerate(labels)}
    y_true = np.array([index[lab] for lab in true_labels], dtype=np.int64)
    y_pred = np.array([index[lab] for lab in pred_labels], dtype=np.int64)
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    precision, recall, f1, support = precision_recall_f1(matrix)

    score_column = {label: j for j, label in enumerate(score_labels)}
    auc_per_class: dict[str, float] = {}
    for label in labels:
        if label not in score_column:
            continue
        auc = auc_roc(y_true == index[label], scores[:, score_column[label]])
        if auc is not None:
            auc_per_class[label] = auc

    return EvaluationReport(
        n=len(true_labels),
        labels=tuple(labels),
        accuracy=float((y_true == y_pred).mean()),
        macro_precision=float(precision.mean()),
        macro_recall=float(recall.mean()),
        macro_f1=float(f1.mean()),
        auc_roc_macro=float(np.mean(list(auc_per_class.values()))) if auc_per_class else None,
        per_class={
            label: ClassMetrics(float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
            for i, label in enumerate(labels)
        },
        auc_roc_per_class=auc_per_class,
        confusion=matrix.tolist(),
    )


def leaf_scores(taxonomy: Taxonomy, probs: npt.NDArray[np.float32]) -> FloatArray:
    """Per-leaf scores (B x leaves, in ``taxonomy.leaves`` order) for a batch of probabilities."""
    # Taxonomy.scores puts the leaves first, so the leaf block is the leading columns.
    return np.asarray(taxonomy.scores(probs)[:, : len(taxonomy.leaves)], dtype=np.float64)


def run_engine(
    backend: Backend,
    sources: Sequence[ImageSource],
    *,
    batch_size: int = EVAL_BATCH,
    spec: PreprocessSpec | None = None,
) -> npt.NDArray[np.float32]:
    """Class probabilities of ``backend`` for every source, in order (N x classes).

    ``spec`` overrides the engine's own preprocessing (see :func:`override_preprocessing`).
    """
    batch_size = min(batch_size, backend.info.max_batch)
    spec = spec or backend.info.spec
    chunks = [backend.infer(batch) for _, batch in iter_batches(sources, spec, batch_size)]
    return np.concatenate(chunks, axis=0)


def evaluate_engine(
    backend: Backend,
    data_dir: Path,
    taxonomy: Taxonomy,
    *,
    spec: PreprocessSpec | None = None,
    rollup_threshold: float = LabelSettings().rollup_threshold,
    rollup_label_thresholds: Mapping[str, float] | None = None,
) -> EvaluationReport:
    """Evaluate ``backend`` on ``data_dir/<leaf label>/*.jpg|png`` through the taxonomy.

    Nested folders are read as ``engine-build finetune`` reads them: ``vehicle/car/x.jpg`` is a
    ``car``. The single-label prediction is the best-scoring leaf; leaf scores are the AUC inputs.
    A folder named ``unknown`` holds images in which no label is in view: they have no best leaf
    to get right, so only the published-label scores (``report.published``) count them.
    ``spec`` overrides the engine's preprocessing; ``rollup_threshold`` is the worker's.
    Both are taken at the engine's serving temperature; ``meta["calibration"]`` holds the expected
    calibration error before and after it (:func:`calibration_section`).
    """
    leaves = tuple(taxonomy.leaves)
    items = labelled_images(data_dir, (*leaves, UNKNOWN))
    unknown = sorted({label for _, label in items} - set(leaves) - {UNKNOWN})
    if unknown:
        raise ConfigError(
            f"{data_dir}: folder(s) {', '.join(unknown)} are not leaf labels; "
            f"expected some of: {' '.join(leaves)} (or {UNKNOWN})"
        )
    if all(label == UNKNOWN for _, label in items):
        raise ConfigError(f"{data_dir}: only {UNKNOWN}/ images; the best-leaf metrics need some leaf folders")
    probs = run_engine(backend, path_sources([path for path, _ in items]), spec=spec)
    # Measured as served: at the engine's serving temperature (none: the same array).
    raw, probs = probs, backend.info.calibration.apply(probs)
    scores = leaf_scores(taxonomy, probs)
    predicted = [leaves[j] for j in scores.argmax(axis=1)]
    on_leaf = [i for i, (_, label) in enumerate(items) if label != UNKNOWN]
    report = evaluate_predictions(
        [items[i][1] for i in on_leaf], [predicted[i] for i in on_leaf], scores[on_leaf], leaves
    )
    groups = read_groups(data_dir)
    published = score_published(
        taxonomy,
        [label for _, label in items],
        [
            f.labels[0].label
            for f in taxonomy.classify(
                probs,
                rollup_threshold=rollup_threshold,
                rollup_label_thresholds=rollup_label_thresholds or None,
                top_k=0,
            )
        ],
        predicted,
        [groups.get(path.resolve(), str(path.relative_to(data_dir))) for path, _ in items],
        rollup_threshold=rollup_threshold,
        names=[str(path.relative_to(data_dir)) for path, _ in items],
    )
    meta = {
        "engine": str(backend.info.path),
        "backend": backend.info.backend,
        "precision": backend.info.precision,
        "model": f"{backend.info.model_name} {backend.info.model_version}",
        "taxonomy_version": str(taxonomy.version),
        "preprocess": (spec or backend.info.spec).describe(),
        "calibration": calibration_section(
            taxonomy, raw, [label for _, label in items], backend.info.calibration
        ),
    }
    return EvaluationReport(**{**_fields(report), "meta": meta, "published": published})


def _fields(report: EvaluationReport) -> dict[str, Any]:
    return {name: getattr(report, name) for name in EvaluationReport.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class Comparison:
    """How far two engines' outputs are apart on the same images."""

    n: int
    top1_agreement: float
    label_agreement: float
    published_label_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    disagreements: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "n": self.n,
            "top1_agreement": self.top1_agreement,
            "label_agreement": self.label_agreement,
            "published_label_agreement": self.published_label_agreement,
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "disagreements": list(self.disagreements),
        }


def served_rollup(
    calibration: Calibration, rollup_threshold: float | None = None
) -> tuple[float, dict[str, float]]:
    """The roll-up threshold and per-label thresholds the worker publishes with, as it picks them.

    A ``rollup_threshold`` given by the user replaces the engine's fitted ones, per-label ones
    included (``stream_worker.settings.with_engine_calibration``); else the engine's fitted
    thresholds; else the settings' default.
    """
    if rollup_threshold is not None:
        return rollup_threshold, {}
    if calibration.rollup_threshold is None:
        return LabelSettings().rollup_threshold, {}
    return calibration.rollup_threshold, dict(calibration.rollup_label_thresholds)


def served_labels(
    backend: Backend,
    taxonomy: Taxonomy,
    probs: npt.NDArray[np.float32],
    rollup_threshold: float | None = None,
) -> list[str]:
    """The single-mode labels the worker publishes for ``probs`` from ``backend``, as it serves it.

    At the engine's serving temperature and its roll-up thresholds (:func:`served_rollup`).
    """
    calibration = backend.info.calibration
    threshold, per_label = served_rollup(calibration, rollup_threshold)
    frames = taxonomy.classify(
        calibration.apply(probs),
        rollup_threshold=threshold,
        rollup_label_thresholds=per_label or None,
        top_k=0,
    )
    return [f.labels[0].label for f in frames]


def compare(
    a: Backend,
    b: Backend,
    sources: Sequence[ImageSource],
    taxonomy: Taxonomy,
    *,
    rollup_threshold: float | None = None,
    spec_a: PreprocessSpec | None = None,
    spec_b: PreprocessSpec | None = None,
) -> Comparison:
    """Run both engines on ``sources`` and measure agreement of raw classes and labels.

    ``label_agreement`` compares the best taxonomy leaf, however low its score; on frames where
    no label is likely that is a tie among near-zero scores. ``published_label_agreement``
    compares the label the worker publishes with each engine (single mode, at the engine's
    serving temperature and fitted roll-up thresholds, per label where it has them, unless
    ``rollup_threshold`` replaces them: the leaf, its parent, or ``unknown``). ``spec_a`` and
    ``spec_b`` override each engine's preprocessing (the same engine twice with two resize modes
    measures what a mode change does to the labels).
    """
    if _input_of(a.info.spec) != _input_of(b.info.spec):
        raise ConfigError("the two engines expect different preprocessing; they are not the same model")
    if a.info.class_names != b.info.class_names:
        raise ConfigError("the two engines have different classes or class orders; they are not one model")
    if not sources:
        raise ConfigError("nothing to compare: no images")
    probs_a = run_engine(a, sources, spec=spec_a)
    probs_b = run_engine(b, sources, spec=spec_b)
    top_a, top_b = probs_a.argmax(axis=1), probs_b.argmax(axis=1)
    leaf_a = leaf_scores(taxonomy, probs_a).argmax(axis=1)
    leaf_b = leaf_scores(taxonomy, probs_b).argmax(axis=1)
    published_a = served_labels(a, taxonomy, probs_a, rollup_threshold)
    published_b = served_labels(b, taxonomy, probs_b, rollup_threshold)
    diff = np.abs(probs_a.astype(np.float64) - probs_b.astype(np.float64))
    return Comparison(
        n=len(sources),
        top1_agreement=float((top_a == top_b).mean()),
        label_agreement=float((leaf_a == leaf_b).mean()),
        published_label_agreement=float(
            np.mean([x == y for x, y in zip(published_a, published_b, strict=True)])
        ),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        disagreements=tuple(s.name for s, x, y in zip(sources, top_a, top_b, strict=True) if x != y),
    )


def _input_of(spec: PreprocessSpec) -> PreprocessSpec:
    """What defines a model's input: ``spec`` without its resize mode."""
    return replace(spec, resize="crop", crop_fraction=1.0)


def override_preprocessing(spec: PreprocessSpec, text: str | None) -> PreprocessSpec:
    """``spec`` with the resize mode of a ``--preprocess`` value; ``None`` keeps it.

    Size, colour order and normalisation stay the model's. A malformed value is a ``ConfigError``.
    """
    if text is None:
        return spec
    try:
        return spec.with_resize(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# --- the published label -------------------------------------------------------------------

MANIFEST = "manifest.csv"
"""Optional file in a labelled folder: ``path,label,source,group`` (``path`` relative to the folder).

``group`` names images that are not independent (frames of one clip and shot); intervals that
respect groups resample whole groups."""

Outcome = Literal["leaf", "ancestor", "unknown", "wrong"]


def read_groups(data_dir: Path) -> dict[Path, str]:
    """``{resolved image path: group}`` from ``data_dir/manifest.csv``; empty when there is none."""
    manifest = data_dir / MANIFEST
    if not manifest.is_file():
        return {}
    with manifest.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"path", "group"} <= set(reader.fieldnames):
            raise ConfigError(f"{manifest}: expected a header with at least the columns path and group")
        return {(data_dir / row["path"]).resolve(): row["group"] for row in reader}


def published_outcome(taxonomy: Taxonomy, truth: str, published: str) -> Outcome:
    """How a published label relates to the true label.

    ``leaf``: the true label itself (for an ``unknown`` image: ``unknown``); ``ancestor``: one
    of the true leaf's parents (a bicycle published as ``vehicle``); ``unknown``: nothing
    published for an image that shows a label; ``wrong``: any other label.
    """
    if published == truth:
        return "leaf"
    if published == UNKNOWN:
        return "unknown"
    if truth != UNKNOWN and published in taxonomy.path(truth)[:-1]:
        return "ancestor"
    return "wrong"


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default); ``(0, 1)`` when ``n`` is 0."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def group_bootstrap_interval(
    values: npt.NDArray[np.float64],
    groups: Sequence[str],
    *,
    rounds: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` when whole groups are resampled.

    Images of one group (frames of one shot) move together, so correlated frames do not pass
    for independent evidence. With one group the interval is the point itself: a single scene
    says nothing about other scenes.
    """
    names = sorted(set(groups))
    index = {name: i for i, name in enumerate(names)}
    member = np.array([index[g] for g in groups])
    sums = np.bincount(member, weights=values, minlength=len(names))
    counts = np.bincount(member, minlength=len(names)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(names), size=(rounds, len(names)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(low), float(high))


@dataclass(frozen=True, slots=True)
class PublishedCounts:
    """Outcomes of the published label on a set of images."""

    n: int
    leaf: int
    ancestor: int
    unknown: int
    wrong: int

    @property
    def right(self) -> int:
        """The true label or one of its parents."""
        return self.leaf + self.ancestor

    @classmethod
    def of(cls, outcomes: Sequence[Outcome]) -> PublishedCounts:
        """Count ``outcomes``."""
        return cls(
            n=len(outcomes),
            leaf=outcomes.count("leaf"),
            ancestor=outcomes.count("ancestor"),
            unknown=outcomes.count("unknown"),
            wrong=outcomes.count("wrong"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Counts, the accuracy (right / n) and its Wilson 95 % interval over images."""
        return {
            "n": self.n,
            "right": self.right,
            "leaf": self.leaf,
            "ancestor": self.ancestor,
            "unknown": self.unknown,
            "wrong": self.wrong,
            "accuracy": self.right / self.n if self.n else None,
            "accuracy_wilson95": list(wilson_interval(self.right, self.n)),
            "wrong_wilson95": list(wilson_interval(self.wrong, self.n)),
        }


@dataclass(frozen=True, slots=True)
class PublishedReport:
    """The worker's single-label answer scored against the truth, overall, per label and per group."""

    rollup_threshold: float
    overall: PublishedCounts
    per_label: dict[str, PublishedCounts]
    per_group: dict[str, PublishedCounts]
    group_label: dict[str, str]
    best_leaf_right: dict[str, int]
    """Per group: images whose best leaf is the true leaf (``unknown`` images never are)."""
    accuracy_group95: tuple[float, float]
    wrong_group95: tuple[float, float]
    images: tuple[dict[str, str], ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with every image's truth, group, best leaf and published label."""
        return {
            "rollup_threshold": self.rollup_threshold,
            "groups": len(self.per_group),
            **self.overall.to_dict(),
            "accuracy_group_bootstrap95": list(self.accuracy_group95),
            "wrong_group_bootstrap95": list(self.wrong_group95),
            "per_label": {label: c.to_dict() for label, c in self.per_label.items()},
            "per_group": {
                group: {
                    "label": self.group_label[group],
                    "best_leaf_right": self.best_leaf_right[group],
                    **c.to_dict(),
                }
                for group, c in self.per_group.items()
            },
            "images": list(self.images),
        }


def score_published(
    taxonomy: Taxonomy,
    truths: Sequence[str],
    published: Sequence[str],
    best_leaves: Sequence[str],
    groups: Sequence[str],
    *,
    rollup_threshold: float,
    names: Sequence[str] | None = None,
) -> PublishedReport:
    """Score published labels against the truth (see :func:`published_outcome`).

    Intervals: Wilson over images (per label and overall, which treats frames as independent)
    and a group bootstrap for the overall accuracy and wrong-label rate.
    """
    n = len(truths)
    if not n or not len(published) == len(best_leaves) == len(groups) == n:
        raise ConfigError("truths, published labels, best leaves and groups must describe the same images")
    names = list(names) if names is not None else [str(i) for i in range(n)]
    outcomes = [published_outcome(taxonomy, t, p) for t, p in zip(truths, published, strict=True)]
    per_label: dict[str, list[Outcome]] = {}
    per_group: dict[str, list[Outcome]] = {}
    group_label: dict[str, str] = {}
    best_right: dict[str, int] = {}
    for truth, outcome, group, best in zip(truths, outcomes, groups, best_leaves, strict=True):
        per_label.setdefault(truth, []).append(outcome)
        per_group.setdefault(group, []).append(outcome)
        group_label.setdefault(group, truth)
        best_right[group] = best_right.get(group, 0) + int(best == truth)
    right = np.array([o in ("leaf", "ancestor") for o in outcomes], dtype=np.float64)
    wrong = np.array([o == "wrong" for o in outcomes], dtype=np.float64)
    return PublishedReport(
        rollup_threshold=rollup_threshold,
        overall=PublishedCounts.of(outcomes),
        per_label={label: PublishedCounts.of(v) for label, v in sorted(per_label.items())},
        per_group={group: PublishedCounts.of(v) for group, v in sorted(per_group.items())},
        group_label=group_label,
        best_leaf_right=best_right,
        accuracy_group95=group_bootstrap_interval(right, groups),
        wrong_group95=group_bootstrap_interval(wrong, groups),
        images=tuple(
            {"path": name, "truth": t, "group": g, "best_leaf": b, "published": p, "outcome": o}
            for name, t, g, b, p, o in zip(
                names, truths, groups, best_leaves, published, outcomes, strict=True
            )
        ),
    )


# -- calibration: expected calibration error and reliability diagrams ----------------------------

CALIBRATION_BINS = 15
"""Equal-width confidence bins of the expected calibration error (Guo et al. 2017 use 15)."""


@dataclass(frozen=True, slots=True)
class ReliabilityBin:
    """One bin of a reliability diagram: confidences in ``(lower, upper]`` (the first bin takes 0)."""

    lower: float
    upper: float
    count: int
    confidence: float
    """Mean confidence of the bin's examples (0 when empty)."""
    accuracy: float
    """Share of the bin's examples that are right (0 when empty)."""


@dataclass(frozen=True, slots=True)
class Reliability:
    """Expected calibration error (ECE) of a set of confident predictions, with its bins.

    ``ECE = sum over bins of count / n * |accuracy - confidence|``: 0 when, in every bin, the
    share of right predictions equals their mean confidence.
    """

    ece: float
    n: int
    bins: tuple[ReliabilityBin, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; empty bins are kept, so the bins are always the same 15."""
        return {
            "ece": self.ece,
            "n": self.n,
            "bins": [
                {
                    "lower": b.lower,
                    "upper": b.upper,
                    "count": b.count,
                    "confidence": b.confidence,
                    "accuracy": b.accuracy,
                }
                for b in self.bins
            ],
        }


def reliability(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, *, bins: int = CALIBRATION_BINS
) -> Reliability:
    """ECE and reliability bins of predictions with ``confidence`` in [0, 1] and ``correct`` flags."""
    conf = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    right = np.asarray(correct, dtype=np.bool_)
    if conf.shape != right.shape or conf.ndim != 1 or len(conf) == 0:
        raise ConfigError("reliability needs one confidence and one right/wrong flag per example")
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum: FloatArray = np.bincount(which, weights=conf, minlength=bins).astype(np.float64)
    right_sum: FloatArray = np.bincount(which, weights=right.astype(np.float64), minlength=bins).astype(
        np.float64
    )
    mean_conf = _safe_ratio(conf_sum, count.astype(np.float64))
    accuracy = _safe_ratio(right_sum, count.astype(np.float64))
    ece = float(np.sum(count / len(conf) * np.abs(accuracy - mean_conf)))
    return Reliability(
        ece=ece,
        n=len(conf),
        bins=tuple(
            ReliabilityBin(i / bins, (i + 1) / bins, int(count[i]), float(mean_conf[i]), float(accuracy[i]))
            for i in range(bins)
        ),
    )


def published_labels(
    taxonomy: Taxonomy,
    probs: npt.NDArray[np.float32],
    *,
    rollup_threshold: float,
    rollup_label_thresholds: Mapping[str, float] | None = None,
) -> tuple[list[str], FloatArray]:
    """The label single mode publishes for each row (a leaf, a parent or ``unknown``) and its score."""
    frames = taxonomy.classify(
        probs, rollup_threshold=rollup_threshold, rollup_label_thresholds=rollup_label_thresholds, top_k=0
    )
    return [f.labels[0].label for f in frames], np.array([f.labels[0].score for f in frames])


def published_correct(
    taxonomy: Taxonomy, published: Sequence[str], truths: Sequence[str]
) -> npt.NDArray[np.bool_]:
    """Whether each published label is right: the true label or one of its ancestors (``unknown``
    is right only for a frame whose truth is ``unknown``)."""
    return np.array([p in taxonomy.path(t) for p, t in zip(published, truths, strict=True)], dtype=np.bool_)


def calibration_reliability(
    taxonomy: Taxonomy,
    probs: npt.NDArray[np.float32],
    truths: Sequence[str],
    *,
    rollup_threshold: float,
    rollup_label_thresholds: Mapping[str, float] | None = None,
) -> dict[str, Reliability]:
    """ECE of one set of probabilities, two ways.

    ``top_label``: the best leaf's score as the confidence that the best leaf is the true label.
    ``published``: the score of the label single mode publishes at these thresholds (``unknown``'s
    score, the unmapped mass, when it publishes ``unknown``) as the confidence that it is right
    (the true label or an ancestor of it): labels are what lookout sells.
    """
    leaf = leaf_scores(taxonomy, probs)
    best_leaf = [taxonomy.leaves[j] for j in leaf.argmax(axis=1)]
    published, scores = published_labels(
        taxonomy, probs, rollup_threshold=rollup_threshold, rollup_label_thresholds=rollup_label_thresholds
    )
    return {
        "top_label": reliability(leaf.max(axis=1), [b == t for b, t in zip(best_leaf, truths, strict=True)]),
        "published": reliability(scores, published_correct(taxonomy, published, truths)),
    }


def calibration_section(
    taxonomy: Taxonomy, raw_probs: npt.NDArray[np.float32], truths: Sequence[str], calibration: Calibration
) -> dict[str, Any]:
    """The ``calibration`` part of ``evaluate --json``: ECE before and after the engine's calibration.

    Before: the engine's raw probabilities at the built-in roll-up threshold. After: at its
    serving temperature and its fitted thresholds (the built-in ones where it has none). On the
    data the calibration was fitted on, "after" is optimistic; ``engine-build calibrate`` reports
    grouped cross-fitted figures instead.
    """
    default = LabelSettings().rollup_threshold
    before = calibration_reliability(taxonomy, raw_probs, truths, rollup_threshold=default)
    after = calibration_reliability(
        taxonomy,
        calibration.apply(raw_probs),
        truths,
        rollup_threshold=default if calibration.rollup_threshold is None else calibration.rollup_threshold,
        rollup_label_thresholds=calibration.rollup_label_thresholds or None,
    )
    return {
        "serving_temperature": calibration.serving_temperature,
        "rollup_threshold": calibration.rollup_threshold,
        "review_threshold": calibration.review_threshold,
        "bins": CALIBRATION_BINS,
        "before": {name: r.to_dict() for name, r in before.items()},
        "after": {name: r.to_dict() for name, r in after.items()},
    }
