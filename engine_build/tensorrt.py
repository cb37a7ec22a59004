"""TensorRT 10 engines: ONNX parser, one optimisation profile, a timing cache, fp32/fp16/int8.

INT8 uses explicit quantisation, the TensorRT 10 way: the ONNX model is first quantised
to QDQ with symmetric int8 activations (``engine_build.cpu.quantize_int8``, calibrated on
real images through the serving preprocessing), then parsed into a *strongly typed*
network so TensorRT takes every precision from the Q/DQ nodes. The implicit-quantisation
calibrators (``IInt8EntropyCalibrator2``) are deprecated since TensorRT 10.1 and not used.

``tensorrt`` (and ``pycuda`` for the GPU name) are imported lazily; without them every entry
point raises a one-line ``EngineError`` saying what to install.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from engine_build.cpu import DEFAULT_CALIBRATION_LIMIT, QuantOptions, calibration_sources, quantize_int8
from engine_build.metadata import check_batch_profile, make_sidecar, read_onnx_model_info, write_sidecar
from stream_worker.backends.sidecar import PRECISIONS, Sidecar
from stream_worker.backends.tensorrt import import_tensorrt, runtime_version_and_gpu
from stream_worker.errors import ConfigError, EngineError

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_BYTES = 2 << 30


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
    trt, _cuda = import_tensorrt()
    runtime_version, gpu_name = runtime_version_and_gpu()
    model = read_onnx_model_info(onnx_path)
    cache_path = timing_cache or default_timing_cache(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    build: dict[str, Any] = {"workspace_bytes": workspace_bytes, "timing_cache": str(cache_path)}

    with tempfile.TemporaryDirectory(prefix="lookout-trt-") as tmp:
        source = onnx_path
        if precision == "int8":
            # The CPU recipe's bias correction and fp32 first convolution are measured on ONNX
            # Runtime only; TensorRT builds keep the recipe they were measured with.
            options = QuantOptions(
                symmetric_int8_activations=True,
                per_channel=True,
                reduce_range=False,
                bias_correction=False,
                keep_first_conv_fp32=False,
            )
            sources = calibration_sources(calib_dir, calibration_limit)
            source = Path(tmp) / "qdq.onnx"
            quantize_int8(onnx_path, source, sources, options, progress=progress)
            build.update(
                quantization="explicit QDQ (symmetric int8), strongly typed network",
                calibration_images=len(sources),
                calibration_dir=str(calib_dir.resolve()) if calib_dir else None,
            )

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network, _parser = _parse(trt, builder, source, strongly_typed=precision == "int8", logger=logger)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)

        min_batch, opt_batch, max_batch = batch_profile
        chw = (3, model.spec.height, model.spec.width)
        profile = builder.create_optimization_profile()
        profile.set_shape(model.input_name, (min_batch, *chw), (opt_batch, *chw), (max_batch, *chw))
        config.add_optimization_profile(profile)

        cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        # A cache from another GPU or TensorRT version is ignored rather than trusted.
        config.set_timing_cache(cache, ignore_mismatch=False)

        log.info("building TensorRT %s engine on %s (this takes a few minutes)", precision, gpu_name)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"TensorRT failed to build a {precision} engine from {onnx_path}; see the log")
        partial = out.with_name(out.name + ".partial")
        partial.write_bytes(bytes(serialized))
        partial.replace(out)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))

    sidecar = make_sidecar(
        onnx_path=onnx_path,
        engine_path=out,
        backend="tensorrt",
        precision=precision,
        batch_profile=batch_profile,
        runtime_version=runtime_version,
        gpu_name=gpu_name,
        build=build,
    )
    write_sidecar(out, sidecar)
    return sidecar
