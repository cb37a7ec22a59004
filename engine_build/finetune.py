"""``engine-build finetune``: teach the shipped model your own labels (transfer learning, CPU only).

``DIR/<label>/*.jpg|png`` is the training set; nested folders give the hierarchy
(``DIR/vehicle/car/``: ``car`` under ``vehicle``). Four steps, none of which needs PyTorch:

1. :func:`scan_training_folder` reads the folder's structure and refuses, in one line, what
   cannot be trained: no label folders, one label only, a label with fewer than two images
   (cross-validation holds images out), a folder holding both images and label folders, label
   names that repeat, are reserved (``unknown``) or are not plain names.
2. :func:`extract_features` runs the base model up to the input of its classifier (the pooled
   features: 1280 numbers per image for EfficientNet-Lite0) in ONNX Runtime, on images guarded,
   decoded and preprocessed by serving's own code (``stream_worker.decode.decode_into``, with
   its DCT-scaled JPEG decode), so the head learns from the inputs it will be served. Every file
   that cannot be read is listed, then the run is refused.
3. :func:`engine_build.head.train_head` fits the linear head: class-balanced, L2-regularised,
   the penalty chosen by stratified cross-validation, one temperature fitted on the held-out
   predictions.
4. :func:`join_head` writes the base graph with its classifier's weights replaced by the new
   head (temperature folded in): one ONNX file with the base's interface (same input,
   ``probabilities`` = softmax over the new class names). Its metadata carries the class names,
   the taxonomy built from the folders (what serving labels with, see
   ``Taxonomy.for_engine``), the preprocessing, the temperature and where it came from.
   ``engine-build build`` makes engines from it and ``stream-worker run --engine`` serves them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from engine_build.head import (
    DEFAULT_L2_GRID,
    LinearHead,
    TrainedHead,
    cv_fold_count,
    log_softmax,
    train_head,
)
from engine_build.imagefolder import IMAGE_SUFFIXES
from engine_build.metadata import read_onnx_model_info, utc_now_iso
from stream_worker.backends.sidecar import sha256_file
from stream_worker.decode import DecodeLimits, decode_into, sniff_content_type
from stream_worker.errors import BadFrame, ConfigError, EngineError
from stream_worker.preprocess import PreprocessSpec
from stream_worker.taxonomy import UNKNOWN, Taxonomy

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FEATURE_BATCH = 16
MAX_LISTED = 10
"""How many offending files or labels an error message names before it says 'and N more'."""
LABEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A label is a folder name; it becomes a Redis hash field and a JSON value, so keep it plain
(and never ``_``-led, the prefix of the counts' own fields such as ``_frames``)."""
JOIN_TOLERANCE = 1e-4
"""Largest probability difference allowed between the joined ONNX and the head in numpy."""
BASE_KEYS_KEPT = ("weights_sha256", "weights_licence")
"""Base metadata that still describes the fine-tuned model's backbone, kept as ``base_<key>``."""
TRAINING_LIMITS = DecodeLimits(max_frame_bytes=1 << 31)
"""Serving's guards, but no cap on the file size: a large photo is a fine training image."""


@dataclass(frozen=True, slots=True)
class TrainingSet:
    """The labelled images of a training folder and the label tree its folders spell."""

    root: Path
    paths: tuple[Path, ...]
    targets: IntArray
    """Class index of each image."""
    class_names: tuple[str, ...]
    """The leaf folders' names, in folder order: the new model's output classes."""
    folders: tuple[str, ...]
    """Each class's folder relative to the root (``vehicle/car``)."""
    parents: dict[str, str | None]
    """Every label's parent: the classes first (in class order), then the folders above them."""

    def counts(self) -> dict[str, int]:
        """Images per class, in class order."""
        per_class = np.bincount(self.targets, minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, per_class, strict=True)}


