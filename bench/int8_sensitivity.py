"""Which int8 convolutions cost the most: each one put back in fp32 alone, scored on calibration images.

The default INT8 recipe (``engine_build.cpu.QuantOptions()``) is built once. Then, for every
convolution it quantised, a copy of that engine is made with only that convolution back in
float: its input read before the QuantizeLinear/DequantizeLinear pair, its weight and bias the
float model's. Its output stays quantised where the next layer quantises it, as it would with
``nodes_to_exclude``. Each copy runs on the **calibration images** (never the held-out frames
the agreement is measured on, so that choosing layers here cannot fit those frames), and is
scored by how much of the default engine's output error it takes away:

- ``kl``: the mean KL divergence of its class probabilities from fp32's (the default's, for
  reference, in ``default_kl``); the ranking is by this, smallest first;
- ``top1_flips``: calibration images whose top-1 class differs from fp32's.

On the shipped EfficientNet-Lite0 (2026-12-03, ``bench/results/2026-12-03-int8-sensitivity-*.json``)
the first depthwise convolution (``_blocks.0``, right after the fp32 first convolution) stands
out on both calibration sets: alone in fp32 it takes 53 % (80 frames) and 60 % (56 street images)
of the output KL away; the next, ``_blocks.1``'s expand convolution, 20 % and 26 %; most others
move it by less than the spread between them (a few make it worse).

    .venv/bin/python -m bench.int8_sensitivity [--calibration frames|street] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from bench.int8_variants import RESULTS, calibration_sets, ort_runner
from engine_build.agreement import preprocessed, probabilities
from engine_build.cpu import QuantOptions, name_unnamed_nodes, quantize_int8
from engine_build.default import default_onnx_path
from stream_worker.preprocess import PreprocessSpec

Images = np.ndarray[Any, np.dtype[np.float32]]


def one_thread_session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    """A one-thread CPU session (the machine is shared) at the worker's optimisation level."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def mean_kl(reference: Images, got: Images) -> float:
    """Mean over images of KL(reference || got), with probabilities floored at 1e-12."""
    p, q = np.clip(reference, 1e-12, 1), np.clip(got, 1e-12, 1)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def int8_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The Conv nodes of a QDQ model whose weight comes from a DequantizeLinear."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return [
        n
        for n in model.graph.node
        if n.op_type == "Conv" and getattr(producer.get(n.input[1]), "op_type", "") == "DequantizeLinear"
    ]


def with_conv_in_float(qdq: onnx.ModelProto, float_model: onnx.ModelProto, conv_name: str) -> onnx.ModelProto:
    """A copy of ``qdq`` whose Conv ``conv_name`` reads float input, weight and bias."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    producer = {o: n for n in model.graph.node for o in n.output}
    float_conv = next(n for n in float_model.graph.node if n.name == conv_name)
    float_inits = {i.name: i for i in float_model.graph.initializer}
    conv = next(n for n in model.graph.node if n.name == conv_name)
    dq = producer[conv.input[0]]
    if dq.op_type == "DequantizeLinear":
        before_q = producer[dq.input[0]].input[0]  # the float tensor before QuantizeLinear
        conv.input[0] = before_q
        float_producer = {o: n for n in float_model.graph.node for o in n.output}
        clip = float_producer.get(float_conv.input[0])
        if clip is not None and clip.op_type == "Clip" and producer[before_q].op_type != "Clip":
            # The quantiser drops a Clip (ReLU6) whose range the activation's quantisation range
            # already clips to: put the float model's Clip back in front of the float conv.
            restored = onnx.NodeProto()
            restored.CopyFrom(clip)
            restored.name = f"{conv_name}_float_clip"
            restored.input[0] = before_q
            restored.output[0] = f"{conv_name}_float_input"
            present = {i.name for i in model.graph.initializer}
            model.graph.initializer.extend(
                float_inits[b] for b in restored.input[1:] if b and b not in present
            )
            model.graph.node.append(restored)
            conv.input[0] = restored.output[0]
    for slot in (1, 2):
        if slot < len(float_conv.input) and float_conv.input[slot]:
            tensor = float_inits[float_conv.input[slot]]
            name = f"{conv_name}_float_{slot}"
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(tensor), name))
            conv.input[slot] = name
    return model


def main() -> None:
    """Rank the int8 convolutions and write the ranking to bench/results."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.int8_sensitivity", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--calibration", default="frames", choices=("frames", "street"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_path = default_onnx_path()
    fp32 = one_thread_session(onnx_path)
    spec = PreprocessSpec.from_metadata(fp32.get_modelmeta().custom_metadata_map)
    sources = calibration_sets()[args.calibration]
    images = preprocessed(sources, spec)
    reference = probabilities(ort_runner(fp32), images)
    options = QuantOptions()
    with tempfile.TemporaryDirectory(prefix="lookout-sens-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        name_unnamed_nodes(prepared)
        int8_path = Path(tmp) / "int8.onnx"
        quantize_int8(onnx_path, int8_path, sources, options, progress=False)
        float_model = onnx.load(str(prepared))
        qdq = onnx.load(str(int8_path))
    default = probabilities(ort_runner(one_thread_session(qdq)), images)
    default_kl = mean_kl(reference, default)
    top1 = reference.argmax(axis=1)
    rows = []
    convs = int8_convs(qdq)
    for index, conv in enumerate(convs):
        got = probabilities(
            ort_runner(one_thread_session(with_conv_in_float(qdq, float_model, conv.name))), images
        )
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        rows.append(
            {
                "node": conv.name,
                "position": index,
                "depthwise": group > 1,
                "kl": round(mean_kl(reference, got), 6),
                "kl_share_removed": round(1 - mean_kl(reference, got) / default_kl, 4),
                "top1_flips": int((got.argmax(axis=1) != top1).sum()),
            }
        )
        print(
            f"{index:2d} {conv.name:<45} kl {rows[-1]['kl']:.5f} flips {rows[-1]['top1_flips']}", flush=True
        )
    rows.sort(key=lambda r: r["kl"])
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python -m bench.int8_sensitivity --calibration {args.calibration}",
        "onnxruntime": ort.__version__,
        "calibration": args.calibration,
        "images": len(images),
        "default_kl": round(default_kl, 6),
        "default_top1_flips": int((default.argmax(axis=1) != top1).sum()),
        "ranking": rows,
    }
    out = args.out or RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-int8-sensitivity-{args.calibration}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"default kl {default_kl:.5f}; results: {out}")


if __name__ == "__main__":
    main()
