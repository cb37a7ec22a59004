"""CPU engines for ONNX Runtime: the graph-optimised fp32 model and static QDQ int8.

fp32: ONNX Runtime optimises the graph once at ``ORT_ENABLE_EXTENDED`` and saves it. The
layout level (NCHWc blocking) depends on the exact CPU's vector width, so it is left to
session creation on the serving machine, where ``ORT_ENABLE_ALL`` re-applies it.

int8: ``quant_pre_process`` (shape inference and fusions that quantisation relies on), then
``quantize_static`` in QDQ format with per-channel weights, calibrated on real images run
through the serving preprocessing.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tqdm import tqdm

from engine_build.imagefolder import (
    ImageSource,
    bundled_street_and_photo_sources,
    folder_sources,
    iter_batches,
)
from engine_build.metadata import check_batch_profile, make_sidecar, read_onnx_model_info, write_sidecar
from stream_worker.backends.sidecar import PRECISIONS, Sidecar
from stream_worker.errors import ConfigError, EngineError
from stream_worker.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

DEFAULT_BATCH_PROFILE = (1, 8, 32)
DEFAULT_CALIBRATION_LIMIT = 256
CALIBRATION_BATCH = 8


@dataclass(frozen=True, slots=True)
class QuantOptions:
    """How ``quantize_static`` is asked to quantise.

    ``reduce_range`` (7-bit weights) is on by default: on AVX2 CPUs without VNNI, ONNX
    Runtime's u8 x s8 kernels add pairs of products in saturating 16-bit lanes, and with
    full-range weights that saturation measured 52% top-1 agreement with fp32 against 68%
    with it (bench/engines.py; unsigned weights reached 86% but ran 4.5x slower than fp32).
    ``symmetric_int8_activations`` produces the signed, zero-point-free activations
    TensorRT's explicit quantisation requires.
    """

    quant_format: str = "qdq"
    per_channel: bool = True
    reduce_range: bool = True
    symmetric_int8_activations: bool = False
    unsigned_weights: bool = False
    keep_head_fp32: bool = True
    keep_first_conv_fp32: bool = False
    keep_depthwise_fp32: bool = False
    calibrate_method: str = "minmax"


def repo_devset_dir() -> Path:
    """The development set built by ``scripts/devset`` in a source checkout."""
    return Path(__file__).resolve().parent.parent / "data" / "devset"


def calibration_sources(calib_dir: Path | None, limit: int = DEFAULT_CALIBRATION_LIMIT) -> list[ImageSource]:
    """Images to calibrate on: ``calib_dir``, else the dev set, else bundled street frames and photos.

    Images are spread evenly over the folder when there are more than ``limit``, so every
    label of a labelled folder is represented.
    """
    if calib_dir is not None:
        sources = folder_sources(calib_dir)
    elif repo_devset_dir().is_dir():
        sources = folder_sources(repo_devset_dir())
    else:
        sources = bundled_street_and_photo_sources(limit)
    if not sources:
        raise ConfigError("int8 needs calibration images: pass --calib DIR (a folder of JPEG/PNG photos)")
    if len(sources) > limit:
        picks = np.linspace(0, len(sources) - 1, limit).round().astype(int)
        sources = [sources[i] for i in picks]
    return sources


class PreprocessedCalibrationReader:
    """Feeds calibration batches to ONNX Runtime's quantiser, with a progress bar.

    Implements ``onnxruntime.quantization.CalibrationDataReader``'s ``get_next`` protocol.
    """

    def __init__(
        self,
        sources: Sequence[ImageSource],
        spec: PreprocessSpec,
        input_name: str,
        *,
        progress: bool = True,
    ) -> None:
        """Prepare to stream ``sources`` through the serving preprocessing."""
        self._sources = list(sources)
        self._spec = spec
        self._input_name = input_name
        self._progress = progress
        self.rewind()

    def rewind(self) -> None:
        """Start again from the first image (the quantiser may read the data twice)."""
        self._batches = iter_batches(self._sources, self._spec, CALIBRATION_BATCH)
        self._bar = tqdm(
            total=len(self._sources), unit="img", desc="calibrating", disable=not self._progress, leave=False
        )

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        """The next batch as an input feed, or ``None`` when the images are used up."""
        try:
            names, batch = next(self._batches)
        except StopIteration:
            self._bar.close()
            return None
        self._bar.update(len(names))
        return {self._input_name: batch.copy()}


def _optimise_fp32(onnx_path: Path, out: Path) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    try:
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's load errors are untyped
        raise EngineError(f"ONNX Runtime could not optimise {onnx_path}: {exc}") from exc


def nodes_kept_fp32(onnx_path: Path, options: QuantOptions) -> list[str]:
    """Names of the nodes that stay in float.

    Softmax always does: its output is the probabilities, and 8-bit steps of 1/255 would
    flatten every small probability to the same value and make the top classes tie. The
    classifier head (the last Gemm/MatMul) stays fp32 by default: it is under 1% of the
    compute, and int8 logits cost top-1 agreement for no measurable speed. Depthwise
    convolutions (one filter per channel, ``group == channels``) may stay fp32 too: they carry
    most of the quantisation error in this network (``bench/int8_variants.py``) and little of
    its arithmetic.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    kept = [n.name for n in model.graph.node if n.op_type == "Softmax"]
    linear = [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    if options.keep_head_fp32 and linear:
        kept.append(linear[-1])
    if options.keep_first_conv_fp32 and convs:
        kept.append(convs[0])
    if options.keep_depthwise_fp32:
        kept.extend(n.name for n in model.graph.node if n.op_type == "Conv" and _is_depthwise(n))
    return kept


def _is_depthwise(node: Any) -> bool:
    """A Conv whose ``group`` is above 1 (in this family: one group per channel)."""
    return any(a.name == "group" and a.i > 1 for a in node.attribute)


def quantize_int8(
    onnx_path: Path,
    out: Path,
    sources: Sequence[ImageSource],
    options: QuantOptions,
    *,
    progress: bool = True,
    extra_options: Mapping[str, object] | None = None,
) -> None:
    """Write a statically quantised int8 copy of ``onnx_path`` to ``out``.

    ``extra_options`` are ONNX Runtime quantiser options laid over this recipe's own (the
    TensorRT build passes those its ONNX parser needs); ``None`` keeps the recipe as it is.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = read_onnx_model_info(onnx_path)
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if options.calibrate_method not in methods:
        raise ConfigError(f"unknown calibration method {options.calibrate_method!r}: {', '.join(methods)}")
    with tempfile.TemporaryDirectory(prefix="lookout-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        excluded = nodes_kept_fp32(prepared, options)
        reader = PreprocessedCalibrationReader(sources, model.spec, model.input_name, progress=progress)
        symmetric = options.symmetric_int8_activations
        extra: dict[str, object] = {"ActivationSymmetric": symmetric, "WeightSymmetric": True}
        if options.calibrate_method == "minmax":
            # Fold the running min/max every few batches instead of holding every intermediate
            # tensor of the whole calibration set in memory. (The histogram methods fail to
            # merge flushed chunks in ONNX Runtime 1.32, so they keep everything.)
            extra["CalibMaxIntermediateOutputs"] = 4
        extra.update(extra_options or {})
        quantize_static(
            str(prepared),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ if options.quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=options.per_channel,
            reduce_range=options.reduce_range,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QUInt8 if options.unsigned_weights else QuantType.QInt8,
            calibrate_method=methods[options.calibrate_method],
            nodes_to_exclude=excluded,
            extra_options=extra,
        )


def build_cpu_engine(
    onnx_path: Path,
    out: Path,
    *,
    precision: str,
    calib_dir: Path | None = None,
    batch_profile: tuple[int, int, int] = DEFAULT_BATCH_PROFILE,
    quant: QuantOptions | None = None,
    calibration_limit: int = DEFAULT_CALIBRATION_LIMIT,
    progress: bool = True,
) -> Sidecar:
    """Build an ONNX Runtime engine at ``out`` with its sidecar; returns the sidecar.

    The engine is written beside ``out`` and renamed into place, so a reader never sees a
    half-written file.
    """
    if precision not in PRECISIONS["onnxruntime"]:
        raise ConfigError(f"ONNX Runtime engines are fp32 or int8, not {precision!r}")
    check_batch_profile(*batch_profile)
    read_onnx_model_info(onnx_path)  # fail early, before a long calibration, on a bad model
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    build: dict[str, object] = {}
    if precision == "fp32":
        _optimise_fp32(onnx_path, partial)
        build["graph_optimization"] = "ORT_ENABLE_EXTENDED"
    else:
        options = quant or QuantOptions()
        sources = calibration_sources(calib_dir, calibration_limit)
        quantize_int8(onnx_path, partial, sources, options, progress=progress)
        build.update(
            quantization=asdict(options),
            calibration_images=len(sources),
            calibration_dir=str(calib_dir.resolve()) if calib_dir else None,
        )
    partial.replace(out)
    sidecar = make_sidecar(
        onnx_path=onnx_path,
        engine_path=out,
        backend="onnxruntime",
        precision=precision,
        batch_profile=batch_profile,
        runtime_version=str(ort.__version__),
        build=build,
    )
    write_sidecar(out, sidecar)
    log.info("built %s (%s %s)", out, sidecar.backend, precision)
    return sidecar
