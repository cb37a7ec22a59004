"""The default engine: the shipped model as an fp32 ONNX Runtime engine, built on first use.

``stream-worker run`` with no ``--engine`` serves it. Serving does not import this package: it
finds :func:`ensure_default_engine` through the ``lookout.engines`` entry point named ``default``
(see ``pyproject.toml`` and ``stream_worker.backends.registry``).
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

from engine_build.cpu import build_cpu_engine
from stream_worker.backends.registry import verify_engine
from stream_worker.errors import EngineError

log = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "efficientnet_lite0.onnx"
DEFAULT_ENGINE_FILE = "efficientnet_lite0-onnxruntime-fp32.onnx"


def default_engine_path(cache_dir: Path) -> Path:
    """Path of the default CPU engine (fp32, ONNX Runtime) inside ``cache_dir``."""
    return cache_dir / "engines" / DEFAULT_ENGINE_FILE


def default_onnx_path() -> Path:
    """Locate the shipped ONNX model.

    Looked up next to the source tree (``<repo>/models``, which also covers editable
    installs) and then inside the serving package (``stream_worker/data``, for wheels that
    ship it).
    """
    import stream_worker

    package_dir = Path(stream_worker.__file__).resolve().parent
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
            log.info("building the default CPU engine %s from %s", engine_path, source)
            build_cpu_engine(source, engine_path, precision="fp32")
            return engine_path
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
