"""Shared helpers for engine tests: a tiny real ONNX classifier, the committed model's path, and
the committed model with its classes reordered or left out."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stream_worker.preprocess import PreprocessSpec
from stream_worker.taxonomy import load_class_names

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMITTED_ONNX = REPO_ROOT / "models" / "efficientnet_lite0.onnx"
NUM_CLASSES = 1000


def build_tiny_onnx(path: Path, *, seed: int = 0, version: str = "test-1") -> Path:
    """Write a small but genuine conv classifier with the exported model's interface.

    Input ``images`` (N x 3 x 224 x 224), output ``probabilities`` (N x 1000, softmax in the
    graph), and the same ``metadata_props`` the real export writes. Weights are seeded so
    two builds with one seed are the same model and different seeds are different models.
    """
    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.2, (16, 3, 7, 7)).astype(np.float32)
    conv_b = rng.normal(0, 0.1, 16).astype(np.float32)
    fc_w = rng.normal(0, 0.5, (16, NUM_CLASSES)).astype(np.float32)
    fc_b = rng.normal(0, 0.1, NUM_CLASSES).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["images", "conv_w", "conv_b"], ["c1"], strides=[4, 4], pads=[3, 3, 3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["g1"]),
        helper.make_node("Flatten", ["g1"], ["f1"], axis=1),
        helper.make_node("Gemm", ["f1", "fc_w", "fc_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializer=[
            numpy_helper.from_array(conv_w, "conv_w"),
            numpy_helper.from_array(conv_b, "conv_b"),
            numpy_helper.from_array(fc_w, "fc_w"),
            numpy_helper.from_array(fc_b, "fc_b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = PreprocessSpec().to_metadata() | {
        "class_names": json.dumps(list(load_class_names())),
        "model_name": "tiny",
        "model_version": version,
    }
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def with_classes(
    source: Path, out: Path, order: Sequence[int], *, taxonomy: Mapping[str, Any] | None = None
) -> Path:
    """Write ``source`` with its output classes taken in ``order``: output ``j`` is class ``order[j]``.

    The classifier head's rows are re-indexed (``order`` may be a permutation or leave classes
    out), the softmax then runs over the classes kept, and the ``class_names`` metadata follows,
    so this is the model a training run with that class list would give. ``taxonomy`` embeds a
    taxonomy document as a model with its own label set carries it.
    """
    model = onnx.load(str(source))
    (softmax,) = (n for n in model.graph.node if n.op_type == "Softmax")
    (head,) = (n for n in model.graph.node if softmax.input[0] in n.output)
    if head.op_type != "Gemm" or not any(a.name == "transB" and a.i == 1 for a in head.attribute):
        raise ValueError(f"{source}: expected a Gemm head with transB=1 before the softmax")
    rows = np.asarray(order, dtype=np.int64)
    initializers = {init.name: init for init in model.graph.initializer}
    for name in head.input[1:3]:  # weight (classes x features) and bias (classes)
        array = numpy_helper.to_array(initializers[name])[rows]
        initializers[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = len(rows)
    meta = {p.key: p.value for p in model.metadata_props}
    names = json.loads(meta["class_names"])
    meta |= {"class_names": json.dumps([names[i] for i in rows]), "num_classes": str(len(rows))}
    if taxonomy is not None:
        meta["taxonomy"] = json.dumps(dict(taxonomy))
    del model.metadata_props[:]
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out
