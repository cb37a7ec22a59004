"""The TensorRT backend's own logic without a GPU: version refusal, the engine/sidecar check,
padding below the profile minimum, ``set_input_shape``'s answer, and the order of frees.

TensorRT and CUDA are stand-ins here (``tests/support/trt_stand_ins.py``); nothing claims what
TensorRT computes. The same paths on a real GPU: ``tests/gpu`` and ``python -m bench.gpu_check``.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from packaging.requirements import Requirement

from stream_worker.backends import tensorrt as trt_backend
from stream_worker.backends.base import EngineInfo
from stream_worker.errors import EngineError
from stream_worker.preprocess import PreprocessSpec
from stream_worker.taxonomy import load_class_names
from tests.support.trt_stand_ins import (
    CLASSES,
    IMAGE,
    StandInDevice,
    StandInEngine,
    StandInExecutionContext,
    stand_in_tensorrt,
)
from tests.unit.engine_fixtures import REPO_ROOT


def _info(path: Path, *, max_batch: int = 32) -> EngineInfo:
    path.write_bytes(b"a plan, never read by a real TensorRT here")
    return EngineInfo(
        path=path,
        backend="tensorrt",
        precision="fp16",
        model_name="stand-in",
        model_version="1",
        max_batch=max_batch,
        opt_batch=8,
        input_name="images",
        output_name="probabilities",
        spec=PreprocessSpec(),
        class_names=tuple(load_class_names()),
        onnx_sha256="0" * 64,
        taxonomy_version="1",
    )


def _open_with(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    engine: StandInEngine | None,
    device: StandInDevice | None = None,
) -> tuple[trt_backend.TensorRTBackend, StandInDevice]:
    """A ``TensorRTBackend`` opened on stand-ins: ``engine`` is what deserialization answers."""
    device = device or StandInDevice()
    handed_over = [engine]  # given once, so the backend holds the only reference afterwards

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Any:
            return handed_over.pop() if handed_over else None

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: stand_in_tensorrt(Runtime=Runtime))
    monkeypatch.setattr(trt_backend, "open_device", lambda ordinal=0: device)
    return trt_backend.TensorRTBackend(_info(tmp_path / "e.plan")), device


# ------------------------------------------------------------------ 1. the supported TensorRT


def test_tensorrt_11_is_refused_in_one_line_before_anything_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    eleven = stand_in_tensorrt("11.0.0.114", BuilderFlag=SimpleNamespace(TF32="TF32"))  # no FP16 in 11
    monkeypatch.setitem(sys.modules, "tensorrt", eleven)
    with pytest.raises(EngineError) as excinfo:
        trt_backend.import_tensorrt()
    message = str(excinfo.value)
    assert "TensorRT 11.0.0.114 is not supported" in message
    assert "pip install 'tensorrt-cu12>=10.8,<11'" in message
    assert "\n" not in message
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in_tensorrt("9.3.0"))
    with pytest.raises(EngineError, match=r"TensorRT 9\.3\.0 is not supported"):
        trt_backend.import_tensorrt()


def test_tensorrt_10_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    ten = stand_in_tensorrt("10.8.0.43")
    monkeypatch.setitem(sys.modules, "tensorrt", ten)
    assert trt_backend.import_tensorrt() is ten


def test_no_tensorrt_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # an import of it raises ImportError
    with pytest.raises(EngineError) as excinfo:
        trt_backend.import_tensorrt()
    assert "pip install 'lookout[gpu]'" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_the_gpu_extra_installs_tensorrt_10_for_cuda_12_and_cuda_python() -> None:
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    gpu = {r.name: r for r in map(Requirement, extras["gpu"])}
    assert set(gpu) == {"tensorrt-cu12", "cuda-python"}  # not plain `tensorrt` (CUDA 13), no pycuda
    assert gpu["tensorrt-cu12"].specifier.contains("10.8.0.43")
    assert not gpu["tensorrt-cu12"].specifier.contains("11.0.0.114")
    assert not gpu["tensorrt-cu12"].specifier.contains("10.7.0")
    assert not gpu["cuda-python"].specifier.contains("13.0.0")  # cuda-python 13 needs a CUDA 13 driver
    assert [Requirement(r).name for r in extras["gpu-bindings"]] == ["cuda-python"]


# ---------------------------------------------------------------- 6. the sidecar/engine check


def test_an_engine_wider_than_its_sidecar_is_refused_before_any_buffer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    engine = StandInEngine(output=(-1, CLASSES + 1))
    with pytest.raises(EngineError) as excinfo:
        _open_with(monkeypatch, tmp_path, engine)
    assert f"engine output is (-1, {CLASSES + 1}) but the sidecar lists {CLASSES} classes" in str(
        excinfo.value
    )


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        (StandInEngine(image=(-1, 3, 192, 192)), "engine input is (-1, 3, 192, 192)"),
        (StandInEngine(profile_batches=(1, 8, 16)), "profile allows batch 1..16, the sidecar says up to 32"),
        (StandInEngine(names=("input", "probabilities")), "do not match the sidecar"),
    ],
)
def test_engine_io_that_does_not_match_the_sidecar_is_one_line(
    tmp_path: Path, engine: StandInEngine, expected: str
) -> None:
    info = _info(tmp_path / "e.plan")
    with pytest.raises(EngineError) as excinfo:
        trt_backend.check_engine_io(stand_in_tensorrt(), engine, info)
    assert expected in str(excinfo.value) and "\n" not in str(excinfo.value)


# ------------------------------------------------- 7. profile minimum, set_input_shape's answer


def test_a_batch_below_the_profile_minimum_is_padded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    device = StandInDevice()
    context = StandInExecutionContext(device.events)
    engine = StandInEngine(profile_batches=(4, 8, 32), context=context)
    backend, _ = _open_with(monkeypatch, tmp_path, engine, device)
    probs = backend.infer(np.ones((1, *IMAGE), np.float32))
    assert probs.shape == (1, CLASSES)
    assert context.shapes == [(4, *IMAGE)]  # run at the profile's minimum ...
    assert device.streams[0].uploaded_rows == [4]  # ... with three zero images
    backend.infer(np.ones((6, *IMAGE), np.float32))
    assert context.shapes[-1] == (6, *IMAGE)
    backend.close()


def test_a_shape_tensorrt_refuses_is_an_error_not_a_silent_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    device = StandInDevice()
    context = StandInExecutionContext(device.events, accept_shape=False)
    backend, _ = _open_with(monkeypatch, tmp_path, StandInEngine(context=context), device)
    with pytest.raises(EngineError, match="TensorRT refused input shape"):
        backend.infer(np.ones((2, *IMAGE), np.float32))
    assert "execute" not in device.events
    assert device.events.count("push") == device.events.count("pop")  # the context was popped
    backend.close()


# --------------------------------------------------------------------------- 5. close() order


def test_close_frees_everything_in_the_context_then_pops_then_releases(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    device = StandInDevice()
    backend, _ = _open_with(
        monkeypatch, tmp_path, StandInEngine(context=StandInExecutionContext(device.events)), device
    )
    backend.infer(np.ones((3, *IMAGE), np.float32))
    opened = len(device.events)
    backend.close()
    closing = device.events[opened:]
    assert closing[0] == "push" and closing[-2:] == ["pop", "release"]
    frees = [e for e in closing if e.startswith(("free", "destroy"))]
    assert sorted(frees) == sorted(
        [
            "destroy execution context",
            f"free device {32 * 3 * 224 * 224 * 4}",
            f"free device {32 * CLASSES * 4}",
            f"free pinned {IMAGE}",
            f"free pinned ({CLASSES},)",
            "destroy stream",
        ]
    )
    assert closing.index("destroy execution context") < closing.index(f"free device {32 * CLASSES * 4}")
    assert closing[-3] == "destroy stream"
    backend.close()  # a second close does nothing
    assert device.events[-1] == "release" and device.events.count("release") == 1
    with pytest.raises(EngineError, match="closed"):
        backend.infer(np.ones((1, *IMAGE), np.float32))


def test_a_failed_open_releases_the_context_it_retained(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    unreadable = StandInDevice()
    with pytest.raises(EngineError, match="could not deserialize"):
        _open_with(monkeypatch, tmp_path, None, unreadable)  # deserialize_cuda_engine answered None
    assert unreadable.events == ["push", "pop", "release"]
    device = StandInDevice()
    refusing = StandInEngine(context=StandInExecutionContext(device.events, accept_address=False))
    with pytest.raises(EngineError, match="refused the device address"):
        _open_with(monkeypatch, tmp_path, refusing, device)
    events = device.events
    assert events[0] == "push" and events[-2:] == ["pop", "release"]
    allocated = [e for e in events if e.startswith(("pinned", "allocate"))]
    freed = [e for e in events if e.startswith("free")]
    assert len(allocated) == len(freed) == 4  # everything allocated before the failure is freed


def test_a_plan_tensorrt_raises_on_is_one_line_and_releases_the_context(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    device = StandInDevice()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Any:
            raise RuntimeError("Serialization assertion magicTagRead == kMAGIC_TAG failed\nmore")

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: stand_in_tensorrt(Runtime=Runtime))
    monkeypatch.setattr(trt_backend, "open_device", lambda ordinal=0: device)
    with pytest.raises(EngineError) as excinfo:
        trt_backend.TensorRTBackend(_info(tmp_path / "g.plan"))
    assert "could not deserialize" in str(excinfo.value) and "magicTagRead" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    assert device.events == ["push", "pop", "release"]
