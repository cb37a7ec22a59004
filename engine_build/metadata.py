"""Engine sidecars, the writing side: describe a freshly built engine from its source ONNX.

The sidecar's format, and everything serving does with it (reading, compatibility checks),
live in ``stream_worker.backends.sidecar``; this module fills one in at build time from what
the exported ONNX says about itself and writes it next to the engine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stream_worker.backends.sidecar import Sidecar, sha256_file, sidecar_path
from stream_worker.calibration import CALIBRATION_KEY, Calibration
from stream_worker.errors import EngineError
from stream_worker.preprocess import PreprocessSpec
from stream_worker.taxonomy import Taxonomy


@dataclass(frozen=True, slots=True)
class OnnxModelInfo:
    """What the exported ONNX says about itself in its ``metadata_props`` and graph."""

    model_name: str
    model_version: str
    input_name: str
    output_name: str
    spec: PreprocessSpec
    class_names: tuple[str, ...]
    taxonomy_version: str
    """Version of the taxonomy that will label the model (its own, else the packaged one)."""
    taxonomy: dict[str, Any] | None = None
    """The model's own taxonomy document (metadata key ``taxonomy``, JSON), when it has one."""
    calibration: dict[str, Any] | None = None
    """The model's calibration document (metadata key ``calibration``, JSON), when it has one."""


def read_onnx_model_info(onnx_path: Path) -> OnnxModelInfo:
    """Read names, preprocessing, class names and any own taxonomy from an exported ONNX model.

    A model with its own label set (e.g. a fine-tuned one) carries its taxonomy document, the
    shape of ``stream_worker/data/taxonomy.yaml``, as JSON under the metadata key ``taxonomy``.
    The taxonomy is built for the model's class names here, as serving will build it, so a
    model that lacks a class the taxonomy maps is refused before any build rather than in
    production. Raises ``EngineError`` when the file is missing, not ONNX, lacks the metadata
    that ``engine-build export`` writes, or cannot be labelled.
    """
    import onnx

    if not onnx_path.is_file():
        raise EngineError(f"ONNX model not found: {onnx_path}")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends from protobuf
        raise EngineError(f"{onnx_path} is not a readable ONNX model: {exc}") from exc
    meta = {p.key: p.value for p in model.metadata_props}
    if "class_names" not in meta:
        raise EngineError(
            f"{onnx_path} has no class_names metadata; export it with `engine-build export --out PATH`"
        )
    class_names = tuple(str(name) for name in json.loads(meta["class_names"]))
    taxonomy = _own_taxonomy(meta, onnx_path)
    labelled_by = Taxonomy.for_classes(class_names, taxonomy, origin=f"model {onnx_path}")
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise EngineError(f"{onnx_path} must have exactly one image input and one output")
    return OnnxModelInfo(
        model_name=meta.get("model_name", onnx_path.stem),
        model_version=meta.get("model_version", "unknown"),
        input_name=inputs[0],
        output_name=model.graph.output[0].name,
        spec=PreprocessSpec.from_metadata(meta),
        class_names=class_names,
        taxonomy_version=str(labelled_by.version),
        taxonomy=taxonomy,
        calibration=_calibration(meta, onnx_path),
    )


def _calibration(meta: Mapping[str, str], onnx_path: Path) -> dict[str, Any] | None:
    """The checked calibration document, or ``None`` when the model has none."""
    if CALIBRATION_KEY not in meta:
        return None
    return Calibration.from_json(meta[CALIBRATION_KEY], origin=str(onnx_path)).to_document()


def _own_taxonomy(meta: Mapping[str, str], onnx_path: Path) -> dict[str, Any] | None:
    if "taxonomy" not in meta:
        return None
    try:
        document = json.loads(meta["taxonomy"])
    except ValueError as exc:
        raise EngineError(f"{onnx_path}: the taxonomy metadata is not JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise EngineError(f"{onnx_path}: the taxonomy metadata must be a JSON object")
    return document


def utc_now_iso() -> str:
    """The current time as an ISO-8601 UTC string, seconds precision."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def write_sidecar(engine_path: Path, sidecar: Sidecar) -> Path:
    """Write the sidecar next to ``engine_path`` atomically; returns its path."""
    path = sidecar_path(engine_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(sidecar.to_json(), encoding="utf-8")
    tmp.replace(path)
    return path


def check_batch_profile(min_batch: int, opt_batch: int, max_batch: int) -> None:
    """Reject a batch profile that is not 1 <= min <= opt <= max (a ``ConfigError``)."""
    from stream_worker.errors import ConfigError

    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ConfigError(
            f"batch profile must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}"
        )


def make_sidecar(
    *,
    onnx_path: Path,
    engine_path: Path,
    backend: str,
    precision: str,
    batch_profile: tuple[int, int, int],
    runtime_version: str,
    gpu_name: str | None = None,
    build: dict[str, Any] | None = None,
) -> Sidecar:
    """Describe a freshly built engine from its source ONNX and the build settings."""
    model = read_onnx_model_info(onnx_path)
    min_batch, opt_batch, max_batch = batch_profile
    return Sidecar(
        backend=backend,
        precision=precision,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        onnx_path=str(onnx_path.resolve()),
        onnx_sha256=sha256_file(onnx_path),
        engine_sha256=sha256_file(engine_path),
        runtime_version=runtime_version,
        model_name=model.model_name,
        model_version=model.model_version,
        input_name=model.input_name,
        output_name=model.output_name,
        preprocess=model.spec.to_metadata(),
        class_names=model.class_names,
        taxonomy_version=model.taxonomy_version,
        gpu_name=gpu_name,
        created_at=utc_now_iso(),
        build=dict(build or {}),
        taxonomy=model.taxonomy,
        calibration=model.calibration,
    )
