"""The default engines: the shipped model as fp32 and int8 ONNX Runtime engines, built on first use.

``stream-worker run`` with no ``--engine`` serves one of them (``--precision``, see
``stream_worker.backends.precision``). Serving does not import this package: it finds
:func:`ensure_default_engine` and :func:`ensure_default_int8_engine` through the
``lookout.engines`` entry points named ``default`` and ``default-int8`` (see ``pyproject.toml``
and ``stream_worker.backends.registry``).

The int8 engine's sidecar keeps its agreement with the fp32 engine (``build.agreement``,
measured by :mod:`engine_build.agreement` on held-out real frames when it is built): serving
reads it to decide whether int8 may be served by default, without measuring it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from engine_build.agreement import engine_files_agreement
from engine_build.cpu import QuantOptions, build_cpu_engine
from engine_build.metadata import write_sidecar
from stream_worker.backends.registry import verify_engine
from stream_worker.backends.sidecar import Sidecar, sidecar_path
from stream_worker.errors import EngineError, LookoutError

log = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "efficientnet_lite0.onnx"
DEFAULT_ENGINE_FILE = "efficientnet_lite0-onnxruntime-fp32.onnx"
DEFAULT_INT8_ENGINE_FILE = "efficientnet_lite0-onnxruntime-int8.onnx"


def default_engine_path(cache_dir: Path) -> Path:
    """Path of the default CPU engine (fp32, ONNX Runtime) inside ``cache_dir``."""
    return cache_dir / "engines" / DEFAULT_ENGINE_FILE


def default_int8_engine_path(cache_dir: Path) -> Path:
    """Path of the default int8 CPU engine (static QDQ, ONNX Runtime) inside ``cache_dir``."""
    return cache_dir / "engines" / DEFAULT_INT8_ENGINE_FILE


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


@contextlib.contextmanager
def _building(engine_path: Path) -> Iterator[None]:
    """Hold the engine's file lock: two workers starting together never build it twice."""
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = engine_path.with_name(engine_path.name + ".lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _usable(engine_path: Path, source: Path, what: str) -> Sidecar | None:
    """The sidecar of a cached engine built from ``source`` that this runtime accepts, else None."""
    try:
        sidecar = verify_engine(engine_path)
    except EngineError as exc:
        if engine_path.exists():
            log.info("rebuilding the %s: %s", what, exc)
        return None
    if Path(sidecar.onnx_path).resolve() != source.resolve():
        log.info("rebuilding the %s: it was built from %s, not %s", what, sidecar.onnx_path, source)
        return None
    return sidecar


def ensure_default_engine(cache_dir: Path, *, onnx_path: Path | None = None) -> Path:
    """Return the default fp32 CPU engine in ``cache_dir``, building it when missing or stale.

    The cache is ours, so a stale default engine (new ONNX Runtime, new model) is rebuilt
    instead of failing. A file lock keeps two workers starting together from building twice.
    """
    engine_path = default_engine_path(cache_dir)
    with _building(engine_path):
        source = onnx_path or default_onnx_path()
        if _usable(engine_path, source, "default engine") is None:
            log.info("building the default CPU engine %s from %s", engine_path, source)
            build_cpu_engine(source, engine_path, precision="fp32")
        return engine_path


def ensure_default_int8_engine(cache_dir: Path, *, onnx_path: Path | None = None) -> Path:
    """Return the default int8 CPU engine in ``cache_dir``, building it when missing or stale.

    Built with the default recipe (``engine_build.cpu.QuantOptions``) on the bundled real frames,
    then measured against the default fp32 engine (built first when missing) on held-out frames;
    the result goes into its sidecar as ``build.agreement``. An engine without that measurement,
    or measured against another fp32 engine, counts as stale.
    """
    fp32 = ensure_default_engine(cache_dir, onnx_path=onnx_path)
    reference_sha = verify_engine(fp32).engine_sha256
    engine_path = default_int8_engine_path(cache_dir)
    with _building(engine_path):
        source = onnx_path or default_onnx_path()
        sidecar = _usable(engine_path, source, "default int8 engine")
        if sidecar is not None:
            measured = sidecar.build.get("agreement")
            recipe = json.loads(json.dumps(asdict(QuantOptions())))  # as the sidecar's JSON holds it
            if sidecar.build.get("quantization") != recipe:
                log.info("rebuilding the default int8 engine: built with another recipe than today's default")
            elif isinstance(measured, dict) and measured.get("reference_sha256") == reference_sha:
                return engine_path
            else:
                log.info("rebuilding the default int8 engine: not measured against the fp32 engine %s", fp32)
        log.info("building the default int8 CPU engine %s from %s (about a minute)", engine_path, source)
        try:
            sidecar = build_cpu_engine(source, engine_path, precision="int8", progress=False)
        except LookoutError:
            raise
        except Exception as exc:  # the quantiser's and decoders' errors are untyped
            why = f"{type(exc).__name__}: {exc}"
            raise EngineError(f"building the default int8 engine failed: {why}") from exc
        try:
            agreement = engine_files_agreement(fp32, engine_path)
        except Exception as exc:  # any failure to measure leaves the engine unusable by default
            engine_path.unlink(missing_ok=True)
            sidecar_path(engine_path).unlink(missing_ok=True)
            raise EngineError(f"the int8 engine's agreement with fp32 could not be measured: {exc}") from exc
        agreement["reference_sha256"] = reference_sha
        write_sidecar(
            engine_path, dataclasses.replace(sidecar, build={**sidecar.build, "agreement": agreement})
        )
        log.info(
            "default int8 engine: %.1f %% published-label agreement with fp32 on %d held-out frames",
            100 * agreement["published_label"],
            agreement["frames"],
        )
        return engine_path