def scan_training_folder(root: Path) -> TrainingSet:
    """Read ``root/<label>/...``; raise a one-line ``ConfigError`` for anything untrainable.

    A folder that holds images is a class named after it; a folder that holds folders is a
    parent label of the labels inside. JPEG and PNG files count (by suffix); other files (a
    review export's ``manifest.csv``), hidden entries and ``_``-prefixed ones are ignored.
    """
    if not root.is_dir():
        raise ConfigError(f"training folder not found: {root}")
    stray, top = _entries(root)
    if stray:
        raise ConfigError(
            f"{root} holds {len(stray)} image(s) outside any label folder ({stray[0].name}, ...): "
            f"move them into {root}/<label>/"
        )
    if not top:
        raise ConfigError(f"no label folders in {root}: expected {root}/<label>/*.jpg|png")
    classes: list[tuple[str, str | None, list[Path]]] = []
    above: dict[str, str | None] = {}
    seen: dict[str, Path] = {}

    def visit(folder: Path, parent: str | None) -> None:
        name = folder.name
        where = folder.relative_to(root).as_posix()
        if not LABEL_NAME.fullmatch(name):
            raise ConfigError(
                f"{root}: folder {where!r} is not a usable label name: use letters, digits, '_', '-' "
                "or '.', starting with a letter or digit, at most 64 characters"
            )
        if name == UNKNOWN:
            raise ConfigError(f"{root}: folder {where!r}: '{UNKNOWN}' is reserved for frames no label fits")
        if name in seen:
            first = seen[name].relative_to(root).as_posix()
            raise ConfigError(f"{root}: the label {name!r} appears twice ({first} and {where}); rename one")
        seen[name] = folder
        images, subfolders = _entries(folder)
        if images and subfolders:
            raise ConfigError(
                f"{root}: {where} holds both images and label folders; move its {len(images)} image(s) "
                f"into a label folder of their own (e.g. {where}/other)"
            )
        if subfolders:
            above[name] = parent
            for sub in subfolders:
                visit(sub, name)
        else:
            classes.append((where, parent, images))

    for folder in top:
        visit(folder, None)
    if sum(len(images) for _, _, images in classes) == 0:
        raise ConfigError(f"no JPEG or PNG images under {root}: expected {root}/<label>/*.jpg|png")
    if len(classes) == 1:
        raise ConfigError(
            f"{root} has one label only ({classes[0][0]}): a classifier needs at least two; "
            f"add a folder of images of what else the cameras see (e.g. {root}/background)"
        )
    few = [(where, len(images)) for where, _, images in classes if len(images) < 2]
    if few:
        shown = ", ".join(f"{where} ({n})" for where, n in few[:MAX_LISTED])
        more = f" and {len(few) - MAX_LISTED} more" if len(few) > MAX_LISTED else ""
        raise ConfigError(
            f"{root}: label(s) with fewer than two JPEG/PNG images: {shown}{more}; every label needs "
            "at least two (cross-validation holds some out)"
        )
    names = tuple(where.rsplit("/", 1)[-1] for where, _, _ in classes)
    return TrainingSet(
        root=root,
        paths=tuple(path for _, _, images in classes for path in images),
        targets=np.repeat(np.arange(len(classes)), [len(images) for _, _, images in classes]),
        class_names=names,
        folders=tuple(where for where, _, _ in classes),
        parents={name: parent for name, (_, parent, _) in zip(names, classes, strict=True)} | above,
    )


def _entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """The JPEG/PNG files and the sub-folders of ``folder``, sorted; hidden entries skipped.

    Entries starting with ``_`` are skipped too: no label starts with one, and
    ``stream-worker review export`` leaves the frames nobody has filed yet in ``_unsorted``.
    """
    images, folders = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_dir():
            folders.append(entry)
        elif entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            images.append(entry)
    return images, folders


def taxonomy_document(training: TrainingSet) -> dict[str, Any]:
    """The taxonomy of the folders, in the shape of ``stream_worker/data/taxonomy.yaml``.

    Each class maps to the label of its own name; parent folders are parent labels, scored as
    the sum of their children. The version names the label tree, not the images: two models
    trained on the same folder structure count the same labels.
    """
    labels = [{"label": label, "parent": parent} for label, parent in training.parents.items()]
    mapping = {
        name: {"why": f"the images in {folder}/", "classes": [[index, name]]}
        for index, (name, folder) in enumerate(zip(training.class_names, training.folders, strict=True))
    }
    tree = json.dumps({"labels": labels, "mapping": mapping}, sort_keys=True).encode()
    return {
        "version": f"finetuned-{hashlib.sha256(tree).hexdigest()[:12]}",
        "classes_source": "engine-build finetune: one class per label folder",
        "labels": labels,
        "mapping": mapping,
    }


# -- the base model's classifier --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Classifier:
    """Where a classification model's head sits: ``features -> Gemm -> Softmax -> output``."""

    gemm_output: str
    softmax_output: str
    weight: str
    bias: str
    features: str
    """The pooled-feature tensor: the Gemm's input."""
    feature_dim: int


