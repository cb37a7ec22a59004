"""Open an engine: verify its sidecar against this machine, then hand it to the backend it names.

When no engine is named, the default one comes from a provider registered under the
``lookout.engines`` entry-point group (name ``default`` for fp32, ``default-int8`` for int8): a
callable taking the cache directory and returning the path of a ready engine. The engine
builder's package registers the ones that build the default CPU engines on first use (see
``pyproject.toml``); serving never imports the builder, so the contract between the two flows
one way. Which of the two is served is decided in ``stream_worker.backends.precision``. The
backends are imported lazily, so a CPU-only install never touches TensorRT.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from stream_worker.backends.base import Backend, EngineInfo
from stream_worker.backends.cache import default_cache_dir
from stream_worker.backends.sidecar import BACKENDS, Sidecar, check_compatible, read_sidecar, sha256_file
from stream_worker.errors import EngineError

ENGINE_PROVIDERS = "lookout.engines"
"""Entry-point group of engine providers; the one named ``default`` supplies the default engine."""

DEFAULT_PROVIDERS = {"fp32": "default", "int8": "default-int8"}
"""The provider of the default engine in each precision, by entry-point name."""

EngineProvider = Callable[[Path], Path]


def default_engine_provider(precision: str = "fp32") -> EngineProvider:
    """The installed provider of the default ``precision`` engine; without one, a one-line ``EngineError``."""
    name = DEFAULT_PROVIDERS[precision]
    found = entry_points(group=ENGINE_PROVIDERS, name=name)
    hint = (
        f"pass --engine PATH, an engine built with `engine-build build --backend onnxruntime "
        f"--precision {precision} --out PATH`"
    )
    if not found:
        raise EngineError(
            f"no default {precision} engine provider is installed ({ENGINE_PROVIDERS}: {name}; "
            f"reinstall lookout): {hint}"
        )
    entry = sorted(found, key=lambda e: e.value)[0]
    try:
        provider: EngineProvider = entry.load()
    except ImportError as exc:
        raise EngineError(
            f"the default engine provider {entry.value} fails to import ({exc}): {hint}"
        ) from None
    return provider


def default_engine(cache_dir: Path | None = None, precision: str = "fp32") -> Path:
    """Path of the default engine in ``precision`` in ``cache_dir`` (default: ``~/.cache/lookout``),
    made on first use."""
    return default_engine_provider(precision)(cache_dir or default_cache_dir())


def _runtime_version(backend: str) -> tuple[str, str | None]:
    """Version of the runtime that would load ``backend`` engines, and the GPU name if any."""
    if backend == "onnxruntime":
        import onnxruntime

        return str(onnxruntime.__version__), None
    if backend == "tensorrt":
        from stream_worker.backends.tensorrt import runtime_version_and_gpu

        return runtime_version_and_gpu()
    raise EngineError(f"unknown backend {backend!r} in engine sidecar; expected {' or '.join(BACKENDS)}")


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
    reason: str = "",
) -> Backend:
    """Open the engine at ``engine_path`` with the backend its sidecar names.

    ``None`` means the default fp32 engine in ``cache_dir`` (see :func:`default_engine`).
    ``threads`` sets ONNX Runtime's intra-op threads (``None``: one per core). ``reason`` says
    why this engine is served (``EngineInfo.reason``).
    """
    path = default_engine(cache_dir) if engine_path is None else engine_path
    sidecar = verify_engine(path)
    info = EngineInfo.from_sidecar(path, sidecar, reason=reason)
    if sidecar.backend == "onnxruntime":
        from stream_worker.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(info, threads=threads)
    from stream_worker.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(info)
