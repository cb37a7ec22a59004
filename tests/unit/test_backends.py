"""Backends: batch handling, numerical fidelity to the source ONNX, the default engine, TensorRT gating."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from engine_build.cpu import build_cpu_engine
from engine_build.default import default_engine_path, ensure_default_engine, ensure_default_int8_engine
from engine_build.imagefolder import path_sources, sample_photo
from engine_build.metadata import write_sidecar
from stream_worker.backends import registry
from stream_worker.backends.registry import default_engine_provider, open_backend
from stream_worker.backends.sidecar import read_sidecar, sidecar_path
from stream_worker.errors import EngineError
from stream_worker.taxonomy import Taxonomy
from tests.unit.engine_fixtures import COMMITTED_ONNX, build_tiny_onnx

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture()
def tiny_engine(tmp_path: Path) -> tuple[Path, Path]:
    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx")
    engine = tmp_path / "tiny-fp32.onnx"
    build_cpu_engine(onnx_path, engine, precision="fp32", batch_profile=(1, 4, 8))
    return onnx_path, engine


def _batch(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(size, 3, 224, 224)).astype(np.float32)


def test_infer_accepts_every_batch_size_up_to_the_profile(tiny_engine: tuple[Path, Path]) -> None:
    _, engine = tiny_engine
    backend = open_backend(engine, threads=1)
    assert backend.info.max_batch == 8
    for size in (1, 3, 8):
        probs = backend.infer(_batch(size))
        assert probs.shape == (size, 1000)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_results_are_not_overwritten_by_the_next_call(tiny_engine: tuple[Path, Path]) -> None:
    backend = open_backend(tiny_engine[1], threads=1)
    first = backend.infer(_batch(2, seed=1))
    kept = first.copy()
    backend.infer(_batch(2, seed=2))
    np.testing.assert_array_equal(first, kept)


def test_optimised_engine_reproduces_the_source_model(tiny_engine: tuple[Path, Path]) -> None:
    onnx_path, engine = tiny_engine
    batch = _batch(4, seed=3)
    expected = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"images": batch}
    )[0]
    np.testing.assert_allclose(open_backend(engine).infer(batch), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (np.zeros((9, 3, 224, 224), np.float32), "outside the engine's profile 1..8"),
        (np.zeros((2, 3, 200, 224), np.float32), "must have shape"),
        (np.zeros((2, 3, 224, 224), np.float64), "float32"),
    ],
)
def test_infer_rejects_batches_the_engine_cannot_take(
    tiny_engine: tuple[Path, Path], batch: np.ndarray, message: str
) -> None:
    with pytest.raises(EngineError, match=message):
        open_backend(tiny_engine[1]).infer(batch)


def test_closed_backend_refuses_work(tiny_engine: tuple[Path, Path]) -> None:
    backend = open_backend(tiny_engine[1])
    backend.close()
    with pytest.raises(EngineError, match="closed"):
        backend.infer(_batch(1))


def test_default_engine_is_built_once_and_rebuilt_when_its_model_changes(tmp_path: Path) -> None:
    onnx_path = build_tiny_onnx(tmp_path / "model.onnx", seed=1)
    cache = tmp_path / "cache"
    engine = ensure_default_engine(cache, onnx_path=onnx_path)
    assert engine == default_engine_path(cache)
    built_at = read_sidecar(engine).created_at
    first_mtime = os.stat(engine).st_mtime_ns

    assert ensure_default_engine(cache, onnx_path=onnx_path) == engine
    assert os.stat(engine).st_mtime_ns == first_mtime  # reused, not rebuilt

    build_tiny_onnx(onnx_path, seed=2)  # a new model version lands in place
    ensure_default_engine(cache, onnx_path=onnx_path)
    sidecar = read_sidecar(engine)
    assert sidecar.onnx_sha256 != "" and (sidecar.created_at, os.stat(engine).st_mtime_ns) != (
        built_at,
        first_mtime,
    )
    open_backend(engine)  # and the rebuilt engine passes the compatibility check


def test_default_engine_is_rebuilt_when_only_the_models_preprocessing_changes(tmp_path: Path) -> None:
    from engine_build.export import set_preprocessing

    onnx_path = build_tiny_onnx(tmp_path / "model.onnx", seed=1)
    cache = tmp_path / "cache"
    engine = ensure_default_engine(cache, onnx_path=onnx_path)
    assert read_sidecar(engine).spec.describe() == "crop:0.875"
    set_preprocessing(onnx_path, onnx_path, "crop:1")  # weights unchanged, metadata changed in place
    ensure_default_engine(cache, onnx_path=onnx_path)
    assert read_sidecar(engine).spec.describe() == "crop:1"
    assert open_backend(engine).info.spec.describe() == "crop:1"


def test_the_default_engine_comes_from_engine_build_through_its_entry_point() -> None:
    assert default_engine_provider() is ensure_default_engine
    # pyproject.toml registers it: after changing entry points, reinstall (scripts/setup).
    assert default_engine_provider("int8") is ensure_default_int8_engine


def test_without_a_default_engine_provider_the_error_says_to_pass_an_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "entry_points", lambda **_: ())
    with pytest.raises(EngineError) as excinfo:
        open_backend(None, cache_dir=tmp_path)
    message = str(excinfo.value)
    assert "pass --engine PATH, an engine built with `engine-build build" in message
    assert "\n" not in message
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not COMMITTED_ONNX.is_file(), reason=f"{COMMITTED_ONNX} not exported yet")
def test_open_backend_without_engine_uses_the_committed_model(tmp_path: Path) -> None:
    backend = open_backend(None, cache_dir=tmp_path)
    assert backend.info.path == default_engine_path(tmp_path)
    assert (backend.info.backend, backend.info.precision) == ("onnxruntime", "fp32")
    (source,) = path_sources([sample_photo("chelsea.png")])
    batch = np.empty((1, *backend.info.input_shape), np.float32)
    from stream_worker.preprocess import preprocess_into

    preprocess_into(source.load(), batch[0], backend.info.spec)
    taxonomy = Taxonomy.for_engine(backend.info)
    leaf = taxonomy.leaves[int(taxonomy.scores(backend.infer(batch))[0, : len(taxonomy.leaves)].argmax())]
    assert leaf == "cat"


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here; the no-GPU message is not reachable")
def test_tensorrt_engine_without_the_gpu_extra_fails_in_one_line(tiny_engine: tuple[Path, Path]) -> None:
    _, engine = tiny_engine
    sidecar = read_sidecar(engine)
    trt_engine = engine.with_name("tiny.plan")
    trt_engine.write_bytes(engine.read_bytes())
    fields = {name: getattr(sidecar, name) for name in sidecar.__dataclass_fields__}
    write_sidecar(trt_engine, type(sidecar)(**{**fields, "backend": "tensorrt", "runtime_version": "10.9.0"}))
    assert sidecar_path(trt_engine).is_file()
    with pytest.raises(EngineError) as excinfo:
        open_backend(trt_engine)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "pip install 'lookout[gpu]'" in message
