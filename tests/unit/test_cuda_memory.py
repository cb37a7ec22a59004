"""The CUDA memory module without a GPU: which binding it picks, and how it drives one.

The binding is chosen by what imports (cuda-python first, pycuda second), checked by putting
stand-in modules in ``sys.modules``. The cuda-python stand-in answers each documented
``cuda.bindings.driver`` call as ``(CUresult, *values)`` and records it, so the tests see the
calls, their order and the error handling; its "pinned" memory is ordinary host memory, and
nothing here claims anything about a GPU. Where the real cuda-bindings is installed (it is on
the development machine, without a driver), the names the module calls are checked against it,
and its own no-driver answer must come back as one line.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from stream_worker.backends import cuda_memory
from stream_worker.errors import EngineError


class CUresult(enum.IntEnum):
    """The few ``CUresult`` codes the tests use, with their documented values."""

    CUDA_SUCCESS = 0
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_NO_DEVICE = 100


class StandInDriver(ModuleType):
    """``cuda.bindings.driver`` as documented: every call returns ``(CUresult, *values)``."""

    def __init__(self, *, failing: dict[str, CUresult] | None = None) -> None:
        super().__init__("cuda.bindings.driver")
        self.calls: list[str] = []
        self.failing = failing or {}
        self.host: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self.CUresult = CUresult
        self.CUdevice_attribute = SimpleNamespace(
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR="major",
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR="minor",
        )
        self.CUstream_flags = SimpleNamespace(CU_STREAM_NON_BLOCKING=1)
        answers: dict[str, Callable[..., tuple[Any, ...]]] = {
            "cuInit": lambda flags: (),
            "cuDeviceGetCount": lambda: (1,),
            "cuDeviceGet": lambda ordinal: (ordinal,),
            "cuDeviceGetAttribute": lambda attribute, device: ({"major": 9, "minor": 0}[attribute],),
            "cuDeviceGetName": lambda length, device: (b"Stand-in GPU".ljust(length, b"\0"),),
            "cuDriverGetVersion": lambda: (12080,),
            "cuDeviceTotalMem": lambda device: (80 << 30,),
            "cuDevicePrimaryCtxRetain": lambda device: ("primary context",),
            "cuDevicePrimaryCtxRelease": lambda device: (),
            "cuCtxPushCurrent": lambda context: (),
            "cuCtxPopCurrent": lambda: ("primary context",),
            "cuMemHostAlloc": self._host_alloc,
            "cuMemFreeHost": lambda address: (),
            "cuMemAlloc": lambda nbytes: (0xD000,),
            "cuMemFree": lambda pointer: (),
            "cuStreamCreate": lambda flags: (0x5000,),
            "cuStreamDestroy": lambda stream: (),
            "cuStreamSynchronize": lambda stream: (),
            "cuMemcpyHtoDAsync": lambda dst, src, nbytes, stream: (),
            "cuMemcpyDtoHAsync": lambda dst, src, nbytes, stream: (),
            "cuMemGetInfo": lambda: (1 << 30, 80 << 30),
        }
        for name, answer in answers.items():
            setattr(self, name, self._recorded(name, answer))
        self.cuGetErrorName = lambda status: (CUresult.CUDA_SUCCESS, status.name.encode())
        self.cuGetErrorString = lambda status: (CUresult.CUDA_SUCCESS, b"as the stand-in was told")

    def _host_alloc(self, nbytes: int, flags: int) -> tuple[int]:
        memory = ctypes.create_string_buffer(nbytes)
        self.host[ctypes.addressof(memory)] = memory
        return (ctypes.addressof(memory),)

    def _recorded(self, name: str, answer: Callable[..., tuple[Any, ...]]) -> Callable[..., tuple[Any, ...]]:
        def call(*args: Any) -> tuple[Any, ...]:
            self.calls.append(name)
            if name in self.failing:
                return (self.failing[name], None)
            return (CUresult.CUDA_SUCCESS, *answer(*args))

        return call


@pytest.fixture()
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Callable[..., StandInDriver]:
    """Install a stand-in cuda-python driver (and hide cuda.bindings.utils, which it lacks)."""

    def install(**kwargs: Any) -> StandInDriver:
        driver = StandInDriver(**kwargs)
        monkeypatch.setitem(sys.modules, "cuda.bindings.driver", driver)
        monkeypatch.setitem(sys.modules, "cuda.bindings.utils", None)
        return driver

    return install


# --------------------------------------------------------------------------------- selection


def test_cuda_python_is_chosen_when_it_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = ModuleType("cuda.bindings.driver")
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", driver)
    monkeypatch.setitem(sys.modules, "pycuda.driver", ModuleType("pycuda.driver"))
    assert cuda_memory.select_binding() == ("cuda-python", driver)


def test_pycuda_is_chosen_only_without_cuda_python(monkeypatch: pytest.MonkeyPatch) -> None:
    pycuda = ModuleType("pycuda.driver")
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", pycuda)
    assert cuda_memory.select_binding() == ("pycuda", pycuda)


def test_without_either_binding_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(EngineError) as excinfo:
        cuda_memory.open_device(0)
    assert "pip install 'lookout[gpu]'" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


# ------------------------------------------------------------------------ the real bindings


def _real_driver() -> Any:
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        pytest.skip("cuda-python (cuda-bindings) is not installed here")
    from cuda.bindings import driver

    return driver


def test_the_calls_made_exist_in_the_installed_cuda_bindings(
    stand_in: Callable[..., StandInDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    stand = stand_in()
    context = cuda_memory.open_device(0)
    with cuda_memory.current(context):
        buffer = context.pinned((2, 3))
        device = context.allocate(buffer.array.nbytes)
        stream = context.stream()
        stream.upload(device, buffer.array)
        stream.download(buffer.array, device)
        stream.synchronize()
        context.memory()
        stream.destroy()
        device.free()
        buffer.free()
    context.release()
    monkeypatch.undo()  # the real cuda.bindings back in sys.modules
    real = _real_driver()
    assert [name for name in sorted(set(stand.calls)) if not hasattr(real, name)] == []


def test_the_installed_bindings_without_a_driver_say_no_gpu_in_one_line() -> None:
    _real_driver()
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        pass
    else:
        pytest.skip("an NVIDIA driver is installed here: tests/gpu covers this machine")
    for call in (cuda_memory.open_device, cuda_memory.device_info):
        with pytest.raises(EngineError) as excinfo:
            call(0)
        assert str(excinfo.value).startswith("no NVIDIA GPU:")
        assert "\n" not in str(excinfo.value)


# ---------------------------------------------------------------- driving cuda-python's driver


def test_device_info_reads_name_capability_and_driver(stand_in: Callable[..., StandInDriver]) -> None:
    stand_in()
    info = cuda_memory.device_info(0)
    assert (info.name, info.compute_capability, info.driver_cuda_version) == ("Stand-in GPU", (9, 0), "12.8")
    assert info.binding.startswith("cuda-python ")
    with pytest.raises(EngineError, match="CUDA device 1 does not exist"):
        cuda_memory.device_info(1)


def test_no_device_is_one_line(stand_in: Callable[..., StandInDriver]) -> None:
    stand_in(failing={"cuInit": CUresult.CUDA_ERROR_NO_DEVICE})
    with pytest.raises(
        EngineError, match=r"^no NVIDIA GPU: the driver is installed but sees no CUDA device$"
    ):
        cuda_memory.open_device(0)


def test_the_primary_context_is_retained_once_and_released_once(
    stand_in: Callable[..., StandInDriver],
) -> None:
    driver = stand_in()
    context = cuda_memory.open_device(0)
    context.push()
    context.pop()
    context.release()
    context.release()  # idempotent
    assert driver.calls.count("cuDevicePrimaryCtxRetain") == 1
    assert driver.calls.count("cuDevicePrimaryCtxRelease") == 1
    assert driver.calls[-1] == "cuDevicePrimaryCtxRelease"
    with pytest.raises(EngineError, match="already released"):
        context.push()


def test_pinned_buffers_are_writable_arrays_over_the_allocation(
    stand_in: Callable[..., StandInDriver],
) -> None:
    driver = stand_in()
    context = cuda_memory.open_device(0)
    buffer = context.pinned((4, 3, 2))
    assert buffer.array.shape == (4, 3, 2) and buffer.array.dtype == np.float32
    buffer.array[...] = 1.5
    assert buffer.array.ctypes.data in driver.host  # a view, not a copy
    buffer.free()
    buffer.free()  # idempotent
    assert driver.calls.count("cuMemFreeHost") == 1


def test_a_driver_error_is_one_line_naming_the_call(stand_in: Callable[..., StandInDriver]) -> None:
    stand_in(failing={"cuMemAlloc": CUresult.CUDA_ERROR_OUT_OF_MEMORY})
    context = cuda_memory.open_device(0)
    with pytest.raises(EngineError) as excinfo:
        context.allocate(1 << 20)
    assert str(excinfo.value) == "CUDA cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY (as the stand-in was told)"


def test_a_copy_that_does_not_fit_is_refused_before_the_driver(
    stand_in: Callable[..., StandInDriver],
) -> None:
    driver = stand_in()
    context = cuda_memory.open_device(0)
    device, stream = context.allocate(16), context.stream()
    with pytest.raises(EngineError, match="does not fit"):
        stream.upload(device, np.zeros(5, np.float32))
    with pytest.raises(EngineError, match="C-contiguous"):
        stream.upload(device, np.zeros((2, 2), np.float32).T)
    assert "cuMemcpyHtoDAsync" not in driver.calls


# -------------------------------------------------------------------------------- pycuda


def test_pycuda_gets_its_own_context_detached_while_current(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class Context:
        def push(self) -> None:
            calls.append("push")

        def detach(self) -> None:
            calls.append("detach")

        @staticmethod
        def pop() -> None:
            calls.append("pop")

    class Device:
        def __init__(self, ordinal: int) -> None:
            pass

        @staticmethod
        def count() -> int:
            return 1

        def name(self) -> str:
            return "Stand-in GPU"

        def compute_capability(self) -> tuple[int, int]:
            return (8, 9)

        def total_memory(self) -> int:
            return 24 << 30

        def make_context(self) -> Context:
            calls.append("make_context")
            return Context()

    pycuda = ModuleType("pycuda.driver")
    pycuda.Error = RuntimeError  # type: ignore[attr-defined]
    pycuda.init = lambda: None  # type: ignore[attr-defined]
    pycuda.get_driver_version = lambda: 12040  # type: ignore[attr-defined]
    pycuda.Device = Device  # type: ignore[attr-defined]
    pycuda.Context = Context  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", pycuda)
    context = cuda_memory.open_device(0)
    assert context.info.name == "Stand-in GPU" and context.info.driver_cuda_version == "12.4"
    with cuda_memory.current(context):
        pass
    context.release()
    # make_context leaves it current: popped at once; released by a detach while current.
    assert calls == ["make_context", "pop", "push", "pop", "push", "detach"]
