"""How good an engine is: classification metrics on a labelled folder, and engine-vs-engine comparison.

Metrics are plain numpy. Conventions follow scikit-learn's so numbers can be cross-checked:
per-class rows cover every label that occurs in the truth or the predictions; a ratio with a
zero denominator (precision of a never-predicted label, recall of a label absent from the
data) is 0; macro averages are unweighted means over those rows. One-vs-rest AUC-ROC is the
Mann-Whitney statistic with average ranks for ties, computed for each label that has both
positives and negatives in the truth, and macro-averaged over them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engine_build.imagefolder import ImageSource, iter_batches, labelled_images, path_sources
from stream_worker.backends.base import Backend
from stream_worker.calibration import Calibration
from stream_worker.errors import ConfigError
from stream_worker.settings import LabelSettings
from stream_worker.taxonomy import Taxonomy

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
    backend: Backend, sources: Sequence[ImageSource], *, batch_size: int = EVAL_BATCH
) -> npt.NDArray[np.float32]:
    """Class probabilities of ``backend`` for every source, in order (N x classes)."""
    batch_size = min(batch_size, backend.info.max_batch)
    chunks = [backend.infer(batch) for _, batch in iter_batches(sources, backend.info.spec, batch_size)]
    return np.concatenate(chunks, axis=0)


def evaluate_engine(backend: Backend, data_dir: Path, taxonomy: Taxonomy) -> EvaluationReport:
    """Evaluate ``backend`` on ``data_dir/<leaf label>/*.jpg|png`` through the taxonomy.

    Nested folders are read as ``engine-build finetune`` reads them: ``vehicle/car/x.jpg`` is a
    ``car``. The single-label prediction is the best-scoring leaf; leaf scores are the AUC inputs.
    Both are taken at the engine's serving temperature; ``meta["calibration"]`` holds the expected
    calibration error before and after it (:func:`calibration_section`).
    """
    leaves = tuple(taxonomy.leaves)
    items = labelled_images(data_dir, leaves)
    unknown = sorted({label for _, label in items} - set(leaves))
    if unknown:
        raise ConfigError(
            f"{data_dir}: folder(s) {', '.join(unknown)} are not leaf labels; "
            f"expected some of: {' '.join(leaves)}"
        )
    probs = run_engine(backend, path_sources([path for path, _ in items]))
    # Measured as served: at the engine's serving temperature (none: the same array).
    raw, probs = probs, backend.info.calibration.apply(probs)
    scores = leaf_scores(taxonomy, probs)
    predicted = [leaves[j] for j in scores.argmax(axis=1)]
    report = evaluate_predictions([label for _, label in items], predicted, scores, leaves)
    meta = {
        "engine": str(backend.info.path),
        "backend": backend.info.backend,
        "precision": backend.info.precision,
        "model": f"{backend.info.model_name} {backend.info.model_version}",
        "taxonomy_version": str(taxonomy.version),
        "calibration": calibration_section(
            taxonomy, raw, [label for _, label in items], backend.info.calibration
        ),
    }
    return EvaluationReport(**{**_fields(report), "meta": meta})


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


def compare(
    a: Backend,
    b: Backend,
    sources: Sequence[ImageSource],
    taxonomy: Taxonomy,
    *,
    rollup_threshold: float = LabelSettings().rollup_threshold,
) -> Comparison:
    """Run both engines on ``sources`` and measure agreement of raw classes and labels.

    ``label_agreement`` compares the best taxonomy leaf, however low its score; on frames where
    no label is likely that is a tie among near-zero scores. ``published_label_agreement``
    compares the label the worker publishes (single mode at ``rollup_threshold``: the leaf, its
    parent, or ``unknown``).
    """
    if a.info.spec != b.info.spec:
        raise ConfigError("the two engines expect different preprocessing; they are not the same model")
    if a.info.class_names != b.info.class_names:
        raise ConfigError("the two engines have different classes or class orders; they are not one model")
    if not sources:
        raise ConfigError("nothing to compare: no images")
    probs_a = run_engine(a, sources)
    probs_b = run_engine(b, sources)
    top_a, top_b = probs_a.argmax(axis=1), probs_b.argmax(axis=1)
    leaf_a = leaf_scores(taxonomy, probs_a).argmax(axis=1)
    leaf_b = leaf_scores(taxonomy, probs_b).argmax(axis=1)
    published_a, published_b = (
        [f.labels[0].label for f in taxonomy.classify(p, rollup_threshold=rollup_threshold, top_k=0)]
        for p in (probs_a, probs_b)
    )
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
