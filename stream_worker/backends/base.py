"""The Backend protocol, the engine description, and the factory that opens an engine.

An engine is a file plus its sidecar JSON (see ``engine_build.metadata``); the sidecar
names the backend that runs it, so callers never choose a backend class themselves.

Threading: a backend is owned by exactly one thread (the worker's inference thread, which
for TensorRT also owns the CUDA context). Backends hold no locks; do not share one between
threads, open one per thread instead.
"""

from __future__ import annotations

import fcntl
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from engine_build.metadata import Sidecar, check_compatible, read_sidecar, sha256_file
from stream_worker.errors import EngineError
from stream_worker.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "efficientnet_lite0.onnx"
DEFAULT_ENGINE_FILE = "efficientnet_lite0-onnxruntime-fp32.onnx"


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

    @classmethod
    def from_sidecar(cls, path: Path, sidecar: Sidecar) -> EngineInfo:
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


def default_cache_dir() -> Path:
    """Where engines are cached when settings name no directory: ``~/.cache/lookout``."""
    return Path.home() / ".cache" / "lookout"


def default_engine_path(cache_dir: Path | None = None) -> Path:
    """Path of the default CPU engine (fp32, ONNX Runtime) inside ``cache_dir``."""
    return (cache_dir or default_cache_dir()) / "engines" / DEFAULT_ENGINE_FILE


def default_onnx_path() -> Path:
    """Locate the committed ONNX model.

    Looked up next to the source tree (``<repo>/models``, which also covers editable
    installs) and then inside the package (``stream_worker/data``, for wheels that ship it).
    """
    package_dir = Path(__file__).resolve().parent.parent
    candidates = (
        package_dir.parent / "models" / DEFAULT_MODEL_FILE,
        package_dir / "data" / DEFAULT_MODEL_FILE,
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise EngineError(
        f"the model {DEFAULT_MODEL_FILE} was not found in {' or '.join(str(c.parent) for c in candidates)}; "
        "pass --engine PATH, or export it with `engine-build export --out models/efficientnet_lite0.onnx`"
    )


def _runtime_version(backend: str) -> tuple[str, str | None]:
    """Version of the runtime that would load ``backend`` engines, and the GPU name if any."""
    if backend == "onnxruntime":
        import onnxruntime

        return str(onnxruntime.__version__), None
    if backend == "tensorrt":
        from stream_worker.backends.tensorrt import runtime_version_and_gpu

        return runtime_version_and_gpu()
    raise EngineError(f"unknown backend {backend!r} in engine sidecar; expected onnxruntime or tensorrt")


def verify_engine(engine_path: Path) -> Sidecar:
    """Read the sidecar of ``engine_path`` and check it against this runtime and its ONNX.

    Raises ``EngineError`` (saying how to rebuild) when anything does not match.
    """
    sidecar = read_sidecar(engine_path)
    runtime_version, gpu_name = _runtime_version(sidecar.backend)
    onnx_path = Path(sidecar.onnx_path)
    onnx_sha = sha256_file(onnx_path) if onnx_path.is_file() else None
    check_compatible(
        sidecar,
        runtime_version,
        onnx_sha,
        engine_path=engine_path,
        engine_sha=sha256_file(engine_path),
        gpu_name=gpu_name,
    )
    return sidecar


def open_backend(
    engine_path: Path | None,
    *,
    threads: int | None = None,
    cache_dir: Path | None = None,
) -> Backend:
    """Open the engine at ``engine_path`` with the backend its sidecar names.

    ``None`` means the default CPU engine in ``cache_dir``, built on first use.
    ``threads`` sets ONNX Runtime's intra-op threads (``None``: one per core).
    """
    path = ensure_default_engine(cache_dir or default_cache_dir()) if engine_path is None else engine_path
    sidecar = verify_engine(path)
    info = EngineInfo.from_sidecar(path, sidecar)
    if sidecar.backend == "onnxruntime":
        from stream_worker.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(info, threads=threads)
    from stream_worker.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(info)


def ensure_default_engine(cache_dir: Path, *, onnx_path: Path | None = None) -> Path:
    """Return the default fp32 CPU engine in ``cache_dir``, building it when missing or stale.

    The cache is ours, so a stale default engine (new ONNX Runtime, new model) is rebuilt
    instead of failing. A file lock keeps two workers starting together from building twice.
    """
    engine_path = default_engine_path(cache_dir)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = engine_path.with_name(engine_path.name + ".lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            source = onnx_path or default_onnx_path()
            try:
                sidecar = verify_engine(engine_path)
                if Path(sidecar.onnx_path).resolve() == source.resolve():
                    return engine_path
            except EngineError as exc:
                if engine_path.exists():
                    log.info("rebuilding the default engine: %s", exc)
            from engine_build.cpu import build_cpu_engine

            log.info("building the default CPU engine %s from %s", engine_path, source)
            build_cpu_engine(source, engine_path, precision="fp32")
            return engine_path
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
