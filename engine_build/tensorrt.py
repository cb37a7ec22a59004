"""TensorRT 10 engines: ONNX parser, one optimisation profile, a timing cache, fp32/fp16/int8.

Precision, honestly named:

- ``fp32``: TF32 is cleared. TensorRT enables it by default for FP32 layers on Ampere and later,
  which would make an "fp32" engine a TF32 one (10-bit mantissa in convolutions and GEMMs).
- ``fp16``: the weakly typed ``BuilderFlag.FP16``: TensorRT may pick FP16 kernels per layer.
- ``int8``: explicit quantisation, the TensorRT 10 way. The ONNX model is first quantised to Q/DQ
  (``engine_build.cpu.quantize_int8``, calibrated on real images through the serving
  preprocessing) with the options TensorRT's ONNX parser accepts (``TENSORRT_QUANT_EXTRA``), then
  parsed into a *strongly typed* network so TensorRT takes every precision from the Q/DQ nodes.
  The implicit-quantisation calibrators are deprecated since TensorRT 10.1 and not used.

The timing cache is treated as Polygraphy treats it: a cache TensorRT refuses (another GPU,
another TensorRT) or cannot read is replaced by a fresh one, and it is written (atomically) only
when TensorRT hands one back. The engine file is moved into place last, after its sidecar, so a
reader never sees a new engine without its sidecar (an old engine with a new sidecar fails the
sidecar's sha256 check and is rebuilt).

``tensorrt`` and the CUDA bindings are imported lazily; without them every entry point raises a
one-line ``EngineError`` saying what to install.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine_build.cpu import DEFAULT_CALIBRATION_LIMIT, QuantOptions, calibration_sources, quantize_int8
from engine_build.metadata import check_batch_profile, make_sidecar, read_onnx_model_info, write_sidecar
from stream_worker.backends.sidecar import PRECISIONS, Sidecar, sidecar_path
from stream_worker.backends.tensorrt import import_tensorrt, runtime_version_and_gpu
from stream_worker.errors import ConfigError, EngineError

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_BYTES = 2 << 30

TENSORRT_QUANT = QuantOptions(
    symmetric_int8_activations=True,
    per_channel=True,
    reduce_range=False,
    # The CPU recipe's bias correction and fp32 first convolution are measured on ONNX Runtime
    # only; TensorRT builds keep the recipe they were written for.
    bias_correction=False,
    keep_first_conv_fp32=False,
    keep_first_depthwise_fp32=False,
)
"""Signed, zero-point-free activations and full-range int8 weights, per output channel."""

TENSORRT_QUANT_EXTRA: dict[str, object] = {
    # TensorRT's ONNX parser dequantizes only 8-bit (and FP8/INT4) tensors; ONNX Runtime's
    # default INT32 bias behind a DequantizeLinear fails to parse. TensorRT fuses float biases.
    "QuantizeBias": False,
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    # A Q/DQ pair per consumer, so TensorRT can fuse each one into its own layer.
    "DedicatedQDQPair": True,
    # Convolution weights quantised per output channel (axis 0), as TensorRT expects.
    "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1},
}
"""ONNX Runtime quantiser options for a Q/DQ model TensorRT can parse: NVIDIA's own ORT-based
int8 flow (TensorRT Model Optimizer) uses these, minus its operator-registry patches."""


def default_timing_cache(out: Path) -> Path:
    """Timing cache kept next to the engine, reused by later builds on the same GPU."""
    return out.with_name(out.name + ".timing-cache")


def _parse(trt: Any, builder: Any, onnx_path: Path, *, strongly_typed: bool, logger: Any) -> Any:
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
    return network, parser


def set_precision(trt: Any, config: Any, precision: str) -> dict[str, object]:
    """Set the builder flags for ``precision``; returns what was set, for the sidecar."""
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
        return {"tf32": False}
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        return {"fp16": True, "tf32": True}
    # int8: the network is strongly typed; precisions come from the Q/DQ nodes, not from flags.
    return {"strongly_typed": True, "tf32": True}


def load_timing_cache(config: Any, path: Path) -> tuple[Any, str]:
    """Attach the timing cache at ``path`` to ``config``, or a fresh one; ``(cache, how)``.

    ``how`` is ``reused``, ``new`` (no file), ``replaced`` (the file was unreadable or from
    another GPU or TensorRT version: TensorRT's ``set_timing_cache`` answers False for those),
    or ``none`` (TensorRT accepted no cache at all: the build goes on without one).
    """
    data = b""
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError as exc:
        log.warning("timing cache %s cannot be read (%s); starting a new one", path, exc)
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception as exc:  # TensorRT raises its own error types on a corrupt cache
            log.warning("timing cache %s is unreadable (%s); starting a new one", path, exc)
            cache = None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache, "reused"
        if cache is not None:
            log.warning("timing cache %s is from another GPU or TensorRT version; starting a new one", path)
    fresh = config.create_timing_cache(b"")
    if fresh is not None and config.set_timing_cache(fresh, ignore_mismatch=False):
        return fresh, "replaced" if data else "new"
    log.warning("TensorRT accepted no timing cache; building without one")
    return None, "none"


def save_timing_cache(config: Any, path: Path) -> bool:
    """Write the config's timing cache to ``path`` atomically, when there is one; True if written."""
    cache = config.get_timing_cache()
    if cache is None:
        return False
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_bytes(bytes(cache.serialize()))
        partial.replace(path)
    except OSError as exc:
        log.warning("timing cache %s not saved (%s); the engine is fine", path, exc)
        partial.unlink(missing_ok=True)
        return False
    return True


def build_tensorrt_engine(
    onnx_path: Path,
    out: Path,
    *,
    precision: str,
    batch_profile: tuple[int, int, int],
    calib_dir: Path | None = None,
    timing_cache: Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    calibration_limit: int = DEFAULT_CALIBRATION_LIMIT,
    progress: bool = True,
) -> Sidecar:
    """Build a serialized TensorRT engine at ``out`` with its sidecar; returns the sidecar."""
    if precision not in PRECISIONS["tensorrt"]:
        raise ConfigError(f"TensorRT engines are fp32, fp16 or int8, not {precision!r}")
    check_batch_profile(*batch_profile)
    trt = import_tensorrt()
    runtime_version, gpu_name = runtime_version_and_gpu()
    model = read_onnx_model_info(onnx_path)
    cache_path = timing_cache or default_timing_cache(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    build: dict[str, Any] = {"workspace_bytes": workspace_bytes, "timing_cache": str(cache_path)}

    with tempfile.TemporaryDirectory(prefix="lookout-trt-") as tmp:
        source = onnx_path
        if precision == "int8":
            sources = calibration_sources(calib_dir, calibration_limit)
            source = Path(tmp) / "qdq.onnx"
            quantize_int8(
                onnx_path,
                source,
                sources,
                TENSORRT_QUANT,
                progress=progress,
                extra_options=TENSORRT_QUANT_EXTRA,
            )
            build.update(
                quantization="explicit Q/DQ (symmetric int8), strongly typed network",
                quant_options=asdict(TENSORRT_QUANT),
                quant_extra_options=TENSORRT_QUANT_EXTRA,
                calibration_images=len(sources),
                calibration_dir=str(calib_dir.resolve()) if calib_dir else None,
            )

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network, _parser = _parse(trt, builder, source, strongly_typed=precision == "int8", logger=logger)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        build["flags"] = set_precision(trt, config, precision)

        min_batch, opt_batch, max_batch = batch_profile
        chw = (3, model.spec.height, model.spec.width)
        profile = builder.create_optimization_profile()
        profile.set_shape(model.input_name, (min_batch, *chw), (opt_batch, *chw), (max_batch, *chw))
        config.add_optimization_profile(profile)

        _cache, build["timing_cache_use"] = load_timing_cache(config, cache_path)

        log.info("building TensorRT %s engine on %s (this takes a few minutes)", precision, gpu_name)
        started = time.monotonic()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"TensorRT failed to build a {precision} engine from {onnx_path}; see the log")
        build["build_seconds"] = round(time.monotonic() - started, 1)
        partial = out.with_name(out.name + ".partial")
        partial.write_bytes(bytes(serialized))
        save_timing_cache(config, cache_path)

    try:
        sidecar = make_sidecar(
            onnx_path=onnx_path,
            engine_path=partial,
            backend="tensorrt",
            precision=precision,
            batch_profile=batch_profile,
            runtime_version=runtime_version,
            gpu_name=gpu_name,
            build=build,
        )
        write_sidecar(out, sidecar)
        partial.replace(out)  # last: the sidecar already describes these bytes
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    log.info("built %s (%s, sidecar %s)", out, precision, sidecar_path(out).name)
    return sidecar