def locate_classifier(model: onnx.ModelProto, origin: str) -> Classifier:
    """Find the Gemm that feeds the output softmax; refuse a model not built that way."""
    graph = model.graph
    if len(graph.output) != 1:
        raise EngineError(f"{origin}: expected one output, found {len(graph.output)}")
    producer = {out: node for node in graph.node for out in node.output}
    softmax = producer.get(graph.output[0].name)
    gemm = producer.get(softmax.input[0]) if softmax is not None and softmax.op_type == "Softmax" else None
    if softmax is None or gemm is None or gemm.op_type != "Gemm" or len(gemm.input) != 3:
        raise EngineError(
            f"{origin}: finetune needs a classifier whose output is Softmax(Gemm(features)); "
            "export the model with `engine-build export`"
        )
    attributes = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    if attributes.get("transA", 0) != 0:
        raise EngineError(f"{origin}: the classifier Gemm transposes its features (transA=1)")
    initializers = {init.name: init for init in graph.initializer}
    if gemm.input[1] not in initializers or gemm.input[2] not in initializers:
        raise EngineError(f"{origin}: the classifier's weight and bias must be initializers")
    uses = [name for node in graph.node for name in node.input]
    if uses.count(gemm.input[1]) != 1 or uses.count(gemm.input[2]) != 1:
        raise EngineError(f"{origin}: the classifier's weights are shared with other nodes")
    dims = tuple(initializers[gemm.input[1]].dims)
    return Classifier(
        gemm_output=gemm.output[0],
        softmax_output=softmax.output[0],
        weight=gemm.input[1],
        bias=gemm.input[2],
        features=gemm.input[0],
        feature_dim=int(dims[1] if attributes.get("transB", 0) else dims[0]),
    )


def feature_model(model: onnx.ModelProto, classifier: Classifier) -> onnx.ModelProto:
    """``model`` cut before its classifier: the output is the pooled features (batch x dim)."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    head_outputs = {classifier.gemm_output, classifier.softmax_output}
    kept = [node for node in cut.graph.node if not head_outputs & set(node.output)]
    del cut.graph.node[:]
    cut.graph.node.extend(kept)
    head_weights = {classifier.weight, classifier.bias}
    kept_init = [init for init in cut.graph.initializer if init.name not in head_weights]
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(kept_init)
    del cut.graph.output[:]
    cut.graph.output.append(
        helper.make_tensor_value_info(
            classifier.features, TensorProto.FLOAT, ["batch", classifier.feature_dim]
        )
    )
    return cut


def _session(model: onnx.ModelProto, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's load errors are untyped
        raise EngineError(f"ONNX Runtime could not load the model: {exc}") from exc


# -- features ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Features:
    """Pooled features of every training image, and what identifies the images."""

    values: npt.NDArray[np.float32]
    """(images, feature_dim), in ``TrainingSet.paths`` order."""
    data_sha256: str
    """sha256 over every image's path below the root and the sha256 of its bytes."""
    first_batch: npt.NDArray[np.float32]
    """The first images as preprocessed, kept to check the joined model against the head."""


def extract_features(
    model: onnx.ModelProto,
    classifier: Classifier,
    training: TrainingSet,
    spec: PreprocessSpec,
    *,
    threads: int | None = None,
    progress: bool = True,
    batch_size: int = FEATURE_BATCH,
) -> Features:
    """Run ``model`` up to its pooled features on every training image.

    Every image is decoded (and hashed) even after one fails, so the ``ConfigError`` lists every
    unreadable file at once; inference stops at the first failure, since the run is refused.
    """
    session = _session(feature_model(model, classifier), threads)
    input_name = session.get_inputs()[0].name
    buffer = np.empty((batch_size, 3, spec.height, spec.width), dtype=np.float32)
    values = np.empty((len(training.paths), classifier.feature_dim), dtype=np.float32)
    first_batch: npt.NDArray[np.float32] | None = None
    unreadable: list[tuple[str, str]] = []
    listing: list[str] = []
    pending: list[int] = []

    def flush() -> None:
        nonlocal first_batch
        batch = buffer[: len(pending)]
        values[pending] = session.run([classifier.features], {input_name: batch})[0]
        if first_batch is None:
            first_batch = batch.copy()
        pending.clear()

    bar = tqdm(total=len(training.paths), unit="img", desc="features", disable=not progress, leave=False)
    try:
        for index, path in enumerate(training.paths):
            bar.update(1)
            where = path.relative_to(training.root).as_posix()
            try:
                data = path.read_bytes()
            except OSError as exc:
                unreadable.append((where, exc.strerror or type(exc).__name__))
                continue
            listing.append(f"{where}\t{hashlib.sha256(data).hexdigest()}\n")
            content_type = sniff_content_type(data)
            if content_type is None:
                unreadable.append((where, "neither JPEG nor PNG"))
                continue
            try:
                decode_into(data, content_type, buffer[len(pending)], spec, TRAINING_LIMITS)
            except BadFrame as exc:
                unreadable.append((where, exc.reason))
                continue
            if unreadable:
                continue  # the run will be refused: keep listing, skip the inference
            pending.append(index)
            if len(pending) == batch_size:
                flush()
        if pending and not unreadable:
            flush()
    finally:
        bar.close()
    if unreadable:
        shown = ", ".join(f"{where} ({why})" for where, why in unreadable[:MAX_LISTED])
        more = f" and {len(unreadable) - MAX_LISTED} more" if len(unreadable) > MAX_LISTED else ""
        raise ConfigError(
            f"{len(unreadable)} of {len(training.paths)} images under {training.root} cannot be read: "
            f"{shown}{more}; fix or remove them"
        )
    if first_batch is None:
        raise ConfigError(f"no images were read under {training.root}")
    digest = hashlib.sha256("".join(sorted(listing)).encode()).hexdigest()
    return Features(values=values, data_sha256=digest, first_batch=first_batch)


