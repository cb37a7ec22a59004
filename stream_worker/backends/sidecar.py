"""Engine sidecars, the reading side: what an engine is, and whether this machine may trust it.

Every engine file has a sidecar JSON next to it (``<engine>.json``). An engine file alone
cannot tell whether it still matches the runtime that wants to load it (TensorRT plans are tied
to the TensorRT version and the GPU model; ONNX Runtime's optimised graphs may hold
runtime-specific fused operators) or the ONNX model it came from. The sidecar records all of
that, plus everything serving needs (preprocessing, class names, the label taxonomy when the
model carries its own, batch profile), so that loading an engine never needs the source ONNX
and a stale engine is caught at load time with the exact command that rebuilds it.

This module is the contract between serving and the engine builder: ``engine-build`` writes
sidecars with it, serving reads them with it, and nothing here imports the builder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stream_worker.errors import EngineError
from stream_worker.preprocess import PreprocessSpec

SIDECAR_FORMAT = 1
BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = {"onnxruntime": ("fp32", "int8"), "tensorrt": ("fp32", "fp16", "int8")}


def sidecar_path(engine_path: Path) -> Path:
    """Where the sidecar of ``engine_path`` lives: the engine's file name plus ``.json``."""
    return engine_path.with_name(engine_path.name + ".json")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so a large engine is not held in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Sidecar:
    """The contents of an engine's sidecar JSON.

    ``taxonomy`` is the label taxonomy document (the shape of ``stream_worker/data/taxonomy.yaml``)
    of a model that carries its own label set, e.g. one made by fine-tuning; ``None`` means the
    packaged taxonomy. Sidecars written before the field existed read as ``None``, and it is left
    out of the JSON when ``None``, so such sidecars stay byte-for-byte what they were.

    ``calibration`` is the model's calibration document (``stream_worker.calibration``: serving
    temperature and fitted thresholds, from the ONNX metadata key ``calibration``); ``None``, and
    left out of the JSON, when the model has none.
    """

    backend: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    onnx_path: str
    onnx_sha256: str
    engine_sha256: str
    runtime_version: str
    model_name: str
    model_version: str
    input_name: str
    output_name: str
    preprocess: dict[str, str]
    class_names: tuple[str, ...]
    taxonomy_version: str
    gpu_name: str | None = None
    created_at: str = ""
    build: dict[str, Any] = field(default_factory=dict)
    taxonomy: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    format: int = SIDECAR_FORMAT

    @property
    def spec(self) -> PreprocessSpec:
        """The preprocessing the engine expects."""
        return PreprocessSpec.from_metadata(self.preprocess)

    def to_json(self) -> str:
        """Serialise with a stable key order, one key per line, for diffs and humans."""
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        if self.taxonomy is None:
            del data["taxonomy"]
        if self.calibration is None:
            del data["calibration"]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, origin: str = "sidecar") -> Sidecar:
        """Parse a sidecar; a malformed or foreign file is an ``EngineError``."""
        try:
            data = json.loads(text)
            if data.get("format") != SIDECAR_FORMAT:
                raise EngineError(f"{origin}: unsupported sidecar format {data.get('format')!r}")
            data["class_names"] = tuple(data["class_names"])
            if data.get("taxonomy") is not None and not isinstance(data["taxonomy"], dict):
                raise EngineError(f"{origin}: the embedded taxonomy must be a mapping")
            if data.get("calibration") is not None and not isinstance(data["calibration"], dict):
                raise EngineError(f"{origin}: the embedded calibration must be a mapping")
            return cls(**data)
        except EngineError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise EngineError(f"{origin}: malformed engine sidecar ({exc})") from exc

    def rebuild_command(self, engine_path: Path) -> str:
        """The exact command line that rebuilds this engine in place."""
        parts = [
            "engine-build build",
            f"--backend {self.backend}",
            f"--precision {self.precision}",
            f"--out {engine_path}",
            f"--onnx {self.onnx_path}",
        ]
        if self.backend == "tensorrt" or (self.min_batch, self.opt_batch, self.max_batch) != (1, 8, 32):
            parts.append(
                f"--min-batch {self.min_batch} --opt-batch {self.opt_batch} --max-batch {self.max_batch}"
            )
        calib = self.build.get("calibration_dir")
        if self.precision == "int8" and calib:
            parts.append(f"--calib {calib}")
        return " ".join(parts)


def read_sidecar(engine_path: Path) -> Sidecar:
    """Read the sidecar of ``engine_path``; a missing one says how to build the engine."""
    path = sidecar_path(engine_path)
    if not engine_path.is_file():
        raise EngineError(
            f"engine not found: {engine_path} (build one with "
            f"`engine-build build --backend onnxruntime --precision fp32 --out {engine_path}`)"
        )
    if not path.is_file():
        raise EngineError(
            f"engine {engine_path} has no sidecar {path.name}; rebuild it with "
            f"`engine-build build --backend ... --precision ... --out {engine_path}`"
        )
    return Sidecar.from_json(path.read_text(encoding="utf-8"), origin=str(path))


def _same_runtime(backend: str, built_with: str, running: str) -> bool:
    if backend == "tensorrt":
        # A TensorRT plan is only guaranteed to load on the exact version that built it.
        return built_with == running
    # ONNX Runtime keeps its saved graphs loadable within a minor release line; fused
    # contrib operators may change between minor releases.
    return built_with.split(".")[:2] == running.split(".")[:2]


def check_compatible(
    sidecar: Sidecar,
    runtime_version: str,
    onnx_sha: str | None,
    *,
    engine_path: Path,
    engine_sha: str | None = None,
    gpu_name: str | None = None,
) -> None:
    """Raise ``EngineError`` when the engine cannot be trusted with this runtime and model.

    ``onnx_sha`` is the sha256 of the source ONNX as it is now (``None`` when it is not
    available here, e.g. an engine shipped without its model: then only the runtime is
    checked). ``engine_sha`` is the engine file's current sha256, catching an engine that
    was replaced without its sidecar. ``gpu_name`` is checked for TensorRT engines.
    """
    problems: list[str] = []
    if not _same_runtime(sidecar.backend, sidecar.runtime_version, runtime_version):
        problems.append(f"built with {sidecar.backend} {sidecar.runtime_version}, running {runtime_version}")
    if onnx_sha is not None and onnx_sha != sidecar.onnx_sha256:
        problems.append(f"its source ONNX {sidecar.onnx_path} changed since the build")
    if engine_sha is not None and engine_sha != sidecar.engine_sha256:
        problems.append("the engine file does not match its sidecar")
    if sidecar.backend == "tensorrt" and gpu_name is not None and gpu_name != sidecar.gpu_name:
        problems.append(f"built for GPU {sidecar.gpu_name}, running on {gpu_name}")
    if problems:
        raise EngineError(
            f"engine {engine_path} is stale: {'; '.join(problems)}. "
            f"Rebuild it with `{sidecar.rebuild_command(engine_path)}`"
        )
