"""Domain taxonomy: raw ImageNet probabilities -> the labels traffic and wildlife users count.

The map lives in ``stream_worker/data/taxonomy.yaml`` (versioned, every decision explained).
A label's score is the sum of the probabilities of the classes mapped to it; a parent's
score adds its children's. Both are one matrix product per batch: ``probs @ membership``,
where ``membership[c, j]`` is 1 when class ``c`` counts towards label ``j`` (its own label
and every ancestor of it).

Single-label mode rolls a weak leaf up the tree the way SpeciesNet rolls a low-confidence
species up to genus and family: the answer is the most specific label whose score passes
the threshold, and ``unknown`` when not even a root passes. Multi-label mode returns every
label that passes its own threshold.

Serving binds the taxonomy to the engine (:meth:`Taxonomy.for_engine`): the engine's own class
names decide which output column a mapped class is, so an engine with its classes in another
order is labelled correctly, one that lacks a mapped class is refused, and one that carries its
own taxonomy (a model with its own label set) is labelled with that.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import yaml

from stream_worker.errors import ConfigError, EngineError
from stream_worker.frames import ClassScore, FrameLabels, LabelScore

if TYPE_CHECKING:
    from stream_worker.backends.base import EngineInfo

UNKNOWN = "unknown"
"""The label of a frame that no label of the taxonomy explains well enough."""

_DATA = "data"
_TAXONOMY_FILE = "taxonomy.yaml"
_CLASSES_FILE = "imagenet_classes.txt"
_PACKAGED_ORIGIN = f"stream_worker/{_DATA}/{_TAXONOMY_FILE}"


def _read_packaged(name: str) -> str:
    return resources.files("stream_worker").joinpath(_DATA, name).read_text(encoding="utf-8")


def load_class_names(path: Path | None = None) -> tuple[str, ...]:
    """Return the model's class names in index order (default: the packaged ImageNet-1k list)."""
    text = path.read_text(encoding="utf-8") if path is not None else _read_packaged(_CLASSES_FILE)
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(set(names)) != len(names):
        raise ConfigError(f"class names in {path or _CLASSES_FILE} are not unique")
    return names


@dataclass(frozen=True, slots=True)
class _Spec:
    version: str
    labels: tuple[str, ...]
    parents: dict[str, str | None]
    classes: dict[str, tuple[tuple[int, str], ...]]
    notes: dict[str, str]


def _parse(doc: Any, origin: str) -> _Spec:
    """Validate the YAML document's shape; every mistake names the file and the entry."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level")
    try:
        version = str(doc["version"])
        label_rows = doc["labels"]
        mapping = doc["mapping"]
    except KeyError as exc:
        raise ConfigError(f"{origin}: missing key {exc}") from None
    if not isinstance(label_rows, list) or not isinstance(mapping, dict):
        raise ConfigError(f"{origin}: 'labels' must be a list and 'mapping' a mapping")
    parents: dict[str, str | None] = {}
    for row in label_rows:
        if not isinstance(row, dict) or "label" not in row:
            raise ConfigError(f"{origin}: bad label entry {row!r}")
        label = str(row["label"])
        if label in parents or label == UNKNOWN:
            raise ConfigError(f"{origin}: label {label!r} is reserved or declared twice")
        parent = row.get("parent")
        parents[label] = None if parent is None else str(parent)
    for label, parent in parents.items():
        if parent is not None and parent not in parents:
            raise ConfigError(f"{origin}: label {label!r} has undeclared parent {parent!r}")
    classes: dict[str, tuple[tuple[int, str], ...]] = {}
    notes: dict[str, str] = {}
    for label, entry in mapping.items():
        if label not in parents:
            raise ConfigError(f"{origin}: mapping for undeclared label {label!r}")
        if not isinstance(entry, dict):
            raise ConfigError(f"{origin}: mapping of {label!r} must be a mapping")
        pairs = []
        for item in entry.get("classes") or []:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)):
                raise ConfigError(f"{origin}: {label}: expected [index, name], got {item!r}")
            pairs.append((item[0], str(item[1])))
        classes[str(label)] = tuple(pairs)
        notes[str(label)] = str(entry.get("why", ""))
    return _Spec(version, tuple(parents), parents, classes, notes)


def _read_document(path: Path | None) -> Any:
    """The YAML document at ``path`` (``None``: the packaged taxonomy), not yet validated."""
    origin = str(path) if path is not None else _PACKAGED_ORIGIN
    try:
        text = path.read_text(encoding="utf-8") if path is not None else _read_packaged(_TAXONOMY_FILE)
        return yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read taxonomy {origin}: {exc}") from exc


def declared_labels(document: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The labels a taxonomy document declares (default: the packaged one), leaves and parents.

    No model is needed: this is what settings are checked against before any engine is opened
    (``document`` is an engine's own taxonomy from its sidecar, when it carries one).
    """
    where = _PACKAGED_ORIGIN if document is None else "the engine's taxonomy"
    return _parse(_read_document(None) if document is None else document, where).labels


