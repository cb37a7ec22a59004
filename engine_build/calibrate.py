"""``engine-build calibrate``: fit a serving temperature and the label thresholds on a development set.

What is fitted, and how (every rule fixed here, before any data is seen):

* **Temperature.** One scalar ``T``; serving turns the engine's probabilities ``p`` into
  ``softmax(log p / T)`` (``stream_worker.calibration.temperature_scale``). The model's classes are
  ImageNet's but the truth is a taxonomy label, so the likelihood of a frame is the probability
  mass of its true label's classes, the label's *score* (for a frame labelled ``unknown``, the
  mass of the classes no label maps). ``T`` minimises the mean negative log of that score, with
  ``engine_build.head.fit_temperature`` (the search the fine-tuned head uses), in
  ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``.
* **Held-out split.** Frames of one clip are near copies of each other, so data are split by
  *group*: the manifest's ``group`` column when ``DIR/manifest.csv`` exists, else the file name's
  stem without a trailing frame number (``bikes_062.png`` is group ``bikes``). Groups are dealt
  into ``k = min(5, groups)`` folds (sorted, shuffled with seed 0, round-robin). Every "after"
  figure is *cross-fitted*: each frame is calibrated by a ``T`` fitted on the other folds only. The
  ``T`` written into the model is fitted on every frame, and **kept only when the cross-fitted
  likelihood beats ``T = 1``** (lower mean negative log score on held-out folds); otherwise the
  model is written with ``T = 1`` and the thresholds below are chosen on its raw scores. A
  temperature that does not generalise across scenes would only move the thresholds around.
* **Roll-up threshold** (single mode: a label is published when its calibrated score reaches it,
  else its parent, else ``unknown``). On the cross-fitted calibrated scores, for each threshold of
  ``THRESHOLD_GRID``: *precision* = published labels that are right (the true label or one of its
  ancestors) / frames not published as ``unknown``; *coverage* = frames not ``unknown`` among
  frames whose truth is a *visible* label (one the taxonomy maps at least one class to; not
  ``unknown``). Rule: the **lowest threshold whose precision reaches the target** (default 0.95);
  if none does, the one with the highest precision (ties: the lowest). The rule is also
  cross-validated (chosen on the other folds, measured on each fold) and reported.
* **Per-label roll-up thresholds.** Only for a label with at least ``min_label_frames`` frames
  whose truth is it or below it, from at least two groups: the same rule on that label's own
  precision (frames published as it), the other labels at the global threshold. Kept only when
  it publishes more of that label's frames right than the global threshold does.
* **Review threshold** (frames whose best leaf score is under it may go to review). A frame
  *needs review* when the label published at the chosen roll-up threshold is not right. Rule:
  the threshold of ``THRESHOLD_GRID`` with the **highest F1** of "best leaf score under the
  threshold" as a detector of frames that need review (ties: the lowest).

The model file written is the input with one metadata entry, ``calibration``, added or replaced;
the graph and the weights are the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engine_build.evaluate import (
    calibration_reliability,
    leaf_scores,
    published_correct,
    published_labels,
    run_engine,
)
from engine_build.head import MAX_TEMPERATURE, MIN_TEMPERATURE, fit_temperature, log_softmax
from engine_build.imagefolder import IMAGE_SUFFIXES, list_images, path_sources
from stream_worker.backends.sidecar import sha256_file
from stream_worker.calibration import CALIBRATION_KEY, Calibration, temperature_scale
from stream_worker.errors import ConfigError
from stream_worker.taxonomy import UNKNOWN, Taxonomy

FloatArray = npt.NDArray[np.float64]
MANIFEST = "manifest.csv"
MAX_FOLDS = 5
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""Thresholds tried: 0.05, 0.10, ..., 0.95."""
DEFAULT_TARGET_PRECISION = 0.95
DEFAULT_MIN_LABEL_FRAMES = 20
_FRAME_SUFFIX = re.compile(r"([_-]\d+)+$")


