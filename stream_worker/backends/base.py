"""The Backend protocol and the description of an opened engine.

An engine is a file plus its sidecar JSON (``stream_worker.backends.sidecar``); the sidecar
names the backend that runs it, and ``stream_worker.backends.registry.open_backend`` picks
it, so callers never choose a backend class themselves.

Threading: a backend is owned by exactly one thread (the worker's inference thread, which
for TensorRT also owns the CUDA context). Backends hold no locks; do not share one between
threads, open one per thread instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from stream_worker.backends.sidecar import Sidecar
from stream_worker.calibration import Calibration
from stream_worker.errors import EngineError
from stream_worker.preprocess import PreprocessSpec


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """Everything serving needs to know about an opened engine."""

    path: Path
    backend: str
    precision: str
    model_name: str
    model_version: str
    max_batch: int
    opt_batch: int
    input_name: str
    output_name: str
    spec: PreprocessSpec
    class_names: tuple[str, ...]
    onnx_sha256: str
    taxonomy_version: str
    taxonomy: dict[str, Any] | None = None
    """The model's own taxonomy document, when it carries one (see ``Sidecar.taxonomy``)."""
    engine_sha256: str = ""
    """SHA-256 of the engine file (checked against the file when it is opened)."""
    calibration: Calibration = field(default_factory=Calibration)
    """Serving temperature and fitted thresholds (``Sidecar.calibration``); none by default."""
    reason: str = ""
    """Why this engine is served, one of ``stream_worker.backends.precision.REASONS`` (the
    ``reason`` label of ``lookout_engine_info``); empty when nobody said."""

    @classmethod
    def from_sidecar(cls, path: Path, sidecar: Sidecar, *, reason: str = "") -> EngineInfo:
        """Describe the engine at ``path`` from its already-read sidecar."""
        return cls(
            path=path,
            backend=sidecar.backend,
            precision=sidecar.precision,
            model_name=sidecar.model_name,
            model_version=sidecar.model_version,
            max_batch=sidecar.max_batch,
            opt_batch=sidecar.opt_batch,
            input_name=sidecar.input_name,
            output_name=sidecar.output_name,
            spec=sidecar.spec,
            class_names=sidecar.class_names,
            onnx_sha256=sidecar.onnx_sha256,
            taxonomy_version=sidecar.taxonomy_version,
            taxonomy=sidecar.taxonomy,
            engine_sha256=sidecar.engine_sha256,
            calibration=Calibration.from_document(sidecar.calibration, origin=f"engine {path}"),
            reason=reason,
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image slot: (3, height, width)."""
        return (3, self.spec.height, self.spec.width)


class Backend(Protocol):
    """A loaded engine. One thread owns it; ``infer`` is not thread-safe."""

    info: EngineInfo

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Class probabilities (B x classes, rows sum to 1) for a B x 3 x H x W batch.

        B may be anything from 1 to ``info.max_batch``. The result is the caller's to
        keep: it is never overwritten by a later call.
        """
        ...

    def close(self) -> None:
        """Release the session / device memory. The backend is unusable afterwards."""
        ...


def check_batch(batch: npt.NDArray[np.float32], info: EngineInfo) -> int:
    """Validate a batch against the engine and return its size; raises ``EngineError``."""
    if batch.dtype != np.float32:
        raise EngineError(f"batch must be float32, got {batch.dtype}")
    if batch.ndim != 4 or batch.shape[1:] != info.input_shape:
        expected = ", ".join(map(str, info.input_shape))
        raise EngineError(f"batch must have shape (B, {expected}), got {batch.shape}")
    size = int(batch.shape[0])
    if not 1 <= size <= info.max_batch:
        raise EngineError(f"batch size {size} is outside the engine's profile 1..{info.max_batch}")
    return size