def _matched_by_name(spec: _Spec, names: tuple[str, ...], origin: str) -> _Spec:
    """``spec`` with every mapped class at its index in ``names``; refuses what cannot match."""
    mapped = {name for pairs in spec.classes.values() for _, name in pairs}
    repeated = sorted(name for name, count in Counter(names).items() if count > 1 and name in mapped)
    if repeated:
        raise EngineError(
            f"{origin}: the mapped class names {', '.join(map(repr, repeated[:3]))} repeat among its "
            f"{len(names)} classes, so taxonomy {spec.version} cannot tell which to count"
        )
    index = {name: i for i, name in enumerate(names)}
    missing = [
        (name, label) for label, pairs in spec.classes.items() for _, name in pairs if name not in index
    ]
    if missing:
        shown = ", ".join(f"{name!r} ({label})" for name, label in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise EngineError(
            f"{origin} lacks {len(missing)} of the classes taxonomy {spec.version} maps: {shown}{more}; "
            "serve an engine whose model has them, or one that carries its own taxonomy"
        )
    classes = {
        label: tuple((index[name], name) for _, name in pairs) for label, pairs in spec.classes.items()
    }
    return dataclasses.replace(spec, classes=classes)


@dataclass(frozen=True, eq=False)
class Taxonomy:
    """A loaded, validated label map; immutable and thread-safe.

    Serving builds it with :meth:`for_engine`, from the engine's own class names; :meth:`load`
    reads a taxonomy for a model in the packaged ImageNet class order.
    """

    version: str
    labels: tuple[str, ...]
    """Leaves first, then parents; the column order of :meth:`scores`."""
    leaves: tuple[str, ...]
    parents: dict[str, str | None]
    class_names: tuple[str, ...]
    notes: dict[str, str]
    _membership: npt.NDArray[np.float32] = field(repr=False)
    _mapped: npt.NDArray[np.float32] = field(repr=False)
    _height: npt.NDArray[np.float32] = field(repr=False)
    _paths: dict[str, tuple[str, ...]] = field(repr=False)

    @property
    def parent_labels(self) -> frozenset[str]:
        """Every label that is some label's parent (``vehicle``, ``animal``, ``mammal``)."""
        return frozenset(p for p in self.parents.values() if p)

    @classmethod
    def load(cls, path: Path | None = None, class_names: Sequence[str] | None = None) -> Taxonomy:
        """Load the taxonomy (default: the packaged one) for a model with ``class_names``.

        ``class_names`` is the model's own list (e.g. from the ONNX metadata); by default the
        packaged ImageNet-1k list. Every mapped class's name must match the model's name at that
        index, so a model with a different class order is refused instead of mislabelling.
        """
        origin = str(path) if path is not None else _PACKAGED_ORIGIN
        spec = _parse(_read_document(path), origin)
        names = tuple(class_names) if class_names is not None else load_class_names()
        return cls._build(spec, names, origin)

    @classmethod
    def for_engine(cls, info: EngineInfo) -> Taxonomy:
        """The taxonomy that labels the engine ``info`` describes; see :meth:`for_classes`.

        The engine's own taxonomy when its sidecar carries one (a model with its own label
        set, e.g. a fine-tuned one), else the packaged one, matched to the engine's class names.
        """
        return cls.for_classes(info.class_names, info.taxonomy, origin=f"engine {info.path}")

    @classmethod
    def for_classes(
        cls,
        class_names: Sequence[str],
        document: Mapping[str, Any] | None = None,
        *,
        origin: str = "the model",
    ) -> Taxonomy:
        """The taxonomy ``document`` (default: the packaged one) for a model with ``class_names``.

        Each mapped class is found in ``class_names`` by its name; the index written beside the
        name in the document is not used. So a model whose classes come in another order is
        labelled exactly as one in the original order, scores included. A model class that
        the taxonomy does not map counts towards ``unknown``, as unmapped ImageNet classes do.

        A class the taxonomy maps but the model lacks (a class dropped, or another class set
        altogether) is refused with a one-line ``EngineError`` naming the missing classes and
        their labels, rather than served: that label's scores would silently lose the class.
        A mapped class name that repeats among ``class_names`` is refused too, since it could
        not be matched. ``origin`` names the model in those messages.
        """
        where = _PACKAGED_ORIGIN if document is None else f"the taxonomy of {origin}"
        spec = _parse(_read_document(None) if document is None else document, where)
        names = tuple(str(name) for name in class_names)
        return cls._build(_matched_by_name(spec, names, origin), names, where)

    @classmethod
    def _build(cls, spec: _Spec, names: tuple[str, ...], origin: str) -> Taxonomy:
        labels = spec.labels
        column = {label: j for j, label in enumerate(labels)}
        has_child = {p for p in spec.parents.values() if p is not None}
        leaves = tuple(label for label in labels if label not in has_child)
        # Leaves first keeps the leaf block contiguous: scores[:, :n_leaves].
        if labels[: len(leaves)] != leaves:
            raise ConfigError(f"{origin}: list every leaf label before the parent labels")

        paths: dict[str, tuple[str, ...]] = {}
        for label in labels:
            chain: list[str] = []
            node: str | None = label
            while node is not None:
                if node in chain:
                    raise ConfigError(f"{origin}: the parents of {label!r} form a cycle")
                chain.append(node)
                node = spec.parents[node]
            paths[label] = tuple(reversed(chain))
        paths[UNKNOWN] = (UNKNOWN,)

        membership = np.zeros((len(names), len(labels)), dtype=np.float32)
        owner: dict[int, str] = {}
        for label, pairs in spec.classes.items():
            for index, name in pairs:
                if not 0 <= index < len(names):
                    raise ConfigError(f"{origin}: {label}: class index {index} outside 0..{len(names) - 1}")
                if names[index] != name:
                    raise ConfigError(
                        f"{origin}: {label}: class {index} is {name!r} in the taxonomy but "
                        f"{names[index]!r} in the model; the taxonomy does not fit this model"
                    )
                if index in owner:
                    raise ConfigError(
                        f"{origin}: class {index} ({name}) is mapped to both {owner[index]} and {label}"
                    )
                owner[index] = label
                for member in paths[label]:
                    membership[index, column[member]] = 1.0

        membership.flags.writeable = False
        height = {label: 0 for label in leaves}
        for label in leaves:
            for distance, ancestor in enumerate(reversed(paths[label][:-1]), start=1):
                height[ancestor] = max(height.get(ancestor, 0), distance)
        return cls(
            version=spec.version,
            labels=labels,
            leaves=leaves,
            parents=dict(spec.parents),
            class_names=names,
            notes=dict(spec.notes),
            _membership=membership,
            _mapped=membership.max(axis=1),
            _height=np.array([height[label] for label in labels], dtype=np.float32),
            _paths=paths,
        )

    # -- structure ---------------------------------------------------------------------------

    def path(self, label: str) -> tuple[str, ...]:
        """Root-first path of ``label``, e.g. ``("animal", "mammal", "cat")``; ``("unknown",)``."""
        try:
            return self._paths[label]
        except KeyError:
            raise ConfigError(f"unknown taxonomy label {label!r}; known: {', '.join(self.labels)}") from None

    def label_classes(self, label: str) -> npt.NDArray[np.bool_]:
        """Which of the model's classes count towards ``label``: its own and its descendants'.

        For ``unknown``, the classes no label maps. ``scores(probs)`` of a label is the sum of the
        probabilities of exactly these classes (``engine-build calibrate`` fits on it).
        """
        if label == UNKNOWN:
            return np.asarray(self._mapped == 0)
        self.path(label)  # a one-line ConfigError for a label the taxonomy lacks
        return np.asarray(self._membership[:, self.labels.index(label)] > 0)

    # -- scoring -----------------------------------------------------------------------------

    def scores(self, probs: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
        """Label scores ``(B, len(labels))`` for class probabilities ``(B, num_classes)``."""
        batch = self._check(probs)
        return batch @ self._membership

    def _check(self, probs: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
        if probs.ndim != 2 or probs.shape[1] != len(self.class_names):
            raise EngineError(
                f"engine output has shape {probs.shape}; taxonomy {self.version} expects "
                f"(batch, {len(self.class_names)}) class probabilities"
            )
        return np.asarray(probs, dtype=np.float32)

    def classify(
        self,
        probs: npt.NDArray[np.floating[Any]],
        *,
        mode: Literal["single", "multi"] = "single",
        rollup_threshold: float = 0.5,
        rollup_label_thresholds: Mapping[str, float] | None = None,
        thresholds: Mapping[str, float] | None = None,
        default_threshold: float = 0.5,
        top_k: int = 5,
    ) -> list[FrameLabels]:
        """Turn a batch of class probabilities into one :class:`FrameLabels` per frame.

        ``single``: the most specific label whose score reaches ``rollup_threshold`` (the best
        leaf if it passes, else its parent, then grandparent), or ``unknown``;
        ``rollup_label_thresholds`` gives some labels a threshold of their own (an engine's
        calibration fits them), the others use ``rollup_threshold``.
        ``multi``: every label (leaf or parent) whose score reaches its threshold
        (``thresholds[label]``, else ``default_threshold``), best first, or ``unknown``.
        ``top_k`` raw classes are attached for debugging; ``best_score`` is the best leaf score.
        """
        batch = self._check(probs)
        if top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {top_k}")
        scores = batch @ self._membership
        unknown_scores = np.clip(1.0 - batch @ self._mapped, 0.0, 1.0)
        best_leaf = scores[:, : len(self.leaves)].max(axis=1) if self.leaves else np.zeros(len(batch))
        tops = self._top_k(batch, top_k)
        if mode == "single":
            chosen = self._single(
                scores,
                self._threshold_vector(rollup_label_thresholds, rollup_threshold, name="rollup_threshold"),
            )
            picks: list[list[int]] = [[int(j)] if j >= 0 else [] for j in chosen]
        elif mode == "multi":
            picks = self._multi(scores, self._threshold_vector(thresholds, default_threshold))
        else:
            raise ConfigError(f"taxonomy mode must be 'single' or 'multi', got {mode!r}")

        results = []
        for row, columns in enumerate(picks):
            if columns:
                labels = tuple(
                    LabelScore(self.labels[j], float(scores[row, j]), self._paths[self.labels[j]])
                    for j in columns
                )
            else:
                labels = (LabelScore(UNKNOWN, float(unknown_scores[row]), self._paths[UNKNOWN]),)
            results.append(FrameLabels(labels=labels, top_k=tops[row], best_score=float(best_leaf[row])))
        return results

    def _single(
        self, scores: npt.NDArray[np.float32], threshold: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.intp]:
        # Specificity dominates score: a step of 2 per tree level exceeds any score difference
        # (scores lie in [0, 1] up to rounding), so the argmax is the best of the most specific
        # passing labels.
        key = np.where(scores >= threshold, scores - 2.0 * self._height, -np.inf)
        chosen = key.argmax(axis=1)
        none_passed = ~np.isfinite(key[np.arange(len(key)), chosen])
        return np.where(none_passed, -1, chosen)

    def _multi(self, scores: npt.NDArray[np.float32], thresholds: npt.NDArray[np.float32]) -> list[list[int]]:
        passed = scores >= thresholds
        # Best first; on equal scores the more specific label first (cat before mammal).
        order = np.lexsort((self._height[None, :].repeat(len(scores), 0), -scores), axis=1)
        ranked = np.take_along_axis(passed, order, axis=1)
        return [order[row][ranked[row]].tolist() for row in range(len(scores))]

    def _threshold_vector(
        self, thresholds: Mapping[str, float] | None, default: float, *, name: str = "default_threshold"
    ) -> npt.NDArray[np.float32]:
        vector = np.full(len(self.labels), _check_threshold(name, default), dtype=np.float32)
        for label, value in (thresholds or {}).items():
            if label not in self.labels:
                raise ConfigError(
                    f"threshold for unknown taxonomy label {label!r}; known: {', '.join(self.labels)}"
                )
            vector[self.labels.index(label)] = _check_threshold(f"threshold[{label}]", value)
        return vector

    def _top_k(self, batch: npt.NDArray[np.float32], k: int) -> list[tuple[ClassScore, ...]]:
        k = min(k, batch.shape[1])
        if k == 0:
            return [() for _ in range(len(batch))]
        part = np.argpartition(-batch, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(batch, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        indices = np.take_along_axis(part, order, axis=1)
        values = np.take_along_axis(part_scores, order, axis=1)
        names = self.class_names
        return [
            tuple(ClassScore(int(i), names[i], float(v)) for i, v in zip(idx_row, val_row, strict=True))
            for idx_row, val_row in zip(indices.tolist(), values.tolist(), strict=True)
        ]


def _check_threshold(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must lie in [0, 1], got {value}")
    return float(value)