# -- the joined model -------------------------------------------------------------------------


def join_head(
    base: onnx.ModelProto, classifier: Classifier, head: LinearHead, metadata: Mapping[str, str]
) -> onnx.ModelProto:
    """``base`` with its classifier's weight and bias replaced by ``head``'s; metadata replaced.

    The graph up to the pooled features is the base's, byte for byte; the Gemm keeps its place
    (so INT8 builds keep it in float, as they keep the shipped head) with ``transB = 1`` and the
    new (classes x features) weight, and the softmax now runs over the new classes.
    """
    model = onnx.ModelProto()
    model.CopyFrom(base)
    n_classes = head.weight.shape[0]
    (gemm,) = (node for node in model.graph.node if classifier.gemm_output in node.output)
    kept = [a for a in gemm.attribute if a.name not in ("transB", "alpha", "beta")]
    del gemm.attribute[:]
    gemm.attribute.extend([*kept, helper.make_attribute("transB", 1)])
    new = {
        classifier.weight: np.ascontiguousarray(head.weight, dtype=np.float32),
        classifier.bias: np.ascontiguousarray(head.bias, dtype=np.float32),
    }
    for init in model.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    # Shapes inferred for the old head would now be wrong: let them be inferred again.
    stale = [
        vi for vi in model.graph.value_info if vi.name in (classifier.gemm_output, classifier.softmax_output)
    ]
    for vi in stale:
        model.graph.value_info.remove(vi)
    model.graph.output[0].CopyFrom(
        helper.make_tensor_value_info(model.graph.output[0].name, TensorProto.FLOAT, ["batch", n_classes])
    )
    del model.metadata_props[:]
    helper.set_model_props(model, dict(metadata))
    model.doc_string = f"{metadata.get('model_name', 'model')}: a head fine-tuned by engine-build finetune"
    onnx.checker.check_model(model, full_check=True)
    return model


def check_join(
    model: onnx.ModelProto,
    head: LinearHead,
    images: npt.NDArray[np.float32],
    features: npt.NDArray[np.float32],
) -> float:
    """Largest |joined model - softmax(head(features))| on ``images``; ``EngineError`` above tolerance."""
    session = _session(model, None)
    got = session.run(None, {session.get_inputs()[0].name: images})[0]
    expected = np.exp(log_softmax(head.logits(features)))
    diff = float(np.max(np.abs(got - expected)))
    if diff > JOIN_TOLERANCE:
        raise EngineError(f"the joined model disagrees with its head by {diff:.2e} (over {JOIN_TOLERANCE})")
    return diff


