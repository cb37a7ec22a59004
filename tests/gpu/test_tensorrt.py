"""TensorRT engines on a real NVIDIA GPU, checked against the ONNX Runtime fp32 engine.

Skipped, saying why, wherever TensorRT, pycuda or a GPU is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine_build.cpu import build_cpu_engine
from engine_build.evaluate import compare
from engine_build.imagefolder import bundled_street_and_photo_sources
from stream_worker.backends.registry import open_backend
from stream_worker.backends.tensorrt import import_tensorrt
from stream_worker.errors import EngineError
from stream_worker.taxonomy import Taxonomy
from tests.unit.engine_fixtures import COMMITTED_ONNX

pytestmark = pytest.mark.gpu


def _gpu_available() -> bool:
    try:
        import_tensorrt()
    except EngineError:
        return False
    return True


needs_gpu = pytest.mark.skipif(not _gpu_available(), reason="needs an NVIDIA GPU and TensorRT")


@pytest.fixture(scope="module")
def ort_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "ort-fp32.onnx"
    build_cpu_engine(COMMITTED_ONNX, out, precision="fp32")
    return out


@needs_gpu
@pytest.mark.parametrize(("precision", "min_agreement"), [("fp32", 0.99), ("fp16", 0.97)])
def test_tensorrt_engine_matches_onnxruntime(
    ort_fp32: Path, tmp_path: Path, precision: str, min_agreement: float
) -> None:
    from engine_build.tensorrt import build_tensorrt_engine

    plan = tmp_path / f"trt-{precision}.plan"
    sidecar = build_tensorrt_engine(COMMITTED_ONNX, plan, precision=precision, batch_profile=(1, 8, 32))
    assert sidecar.gpu_name
    assert (tmp_path / f"trt-{precision}.plan.timing-cache").is_file()

    sources = bundled_street_and_photo_sources(64)
    a, b = open_backend(ort_fp32), open_backend(plan)
    try:
        result = compare(a, b, sources, Taxonomy.load(class_names=a.info.class_names))
        for size in (1, 5, 32):  # every batch size in the profile runs
            out = b.infer(np.zeros((size, *b.info.input_shape), np.float32))
            assert out.shape == (size, 1000)
    finally:
        b.close()
        a.close()
    assert result.top1_agreement >= min_agreement
    assert result.max_abs_diff < 0.05