@dataclass(frozen=True, slots=True)
class DevItem:
    """One labelled frame of the development set."""

    path: Path
    label: str
    group: str


def group_of(path: Path) -> str:
    """The group of a file with no manifest: its stem without a trailing frame number."""
    return _FRAME_SUFFIX.sub("", path.stem) or path.stem


def read_devset(data_dir: Path, taxonomy: Taxonomy) -> list[DevItem]:
    """The frames of ``data_dir``: from ``manifest.csv`` (columns ``path,label,...,group``) when it
    exists, else ``DIR/<label>/...`` folders (any taxonomy label, or ``unknown``) grouped by
    :func:`group_of`. A label the taxonomy lacks is a ``ConfigError`` naming it."""
    if not data_dir.is_dir():
        raise ConfigError(f"data folder not found: {data_dir}")
    known = (*taxonomy.labels, UNKNOWN)
    manifest = data_dir / MANIFEST
    items: list[DevItem] = []
    if manifest.is_file():
        with manifest.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        if rows and not {"path", "label"} <= set(rows[0]):
            raise ConfigError(f"{manifest}: needs the columns path and label (and group)")
        for row in rows:
            path = Path(row["path"])
            path = path if path.is_absolute() else data_dir / path
            if not path.is_file():
                # A manifest may name paths relative to the repository rather than to DIR.
                path = data_dir / path.name if (data_dir / path.name).is_file() else path
            if not path.is_file():
                raise ConfigError(f"{manifest}: {row['path']} not found")
            items.append(DevItem(path, row["label"], row.get("group") or group_of(path)))
    else:
        for label_dir in sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in list_images(label_dir):
                folders = [name for name in path.relative_to(data_dir).parts[:-1] if name in known]
                items.append(DevItem(path, folders[-1] if folders else label_dir.name, group_of(path)))
    items = [item for item in items if item.path.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise ConfigError(f"no labelled images in {data_dir}: expected {data_dir}/<label>/*.jpg|png")
    strange = sorted({item.label for item in items} - set(known))
    if strange:
        raise ConfigError(
            f"{data_dir}: label(s) {', '.join(strange)} are not in taxonomy {taxonomy.version}; "
            f"expected some of: {' '.join(known)}"
        )
    return items


def group_folds(groups: Sequence[str], *, seed: int = 0) -> list[npt.NDArray[np.int64]]:
    """Held-out row indices of ``k = min(MAX_FOLDS, groups)`` folds; a group is never split."""
    names = sorted(set(groups))
    if len(names) < 2:
        raise ConfigError(
            f"calibration needs frames from at least 2 groups (clips or photos) to hold some out; got {names}"
        )
    k = min(MAX_FOLDS, len(names))
    order = np.random.default_rng(seed).permutation(len(names))
    fold_of_group = {names[g]: i % k for i, g in enumerate(order)}
    fold = np.array([fold_of_group[g] for g in groups])
    return [np.flatnonzero(fold == f).astype(np.int64) for f in range(k)]


def log_probs(probs: npt.NDArray[np.floating[Any]]) -> FloatArray:
    """``log p`` in float64, an exact zero floored at float32's smallest normal (the logits' stand-in)."""
    return np.log(np.maximum(np.asarray(probs, dtype=np.float64), np.finfo(np.float32).tiny))


def right_classes(taxonomy: Taxonomy, labels: Sequence[str]) -> npt.NDArray[np.bool_]:
    """Per frame, the classes whose mass is its true label's score (``Taxonomy.label_classes``)."""
    masks = {label: taxonomy.label_classes(label) for label in set(labels)}
    return np.stack([masks[label] for label in labels])


def fit_label_temperature(probs: npt.NDArray[np.floating[Any]], right: npt.NDArray[np.bool_]) -> float:
    """The ``T`` minimising the mean NLL of the true labels' scores at ``softmax(log p / T)``."""
    return fit_temperature(log_probs(probs), right)


def label_nll(probs: npt.NDArray[np.floating[Any]], right: npt.NDArray[np.bool_]) -> float:
    """Mean negative log of the true labels' scores (floored as :func:`log_probs` floors)."""
    logp = log_softmax(log_probs(probs))
    masked = np.where(right, logp, -np.inf)
    top = masked.max(axis=1, keepdims=True)
    return float(-np.mean(top[:, 0] + np.log(np.exp(masked - top).sum(axis=1))))


@dataclass(frozen=True, slots=True)
class CurvePoint:
    """The roll-up rule at one threshold."""

    threshold: float
    precision: float
    coverage: float
    recall: float
    """Frames published right among frames whose truth is visible."""
    published: int


@dataclass(frozen=True, slots=True)
class ReviewPoint:
    """The review rule at one threshold."""

    threshold: float
    precision: float
    recall: float
    f1: float
    flagged: int


def visible(taxonomy: Taxonomy, truths: Sequence[str]) -> npt.NDArray[np.bool_]:
    """Frames whose truth is a label the model can score: not ``unknown``, with a class mapped."""
    seen = {label: label != UNKNOWN and bool(taxonomy.label_classes(label).any()) for label in set(truths)}
    return np.array([seen[t] for t in truths], dtype=np.bool_)


def rollup_curve(
    taxonomy: Taxonomy,
    probs: npt.NDArray[np.float32],
    truths: Sequence[str],
    *,
    per_label: Mapping[str, float] | None = None,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> list[CurvePoint]:
    """Precision, coverage and recall of single mode at each roll-up threshold of ``grid``."""
    seen = visible(taxonomy, truths)
    points = []
    for threshold in grid:
        published, _ = published_labels(
            taxonomy, probs, rollup_threshold=threshold, rollup_label_thresholds=per_label
        )
        shown = np.array([p != UNKNOWN for p in published])
        right = published_correct(taxonomy, published, truths)
        points.append(
            CurvePoint(
                threshold=float(threshold),
                precision=_ratio(int((shown & right).sum()), int(shown.sum())),
                coverage=_ratio(int((shown & seen).sum()), int(seen.sum())),
                recall=_ratio(int((shown & right & seen).sum()), int(seen.sum())),
                published=int(shown.sum()),
            )
        )
    return points


def choose_rollup(points: Sequence[CurvePoint], target: float) -> tuple[float, bool]:
    """The lowest threshold whose precision reaches ``target`` (and whether one did); else the most
    precise, ties to the lowest. A threshold publishing nothing has no precision and is skipped."""
    usable = [p for p in points if p.published > 0]
    if not usable:
        return points[-1].threshold, False
    reaching = [p for p in usable if p.precision >= target]
    if reaching:
        return min(p.threshold for p in reaching), True
    best = max(p.precision for p in usable)
    return min(p.threshold for p in usable if p.precision == best), False


def review_curve(
    taxonomy: Taxonomy,
    probs: npt.NDArray[np.float32],
    truths: Sequence[str],
    *,
    rollup_threshold: float,
    per_label: Mapping[str, float] | None = None,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> list[ReviewPoint]:
    """How well "best leaf score under the threshold" finds the frames published wrong."""
    published, _ = published_labels(
        taxonomy, probs, rollup_threshold=rollup_threshold, rollup_label_thresholds=per_label
    )
    wrong = ~published_correct(taxonomy, published, truths)
    best = leaf_scores(taxonomy, probs).max(axis=1)
    points = []
    for threshold in grid:
        flagged = best < threshold
        precision = _ratio(int((flagged & wrong).sum()), int(flagged.sum()))
        recall = _ratio(int((flagged & wrong).sum()), int(wrong.sum()))
        f1 = _ratio(2 * precision * recall, precision + recall)
        points.append(ReviewPoint(float(threshold), precision, recall, f1, int(flagged.sum())))
    return points


def choose_review(points: Sequence[ReviewPoint]) -> float:
    """The threshold with the highest F1, ties to the lowest."""
    best = max(p.f1 for p in points)
    return min(p.threshold for p in points if p.f1 == best)


def choose_label_thresholds(
    taxonomy: Taxonomy,
    probs: npt.NDArray[np.float32],
    items: Sequence[DevItem],
    *,
    rollup_threshold: float,
    target: float,
    min_frames: int,
) -> dict[str, float]:
    """Per-label roll-up thresholds where a label has the data for one and it does better (module doc)."""
    truths = [item.label for item in items]
    chosen: dict[str, float] = {}
    for label in taxonomy.labels:
        under = np.array([label in taxonomy.path(t) for t in truths])
        if (
            under.sum() < min_frames
            or len({item.group for item, u in zip(items, under, strict=True) if u}) < 2
        ):
            continue

        baseline, _ = _right_as_label(taxonomy, probs, truths, label, rollup_threshold, rollup_threshold)
        for threshold in THRESHOLD_GRID:
            good, shown = _right_as_label(taxonomy, probs, truths, label, rollup_threshold, threshold)
            if shown and good / shown >= target:
                if good > baseline and threshold != rollup_threshold:
                    chosen[label] = float(threshold)
                break
    return chosen


def _right_as_label(
    taxonomy: Taxonomy,
    probs: npt.NDArray[np.float32],
    truths: Sequence[str],
    label: str,
    rollup_threshold: float,
    own: float,
) -> tuple[int, int]:
    """Frames published as ``label`` right, and in all, when ``label`` alone has threshold ``own``."""
    published, _ = published_labels(
        taxonomy, probs, rollup_threshold=rollup_threshold, rollup_label_thresholds={label: own}
    )
    as_label = np.array([p == label for p in published])
    good = as_label & published_correct(taxonomy, published, truths)
    return int(good.sum()), int(as_label.sum())


@dataclass(frozen=True, slots=True)
class CalibrationFit:
    """Everything ``engine-build calibrate`` fitted and measured."""

    calibration: Calibration
    n: int
    groups: int
    folds: int
    counts: dict[str, int]
    data_sha256: str
    target_precision: float
    target_reached: bool
    temperature_at_bound: bool
    fold_temperatures: tuple[float, ...]
    nll: dict[str, float]
    ece: dict[str, dict[str, float]]
    reliability: dict[str, Any]
    rollup_curve: tuple[CurvePoint, ...]
    review_curve: tuple[ReviewPoint, ...]
    held_out_rule: dict[str, float]
    """The roll-up rule chosen on the other folds and measured on each fold, pooled."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``--json`` prints)."""
        return {
            "calibration": self.calibration.to_document(),
            "n": self.n,
            "groups": self.groups,
            "folds": self.folds,
            "counts": self.counts,
            "data_sha256": self.data_sha256,
            "target_precision": self.target_precision,
            "target_reached": self.target_reached,
            "temperature_at_bound": self.temperature_at_bound,
            "fold_temperatures": list(self.fold_temperatures),
            "nll": self.nll,
            "ece": self.ece,
            "reliability": self.reliability,
            "rollup_curve": [vars_of(p) for p in self.rollup_curve],
            "review_curve": [vars_of(p) for p in self.review_curve],
            "held_out_rule": self.held_out_rule,
        }


def vars_of(point: CurvePoint | ReviewPoint) -> dict[str, Any]:
    """A curve point as a dict."""
    return {name: getattr(point, name) for name in type(point).__dataclass_fields__}


def fit_calibration(
    taxonomy: Taxonomy,
    probs: npt.NDArray[np.float32],
    items: Sequence[DevItem],
    *,
    target_precision: float = DEFAULT_TARGET_PRECISION,
    min_label_frames: int = DEFAULT_MIN_LABEL_FRAMES,
    default_rollup: float = 0.4,
) -> CalibrationFit:
    """Fit the temperature and the thresholds on raw engine ``probs`` of ``items`` (module doc)."""
    if not 0 < target_precision <= 1:
        raise ConfigError(f"the target precision must lie in (0, 1], got {target_precision}")
    truths = [item.label for item in items]
    right = right_classes(taxonomy, truths)
    folds = group_folds([item.group for item in items])
    cross = np.empty_like(probs, dtype=np.float32)
    fold_temperatures = []
    for held in folds:
        train = np.setdiff1d(np.arange(len(items)), held)
        t = fit_label_temperature(probs[train], right[train])
        fold_temperatures.append(t)
        cross[held] = temperature_scale(probs[held], t)
    temperature = fit_label_temperature(probs, right)
    nll = {"before": label_nll(probs, right), "after_cross_fitted": label_nll(cross, right)}
    temperature_kept = nll["after_cross_fitted"] < nll["before"]
    if not temperature_kept:
        temperature, cross = 1.0, np.asarray(probs, dtype=np.float32)

    curve = rollup_curve(taxonomy, cross, truths)
    rollup, reached = choose_rollup(curve, target_precision)
    per_label = choose_label_thresholds(
        taxonomy, cross, items, rollup_threshold=rollup, target=target_precision, min_frames=min_label_frames
    )
    review = review_curve(taxonomy, cross, truths, rollup_threshold=rollup, per_label=per_label or None)
    review_threshold = choose_review(review)

    held_out = _held_out_rule(taxonomy, cross, truths, folds, target_precision)
    before = calibration_reliability(taxonomy, probs, truths, rollup_threshold=default_rollup)
    after = calibration_reliability(
        taxonomy, cross, truths, rollup_threshold=rollup, rollup_label_thresholds=per_label or None
    )
    counts: dict[str, int] = {}
    for label in truths:
        counts[label] = counts.get(label, 0) + 1
    groups = len({item.group for item in items})
    data_sha256 = devset_sha256(items)
    ece = {
        name: {"before": before[name].ece, "after_cross_fitted": after[name].ece}
        for name in ("top_label", "published")
    }
    fitted = {
        "n": len(items),
        "groups": groups,
        "folds": len(folds),
        "data_sha256": data_sha256,
        "label_nll": nll,
        "temperature_kept": temperature_kept,
        "ece": ece,
        "rules": {
            "temperature": "NLL of the true label's score, grouped cross-fitting for the reported figures; "
            "kept only when the cross-fitted NLL beats T = 1",
            "rollup_threshold": f"lowest with precision >= {target_precision} (else most precise)",
            "review_threshold": "highest F1 of best leaf score < t as a detector of wrong labels",
        },
    }
    calibration = Calibration(
        serving_temperature=temperature,
        rollup_threshold=rollup,
        rollup_label_thresholds=per_label,
        review_threshold=review_threshold,
        fitted=fitted,
    )
    return CalibrationFit(
        calibration=calibration,
        n=len(items),
        groups=groups,
        folds=len(folds),
        counts=counts,
        data_sha256=data_sha256,
        target_precision=target_precision,
        target_reached=reached,
        temperature_at_bound=temperature in (MIN_TEMPERATURE, MAX_TEMPERATURE),
        fold_temperatures=tuple(fold_temperatures),
        nll=nll,
        ece=ece,
        reliability={
            "before": {name: r.to_dict() for name, r in before.items()},
            "after_cross_fitted": {name: r.to_dict() for name, r in after.items()},
        },
        rollup_curve=tuple(curve),
        review_curve=tuple(review),
        held_out_rule=held_out,
    )


def _held_out_rule(
    taxonomy: Taxonomy,
    cross: npt.NDArray[np.float32],
    truths: Sequence[str],
    folds: Sequence[npt.NDArray[np.int64]],
    target: float,
) -> dict[str, float]:
    """The roll-up rule chosen without each fold, then applied to it; precision and coverage pooled."""
    shown_right = shown_total = seen_shown = seen_total = 0
    for held in folds:
        train = np.setdiff1d(np.arange(len(truths)), held)
        threshold, _ = choose_rollup(rollup_curve(taxonomy, cross[train], [truths[i] for i in train]), target)
        held_truths = [truths[i] for i in held]
        published, _ = published_labels(taxonomy, cross[held], rollup_threshold=threshold)
        shown = np.array([p != UNKNOWN for p in published])
        right = published_correct(taxonomy, published, held_truths)
        seen = visible(taxonomy, held_truths)
        shown_right += int((shown & right).sum())
        shown_total += int(shown.sum())
        seen_shown += int((shown & seen).sum())
        seen_total += int(seen.sum())
    return {"precision": _ratio(shown_right, shown_total), "coverage": _ratio(seen_shown, seen_total)}


def devset_sha256(items: Sequence[DevItem]) -> str:
    """sha256 of the sorted lines ``<file name>\\t<label>\\t<group>\\t<sha256 of the file>``."""
    lines = sorted(f"{i.path.name}\t{i.label}\t{i.group}\t{sha256_file(i.path)}" for i in items)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def write_calibrated_model(onnx_path: Path, out: Path, calibration: Calibration) -> None:
    """Copy ``onnx_path`` to ``out`` with the metadata entry ``calibration`` added or replaced.

    Only that ``metadata_props`` entry changes; the graph, its weights and every other entry are
    the input's, byte for byte (``tests/unit/test_calibrate.py``).
    """
    import onnx

    model = onnx.load(str(onnx_path))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != CALIBRATION_KEY]
    del model.metadata_props[:]
    for key, value in [*kept, (CALIBRATION_KEY, json.dumps(calibration.to_document(), sort_keys=True))]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(out)


def calibrate_model(
    onnx_path: Path,
    data_dir: Path,
    out: Path,
    *,
    target_precision: float = DEFAULT_TARGET_PRECISION,
    min_label_frames: int = DEFAULT_MIN_LABEL_FRAMES,
    threads: int | None = None,
) -> CalibrationFit:
    """Run the model on ``data_dir``, fit, and write ``out`` (see the module doc)."""
    from engine_build.metadata import read_onnx_model_info

    model = read_onnx_model_info(onnx_path)
    taxonomy = Taxonomy.for_classes(model.class_names, model.taxonomy, origin=f"model {onnx_path}")
    items = read_devset(data_dir, taxonomy)
    probs = raw_probabilities(onnx_path, [item.path for item in items], threads=threads)
    fit = fit_calibration(
        taxonomy, probs, items, target_precision=target_precision, min_label_frames=min_label_frames
    )
    write_calibrated_model(onnx_path, out, fit.calibration)
    return fit


def raw_probabilities(
    onnx_path: Path, paths: Sequence[Path], *, threads: int | None = None
) -> npt.NDArray[np.float32]:
    """The raw probabilities of the model at ``onnx_path`` for the images at ``paths``.

    The ONNX file itself runs on ONNX Runtime (no engine build), through the worker's own
    preprocessing; no serving temperature is applied, whatever the file already carries:
    calibration always starts from the model's raw output.
    """
    from engine_build.metadata import read_onnx_model_info
    from stream_worker.backends.base import EngineInfo
    from stream_worker.backends.onnxruntime import OnnxRuntimeBackend

    model = read_onnx_model_info(onnx_path)
    info = EngineInfo(
        path=onnx_path,
        backend="onnxruntime",
        precision="fp32",
        model_name=model.model_name,
        model_version=model.model_version,
        max_batch=16,
        opt_batch=16,
        input_name=model.input_name,
        output_name=model.output_name,
        spec=model.spec,
        class_names=model.class_names,
        onnx_sha256="",
        taxonomy_version=model.taxonomy_version,
        taxonomy=model.taxonomy,
    )
    backend = OnnxRuntimeBackend(info, threads=threads)
    try:
        return run_engine(backend, path_sources(list(paths)))
    finally:
        backend.close()
