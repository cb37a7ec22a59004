"""Calibration an engine carries: a serving temperature and the thresholds fitted with it.

``engine-build calibrate`` fits them on a labelled development set and writes them into the ONNX
model's metadata under the key ``calibration`` (a JSON object); engine sidecars copy it, so
serving reads it without the ONNX. A model without the key serves exactly as before: temperature
1 (the engine's probabilities untouched, at no cost) and the settings' own thresholds.

The document::

    {"serving_temperature": 1.7,            # applied to the engine's output, see temperature_scale
     "rollup_threshold": 0.35,              # single mode: a label is published from this score
     "rollup_label_thresholds": {"car": 0.3},   # single mode: per-label exceptions
     "review_threshold": 0.25,              # frames whose best leaf score is under it go to review
     "fitted": {...}}                       # provenance: data, split, rule, ECE before/after

Every key is optional. The thresholds are defaults: a value the user set (flag, environment or
settings file) always wins (``stream_worker.settings.with_engine_calibration``).

``serving_temperature`` is deliberately not the key ``temperature`` that ``engine-build finetune``
writes: a fine-tuned head has its temperature folded into its weights already, and that key only
records it. Serving applies ``serving_temperature`` and never ``temperature``, so nothing is
applied twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_worker.errors import EngineError

CALIBRATION_KEY = "calibration"
"""ONNX metadata key (and sidecar field) of the calibration document."""

_KNOWN = frozenset(
    {"serving_temperature", "rollup_threshold", "rollup_label_thresholds", "review_threshold", "fitted"}
)


@dataclass(frozen=True, slots=True)
class Calibration:
    """What an engine's calibration document says; the default is no calibration at all."""

    serving_temperature: float = 1.0
    rollup_threshold: float | None = None
    rollup_label_thresholds: Mapping[str, float] = field(default_factory=dict)
    review_threshold: float | None = None
    fitted: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_document(cls, document: Mapping[str, Any] | None, *, origin: str = "the engine") -> Calibration:
        """Read and check a calibration document (``None``: none); a bad one is an ``EngineError``."""
        if document is None:
            return cls()
        if not isinstance(document, Mapping):
            raise EngineError(f"{origin}: the calibration must be a JSON object")
        unknown = sorted(set(document) - _KNOWN)
        if unknown:
            raise EngineError(f"{origin}: unknown calibration key(s) {', '.join(unknown)}")
        temperature = _number(document.get("serving_temperature", 1.0), "serving_temperature", origin)
        if not temperature > 0:
            raise EngineError(f"{origin}: serving_temperature must be above 0, got {temperature}")
        per_label = document.get("rollup_label_thresholds") or {}
        if not isinstance(per_label, Mapping):
            raise EngineError(f"{origin}: rollup_label_thresholds must be an object of label: score")
        fitted = document.get("fitted") or {}
        if not isinstance(fitted, Mapping):
            raise EngineError(f"{origin}: fitted must be an object")
        return cls(
            serving_temperature=temperature,
            rollup_threshold=_share(document.get("rollup_threshold"), "rollup_threshold", origin),
            rollup_label_thresholds={
                str(label): _checked_share(value, f"rollup_label_thresholds[{label}]", origin)
                for label, value in per_label.items()
            },
            review_threshold=_share(document.get("review_threshold"), "review_threshold", origin),
            fitted=dict(fitted),
        )

    @classmethod
    def from_json(cls, text: str | None, *, origin: str = "the engine") -> Calibration:
        """Read the metadata value (JSON text; ``None``: no calibration)."""
        if text is None:
            return cls()
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise EngineError(f"{origin}: the calibration metadata is not JSON ({exc})") from exc
        return cls.from_document(document, origin=origin)

    def to_document(self) -> dict[str, Any]:
        """The JSON-ready document; thresholds that are not set are left out."""
        document: dict[str, Any] = {"serving_temperature": self.serving_temperature}
        if self.rollup_threshold is not None:
            document["rollup_threshold"] = self.rollup_threshold
        if self.rollup_label_thresholds:
            document["rollup_label_thresholds"] = dict(self.rollup_label_thresholds)
        if self.review_threshold is not None:
            document["review_threshold"] = self.review_threshold
        if self.fitted:
            document["fitted"] = dict(self.fitted)
        return document

    def apply(self, probs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The engine's probabilities at the serving temperature (the same array at temperature 1)."""
        return temperature_scale(probs, self.serving_temperature)


def temperature_scale(probs: npt.NDArray[np.float32], temperature: float) -> npt.NDArray[np.float32]:
    """``softmax(logits / T)`` from ``probs = softmax(logits)``, row by row, for a whole batch.

    ``p_i ** (1 / T) / sum_j p_j ** (1 / T)`` equals dividing the logits by ``T`` (the per-row
    constant of the log cancels), so engines keep their softmax inside the graph. Each row is
    first divided by its largest value, so the powers cannot underflow to an all-zero row even at
    a very low ``T``; an exact zero stays zero, the limit of a very negative logit. ``T == 1``
    returns ``probs`` itself: an uncalibrated engine pays nothing.
    """
    if temperature == 1.0:
        return probs
    if not temperature > 0:
        raise EngineError(f"the serving temperature must be above 0, got {temperature}")
    batch = np.asarray(probs, dtype=np.float32)
    scaled: npt.NDArray[np.float32] = batch / batch.max(axis=1, keepdims=True)
    np.power(scaled, np.float32(1.0 / temperature), out=scaled)
    scaled /= scaled.sum(axis=1, keepdims=True)
    return scaled


def _number(value: Any, name: str, origin: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EngineError(f"{origin}: calibration {name} must be a number, got {value!r}")
    return float(value)


def _checked_share(value: Any, name: str, origin: str) -> float:
    number = _number(value, name, origin)
    if not 0.0 <= number <= 1.0:
        raise EngineError(f"{origin}: calibration {name} must lie in [0, 1], got {number}")
    return number


def _share(value: Any, name: str, origin: str) -> float | None:
    return None if value is None else _checked_share(value, name, origin)
