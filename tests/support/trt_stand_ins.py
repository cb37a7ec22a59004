"""Stand-ins for TensorRT 10 and for the CUDA memory module, for tests without a GPU.

Each has the documented attribute names and records what was asked of it; it answers as the
documentation says the real object may (``set_timing_cache`` False, ``get_timing_cache`` None,
``set_input_shape`` False, ...). None computes anything: no test may use one to claim what
TensorRT computes, only to check lookout's handling of TensorRT's answers.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

from stream_worker.backends.cuda_memory import DeviceBuffer, PinnedBuffer
from stream_worker.taxonomy import load_class_names

CLASSES = len(load_class_names())
IMAGE = (3, 224, 224)


def stand_in_tensorrt(version: str = "10.8.0.43", **extra: Any) -> ModuleType:
    """A module with the TensorRT 10 names the code reads; nothing behind them computes."""
    trt = ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    trt.BuilderFlag = SimpleNamespace(FP16="FP16", TF32="TF32")  # type: ignore[attr-defined]
    trt.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")  # type: ignore[attr-defined]
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0)  # type: ignore[attr-defined]
    trt.nptype = {"FLOAT": np.float32, "HALF": np.float16}.__getitem__  # type: ignore[attr-defined]
    trt.Logger = type("Logger", (), {"WARNING": 2, "ERROR": 1, "__init__": lambda self, level=0: None})  # type: ignore[attr-defined]
    for name, value in extra.items():
        setattr(trt, name, value)
    return trt


class StandInTimingCache:
    """What ``IBuilderConfig.create_timing_cache`` hands back: something with ``serialize``."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return b"cache:" + self.data


class StandInConfig:
    """An ``IBuilderConfig`` stand-in that records flags and answers timing-cache calls as told."""

    def __init__(self, *, accept: Any = True, corrupt_raises: bool = False, hand_back: bool = True) -> None:
        self.accept = accept  # bool, or a callable(cache) -> bool
        self.corrupt_raises = corrupt_raises
        self.hand_back = hand_back
        self.set_flags: list[str] = []
        self.cleared_flags: list[str] = []
        self.attached: StandInTimingCache | None = None
        self.calls: list[str] = []

    def set_flag(self, flag: str) -> None:
        self.set_flags.append(flag)

    def clear_flag(self, flag: str) -> None:
        self.cleared_flags.append(flag)

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.calls.append(f"pool {pool} {size}")

    def add_optimization_profile(self, profile: Any) -> int:
        return 0

    def create_timing_cache(self, data: bytes) -> StandInTimingCache:
        if data and self.corrupt_raises:
            raise RuntimeError("Deserialization of the timing cache failed")
        return StandInTimingCache(data)

    def set_timing_cache(self, cache: StandInTimingCache, ignore_mismatch: bool) -> bool:
        self.calls.append(f"set_timing_cache ignore_mismatch={ignore_mismatch}")
        ok = self.accept(cache) if callable(self.accept) else self.accept
        if ok:
            self.attached = cache
        return bool(ok)

    def get_timing_cache(self) -> StandInTimingCache | None:
        return self.attached if self.hand_back else None


class StandInEngine:
    """An ``ICudaEngine`` stand-in describing its tensors as the sidecar test case needs."""

    def __init__(
        self,
        *,
        output: tuple[int, ...] = (-1, CLASSES),
        image: tuple[int, ...] = (-1, *IMAGE),
        profile_batches: tuple[int, int, int] = (1, 8, 32),
        names: tuple[str, str] = ("images", "probabilities"),
        context: Any = None,
    ) -> None:
        self.shapes = {names[0]: image, names[1]: output}
        self.modes = {names[0]: "INPUT", names[1]: "OUTPUT"}
        self.names = names
        self.profile = tuple((b, *IMAGE) for b in profile_batches)
        self.num_io_tensors = 2
        self.num_optimization_profiles = 1
        self.context = context

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> str:
        return self.modes[name]

    def get_tensor_dtype(self, name: str) -> str:
        return "FLOAT"

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def get_tensor_profile_shape(self, name: str, index: int) -> tuple[tuple[int, ...], ...]:
        return self.profile

    def create_execution_context(self) -> Any:
        return self.context


class StandInExecutionContext:
    """An ``IExecutionContext`` stand-in: records shapes and launches, answers as told."""

    def __init__(self, events: list[str], *, accept_shape: bool = True, accept_address: bool = True) -> None:
        self.events = events
        self.accept_shape = accept_shape
        self.accept_address = accept_address
        self.shapes: list[tuple[int, ...]] = []

    def set_tensor_address(self, name: str, address: int) -> bool:
        return self.accept_address

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes.append(tuple(shape))
        return self.accept_shape

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.events.append("execute")
        return True

    def __del__(self) -> None:
        self.events.append("destroy execution context")


class StandInStream:
    """A stream stand-in: an upload records the rows; a download fills uniform rows (no device)."""

    handle = 7

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.uploaded_rows: list[int] = []

    def upload(self, dst: DeviceBuffer, src: np.ndarray) -> None:
        self.uploaded_rows.append(len(src))

    def download(self, dst: np.ndarray, src: DeviceBuffer) -> None:
        dst[...] = 1.0 / dst.shape[1]

    def synchronize(self) -> None:
        self.events.append("synchronize")

    def destroy(self) -> None:
        self.events.append("destroy stream")


class StandInDevice:
    """A ``cuda_memory.DeviceContext`` stand-in that records pushes, pops, allocations and frees."""

    info = SimpleNamespace(name="Stand-in GPU")

    def __init__(self) -> None:
        self.events: list[str] = []
        self.streams: list[StandInStream] = []

    def push(self) -> None:
        self.events.append("push")

    def pop(self) -> None:
        self.events.append("pop")

    def pinned(self, shape: tuple[int, ...], dtype: Any = np.float32) -> PinnedBuffer:
        self.events.append(f"pinned {shape[1:]}")
        return PinnedBuffer(np.zeros(shape, dtype), lambda: self.events.append(f"free pinned {shape[1:]}"))

    def allocate(self, nbytes: int) -> DeviceBuffer:
        self.events.append(f"allocate {nbytes}")
        return DeviceBuffer(0x1000, nbytes, lambda: self.events.append(f"free device {nbytes}"))

    def stream(self) -> StandInStream:
        self.events.append("create stream")
        self.streams.append(StandInStream(self.events))
        return self.streams[-1]

    def memory(self) -> tuple[int, int]:
        return (1 << 30, 2 << 30)

    def release(self) -> None:
        self.events.append("release")
