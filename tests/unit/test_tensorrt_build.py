"""The TensorRT engine build's own logic without a GPU: precision flags, the timing cache's
fallbacks, the order files appear in, and the Q/DQ model the int8 build hands TensorRT's parser.

TensorRT is a stand-in here (``tests/support/trt_stand_ins.py``): its "plan" is a fixed byte
string. What is checked is lookout's handling of TensorRT's answers, never what TensorRT builds;
that is ``tests/gpu`` and ``python -m bench.gpu_check``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import onnx
import pytest
from onnx import TensorProto, numpy_helper

from engine_build import tensorrt as trt_build
from engine_build.cpu import quantize_int8
from engine_build.imagefolder import path_sources, sample_photo
from stream_worker.backends.sidecar import read_sidecar, sha256_file
from stream_worker.errors import EngineError
from tests.support.trt_stand_ins import StandInConfig, stand_in_tensorrt
from tests.unit.engine_fixtures import build_tiny_onnx

# ------------------------------------------------------------------------ 8. precision flags


def test_fp32_clears_tf32_and_fp16_sets_fp16() -> None:
    trt = stand_in_tensorrt()
    fp32, fp16, int8 = StandInConfig(), StandInConfig(), StandInConfig()
    assert trt_build.set_precision(trt, fp32, "fp32") == {"tf32": False}
    assert (fp32.set_flags, fp32.cleared_flags) == ([], ["TF32"])
    trt_build.set_precision(trt, fp16, "fp16")
    assert (fp16.set_flags, fp16.cleared_flags) == (["FP16"], [])
    trt_build.set_precision(trt, int8, "int8")  # strongly typed: precision from the Q/DQ nodes
    assert (int8.set_flags, int8.cleared_flags) == ([], [])


# ---------------------------------------------------------------------------- 2. timing cache


def test_a_missing_timing_cache_starts_a_new_one(tmp_path: Path) -> None:
    config = StandInConfig()
    cache, how = trt_build.load_timing_cache(config, tmp_path / "none")
    assert how == "new" and cache is config.attached and cache.data == b""


def test_a_matching_timing_cache_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_bytes(b"tactics")
    config = StandInConfig()
    cache, how = trt_build.load_timing_cache(config, path)
    assert how == "reused" and cache.data == b"tactics"
    assert config.calls == ["set_timing_cache ignore_mismatch=False"]


def test_a_cache_from_another_gpu_is_replaced_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c"
    path.write_bytes(b"tactics of another GPU")
    config = StandInConfig(accept=lambda cache: cache.data == b"")  # TensorRT: False on a mismatch
    with caplog.at_level(logging.WARNING):
        cache, how = trt_build.load_timing_cache(config, path)
    assert how == "replaced" and cache.data == b"" and config.attached is cache
    assert "another GPU or TensorRT version" in caplog.text


def test_a_corrupt_cache_that_makes_tensorrt_raise_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_bytes(b"\x00junk")
    cache, how = trt_build.load_timing_cache(StandInConfig(corrupt_raises=True), path)
    assert how == "replaced" and cache.data == b""


def test_when_tensorrt_takes_no_cache_the_build_goes_on_without(tmp_path: Path) -> None:
    config = StandInConfig(accept=False)
    assert trt_build.load_timing_cache(config, tmp_path / "c") == (None, "none")
    assert trt_build.save_timing_cache(config, tmp_path / "c") is False
    assert not (tmp_path / "c").exists()


def test_the_cache_is_written_atomically_only_when_tensorrt_hands_one_back(tmp_path: Path) -> None:
    config = StandInConfig()
    trt_build.load_timing_cache(config, tmp_path / "c")
    assert trt_build.save_timing_cache(config, tmp_path / "c") is True
    assert (tmp_path / "c").read_bytes() == b"cache:"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert trt_build.save_timing_cache(StandInConfig(hand_back=False), tmp_path / "d") is False
    assert not (tmp_path / "d").exists()


class _StandInBuilder:
    """A ``Builder`` stand-in: its "plan" is a fixed byte string, not a TensorRT engine."""

    def __init__(self, config: StandInConfig, plan: bytes | None) -> None:
        self.config = config
        self.plan = plan

    def create_network(self, flags: int) -> object:
        return object()

    def create_builder_config(self) -> StandInConfig:
        return self.config

    def create_optimization_profile(self) -> Any:
        return SimpleNamespace(set_shape=lambda *args: None)

    def build_serialized_network(self, network: object, config: StandInConfig) -> bytes | None:
        return self.plan


def _stand_in_build(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config: StandInConfig, plan: bytes | None, precision: str
) -> tuple[Path, Any]:
    trt = stand_in_tensorrt(
        Builder=lambda logger: _StandInBuilder(config, plan),
        OnnxParser=lambda network, logger: SimpleNamespace(parse_from_file=lambda path: True),
    )
    monkeypatch.setattr(trt_build, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_build, "runtime_version_and_gpu", lambda: ("10.8.0.43", "Stand-in GPU"))
    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "engines" / "e.plan"
    sidecar = trt_build.build_tensorrt_engine(onnx_path, out, precision=precision, batch_profile=(1, 8, 32))
    return out, sidecar


def test_no_timing_cache_from_tensorrt_still_leaves_engine_and_sidecar(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The defect: get_timing_cache() None made None.serialize() raise after the engine was in
    # place and before its sidecar was written.
    config = StandInConfig(accept=lambda cache: cache.data != b"", hand_back=False)
    out, sidecar = _stand_in_build(monkeypatch, tmp_path, config, b"serialized plan bytes", "fp32")
    assert out.read_bytes() == b"serialized plan bytes"
    assert read_sidecar(out) == sidecar
    assert sidecar.engine_sha256 == hashlib.sha256(b"serialized plan bytes").hexdigest() == sha256_file(out)
    assert sidecar.build["timing_cache_use"] == "none"
    assert sidecar.build["flags"] == {"tf32": False}
    assert config.cleared_flags == ["TF32"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["e.plan", "e.plan.json"]


def test_a_failed_build_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="failed to build a fp16 engine"):
        _stand_in_build(monkeypatch, tmp_path, StandInConfig(), None, "fp16")
    assert not any((tmp_path / "engines").iterdir())


def test_the_engine_is_moved_into_place_after_its_sidecar(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[str] = []
    real_write = trt_build.write_sidecar

    def write_sidecar(engine_path: Path, sidecar: Any) -> Path:
        seen.append(f"sidecar written, engine in place: {engine_path.exists()}")
        return real_write(engine_path, sidecar)

    monkeypatch.setattr(trt_build, "write_sidecar", write_sidecar)
    out, _ = _stand_in_build(monkeypatch, tmp_path, StandInConfig(), b"plan", "fp16")
    assert seen == ["sidecar written, engine in place: False"]
    assert out.is_file() and out.with_name("e.plan.timing-cache").read_bytes() == b"cache:"


# ---------------------------------------------------------------- 3. the int8 Q/DQ for TensorRT


def test_the_tensorrt_qdq_model_has_float_biases_and_per_channel_conv_weights(tmp_path: Path) -> None:
    # Nodes named, as the exported model's are: the recipe excludes nodes by name.
    model = onnx.load(str(build_tiny_onnx(tmp_path / "tiny.onnx")))
    for index, node in enumerate(model.graph.node):
        node.name = f"{node.op_type}_{index}"
    onnx_path = tmp_path / "named.onnx"
    onnx.save(model, str(onnx_path))
    out = tmp_path / "qdq.onnx"
    sources = path_sources([sample_photo("chelsea.png"), sample_photo("coffee.png")])
    quantize_int8(
        onnx_path,
        out,
        sources,
        trt_build.TENSORRT_QUANT,
        progress=False,
        extra_options=trt_build.TENSORRT_QUANT_EXTRA,
    )
    graph = onnx.load(str(out)).graph
    init = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    dequantized = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    # TensorRT's parser: DequantizeLinear only on 8-bit inputs, never an INT32 bias.
    assert dequantized
    assert all(init[n.input[0]].data_type == TensorProto.INT8 for n in dequantized if n.input[0] in init)
    (conv,) = (n for n in graph.node if n.op_type == "Conv")
    assert init[conv.input[2]].data_type == TensorProto.FLOAT  # the bias stays float
    weight_dq = producer[conv.input[1]]
    assert weight_dq.op_type == "DequantizeLinear"
    assert {a.name: a.i for a in weight_dq.attribute}.get("axis", 1) == 0  # per output channel
    assert numpy_helper.to_array(init[weight_dq.input[1]]).shape == (16,)  # one scale per channel
    for q in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        zero_point = init[q.input[2]]
        assert zero_point.data_type == TensorProto.INT8  # signed activations ...
        assert not numpy_helper.to_array(zero_point).any()  # ... with zero-point 0 (symmetric)