# -- the command ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FinetuneReport:
    """What a fine-tuning run made and measured."""

    out: Path
    model_name: str
    model_version: str
    base_model: str
    class_names: tuple[str, ...]
    counts: dict[str, int]
    data_sha256: str
    feature_tensor: str
    feature_dim: int
    taxonomy: dict[str, Any]
    trained: TrainedHead
    features_s: float
    head_s: float

    @property
    def cv_accuracy(self) -> float:
        """Out-of-fold accuracy of the chosen penalty."""
        return self.trained.chosen.accuracy

    def taxonomy_parents(self) -> dict[str, str | None]:
        """Every label of the taxonomy and its parent."""
        return {row["label"]: row["parent"] for row in self.taxonomy["labels"]}

    def provenance(self) -> dict[str, Any]:
        """The ``training`` metadata: everything a reader needs to reproduce or judge the head."""
        t = self.trained
        return {
            "data_sha256": self.data_sha256,
            "images": sum(self.counts.values()),
            "counts": self.counts,
            "feature_tensor": self.feature_tensor,
            "feature_dim": self.feature_dim,
            "head": "multinomial logistic regression, class-balanced, L2 on standardised features",
            "l2_penalty": t.l2,
            "cv_folds": t.folds,
            "cv": [
                {
                    "l2": s.l2,
                    "accuracy": s.accuracy,
                    "balanced_accuracy": s.balanced_accuracy,
                    "log_loss": s.log_loss,
                }
                for s in t.scores
            ],
            "cv_accuracy": t.chosen.accuracy,
            "cv_balanced_accuracy": t.chosen.balanced_accuracy,
            "temperature": t.temperature,
            "temperature_at_bound": t.temperature_at_bound,
            "cv_log_loss": t.oof_log_loss,
            "cv_log_loss_calibrated": t.oof_log_loss_calibrated,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict for ``engine-build finetune --json``."""
        return {
            "out": str(self.out),
            "model_name": self.model_name,
            "model_version": self.model_version,
            "base_model": self.base_model,
            "class_names": list(self.class_names),
            "taxonomy_version": self.taxonomy["version"],
            **self.provenance(),
            "features_s": round(self.features_s, 2),
            "head_s": round(self.head_s, 2),
        }


def finetune(
    data_dir: Path,
    out: Path,
    *,
    base_onnx: Path | None = None,
    name: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    clock: Callable[[], float] = time.monotonic,
) -> FinetuneReport:
    """Train a new head on ``data_dir`` over ``base_onnx``'s features; write the joined model to ``out``."""
    from engine_build.default import default_onnx_path

    training = scan_training_folder(data_dir)
    base_path = base_onnx or default_onnx_path()
    base_info = read_onnx_model_info(base_path)
    if out.resolve() == base_path.resolve():
        raise ConfigError(f"--out {out} would overwrite the base model; write the fine-tuned model elsewhere")
    base = onnx.load(str(base_path))
    classifier = locate_classifier(base, str(base_path))

    started = clock()
    features = extract_features(
        base, classifier, training, base_info.spec, threads=threads, progress=progress
    )
    features_s = clock() - started

    started = clock()
    fits = len(DEFAULT_L2_GRID) * cv_fold_count(training.targets) + 1
    with tqdm(total=fits, unit="fit", desc="cross-validation", disable=not progress, leave=False) as bar:
        trained = train_head(features.values, training.targets, len(training.class_names), on_fit=bar.update)
    head_s = clock() - started

    taxonomy = taxonomy_document(training)
    Taxonomy.for_classes(training.class_names, taxonomy, origin=str(out))  # serving will build it so
    report = FinetuneReport(
        out=out,
        model_name=name or f"{base_info.model_name}-finetuned",
        model_version=features.data_sha256[:12],
        base_model=f"{base_info.model_name} {base_info.model_version}",
        class_names=training.class_names,
        counts=training.counts(),
        data_sha256=features.data_sha256,
        feature_tensor=classifier.features,
        feature_dim=classifier.feature_dim,
        taxonomy=taxonomy,
        trained=trained,
        features_s=features_s,
        head_s=head_s,
    )
    metadata = _metadata(report, base_info.spec, base, base_path)
    head = trained.calibrated_head()
    joined = join_head(base, classifier, head, metadata)
    check_join(joined, head, features.first_batch, features.values[: len(features.first_batch)])
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    onnx.save(joined, str(partial))
    partial.replace(out)
    read_onnx_model_info(out)  # what engine-build build checks first
    log.info("wrote %s (%d classes)", out, len(training.class_names))
    return report


def _metadata(
    report: FinetuneReport, spec: PreprocessSpec, base: onnx.ModelProto, base_path: Path
) -> dict[str, str]:
    base_meta = {p.key: p.value for p in base.metadata_props}
    return {
        **spec.to_metadata(),
        "model_name": report.model_name,
        "model_version": report.model_version,
        "output": "softmax probabilities over class_names (logits divided by temperature)",
        "class_names": json.dumps(list(report.class_names)),
        "num_classes": str(len(report.class_names)),
        "taxonomy": json.dumps(report.taxonomy),
        "temperature": repr(report.trained.temperature),
        "cv_accuracy": repr(report.cv_accuracy),
        "training_data_sha256": report.data_sha256,
        "training_counts": json.dumps(report.counts),
        "training": json.dumps(report.provenance()),
        "trained_at": utc_now_iso(),
        "base_model": report.base_model,
        "base_onnx_sha256": sha256_file(base_path),
        **{f"base_{key}": base_meta[key] for key in BASE_KEYS_KEPT if key in base_meta},
    }
