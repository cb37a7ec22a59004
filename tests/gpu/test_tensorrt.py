"""TensorRT engines on a real NVIDIA GPU, checked against the ONNX Runtime fp32 engine.

Skipped, saying why, wherever TensorRT 10, the CUDA bindings or a GPU is missing. The CPU-side
halves of these checks (with stand-ins for TensorRT) are tests/unit/test_tensorrt_cpu.py and
tests/unit/test_cuda_memory.py; ``python -m bench.gpu_check`` runs the same ground in one go.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from engine_build.cpu import build_cpu_engine
from engine_build.evaluate import compare
from engine_build.imagefolder import bundled_street_and_photo_sources
from engine_build.metadata import write_sidecar
from stream_worker.backends.cuda_memory import current, device_free_bytes, device_info, open_device
from stream_worker.backends.registry import open_backend
from stream_worker.backends.sidecar import read_sidecar
from stream_worker.backends.tensorrt import import_tensorrt
from stream_worker.errors import EngineError
from stream_worker.taxonomy import Taxonomy
from tests.unit.engine_fixtures import COMMITTED_ONNX

pytestmark = pytest.mark.gpu


def _why_not() -> str | None:
    try:
        import_tensorrt()
        device_info(0)
    except EngineError as exc:
        return str(exc)
    return None


def _why_no_cuda() -> str | None:
    try:
        device_info(0)
    except EngineError as exc:
        return str(exc)
    return None


WHY_NOT, WHY_NO_CUDA = _why_not(), _why_no_cuda()
needs_gpu = pytest.mark.skipif(WHY_NOT is not None, reason=f"needs an NVIDIA GPU and TensorRT 10: {WHY_NOT}")
needs_cuda = pytest.mark.skipif(WHY_NO_CUDA is not None, reason=f"needs an NVIDIA GPU: {WHY_NO_CUDA}")
PROFILE = (1, 8, 32)


@pytest.fixture(scope="module")
def ort_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "ort-fp32.onnx"
    build_cpu_engine(COMMITTED_ONNX, out, precision="fp32")
    return out


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp16 then fp32, built once for the module, sharing one timing cache."""
    from engine_build.tensorrt import build_tensorrt_engine

    folder = tmp_path_factory.mktemp("plans")
    cache = folder / "shared.timing-cache"
    built = {}
    for precision in ("fp16", "fp32"):
        plan = folder / f"trt-{precision}.plan"
        build_tensorrt_engine(
            COMMITTED_ONNX, plan, precision=precision, batch_profile=PROFILE, timing_cache=cache
        )
        built[precision] = plan
    return built


@needs_gpu
def test_the_second_build_reuses_the_timing_cache_and_fp32_is_not_tf32(plans: dict[str, Path]) -> None:
    fp16, fp32 = read_sidecar(plans["fp16"]), read_sidecar(plans["fp32"])
    assert fp16.gpu_name == device_info(0).name
    assert fp16.build["timing_cache_use"] == "new"
    assert fp32.build["timing_cache_use"] == "reused"
    assert fp32.build["flags"] == {"tf32": False}


@needs_gpu
@pytest.mark.parametrize(("precision", "min_agreement"), [("fp32", 0.99), ("fp16", 0.97)])
def test_tensorrt_engine_matches_onnxruntime(
    ort_fp32: Path, plans: dict[str, Path], precision: str, min_agreement: float
) -> None:
    sources = bundled_street_and_photo_sources(64)
    a, b = open_backend(ort_fp32), open_backend(plans[precision])
    try:
        result = compare(a, b, sources, Taxonomy.load(class_names=a.info.class_names))
        rng = np.random.default_rng(0)
        images = rng.standard_normal((32, *b.info.input_shape)).astype(np.float32)
        for size in (1, 5, 8, 32):  # every batch size in the profile runs
            out = b.infer(images[:size])
            assert out.shape == (size, 1000) and out.dtype == np.float32
            np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-2)
        np.testing.assert_allclose(b.infer(images[:1])[0], b.infer(images[:5])[0], atol=5e-3)
    finally:
        b.close()
        a.close()
    assert result.top1_agreement >= min_agreement
    assert result.max_abs_diff < 0.05


@needs_gpu
def test_open_close_gives_the_device_memory_back_and_close_is_final(plans: dict[str, Path]) -> None:
    free = []
    for _ in range(3):
        backend = open_backend(plans["fp16"])
        backend.infer(np.zeros((32, *backend.info.input_shape), np.float32))
        backend.close()
        free.append(device_free_bytes())
    assert abs(free[1] - free[2]) <= 8 << 20  # the first cycle may load kernels for good
    with pytest.raises(EngineError, match="closed"):
        backend.infer(np.zeros((1, *backend.info.input_shape), np.float32))


@needs_gpu
def test_a_sidecar_that_does_not_match_its_engine_is_refused(plans: dict[str, Path], tmp_path: Path) -> None:
    plan = tmp_path / "mismatch.plan"
    shutil.copyfile(plans["fp16"], plan)
    sidecar = read_sidecar(plans["fp16"])
    write_sidecar(plan, dataclasses.replace(sidecar, class_names=sidecar.class_names[:999]))
    with pytest.raises(EngineError, match="the sidecar lists 999 classes"):
        open_backend(plan)
    backend = open_backend(plans["fp16"])  # the failed open gave its context back
    backend.close()


@needs_gpu
def test_a_profile_starting_above_one_still_serves_single_images(tmp_path: Path) -> None:
    from engine_build.tensorrt import build_tensorrt_engine

    plan = tmp_path / "min4.plan"
    build_tensorrt_engine(COMMITTED_ONNX, plan, precision="fp32", batch_profile=(4, 8, 16))
    backend = open_backend(plan)
    try:
        images = np.random.default_rng(1).standard_normal((4, *backend.info.input_shape)).astype(np.float32)
        one = backend.infer(images[:1])
        four = backend.infer(images)
    finally:
        backend.close()
    assert one.shape == (1, 1000)
    np.testing.assert_allclose(one[0], four[0], atol=1e-4)


@needs_cuda
def test_cuda_memory_round_trip_on_another_thread() -> None:
    context = open_device(0)
    outcome: list[bool] = []

    def work() -> None:
        with current(context):
            host, back = context.pinned((8, 1000)), context.pinned((8, 1000))
            device, stream = context.allocate(host.array.nbytes), context.stream()
            host.array[...] = np.arange(8000, dtype=np.float32).reshape(8, 1000)
            stream.upload(device, host.array)
            stream.download(back.array, device)
            stream.synchronize()
            outcome.append(bool(np.array_equal(host.array, back.array)))
            stream.destroy()
            device.free()
            host.free()
            back.free()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    context.release()
    assert outcome == [True]
