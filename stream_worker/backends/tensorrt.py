"""TensorRT 10 on an NVIDIA GPU, through the name-based tensor API.

Buffers (pinned host and device, from ``stream_worker.backends.cuda_memory``) are allocated
once for the engine's maximum batch; each call sets the input shape for the actual batch size,
copies in, runs ``execute_async_v3`` on the backend's own stream and copies the valid rows out.
The CUDA context is made current around each call, so the backend works on whichever single
thread owns it.

Supported: TensorRT 10 only (``tensorrt-cu12>=10.8,<11`` in the ``gpu`` extra). TensorRT 11
removed the weakly typed builder flags (``BuilderFlag.FP16``, ``INT8``) that the fp16 build
uses; any other major version is refused in one line before anything is built or loaded.

``tensorrt`` and the CUDA bindings come with the ``gpu`` extra and are imported only here,
lazily.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_worker.backends.base import EngineInfo, check_batch
from stream_worker.backends.cuda_memory import DeviceBuffer, PinnedBuffer, Stream, device_info, open_device
from stream_worker.errors import EngineError

log = logging.getLogger(__name__)

SUPPORTED_TENSORRT_MAJOR = 10
TENSORRT_REQUIREMENT = "tensorrt-cu12>=10.8,<11"
GPU_EXTRA_HINT = (
    "the TensorRT backend needs an NVIDIA GPU and the gpu extra: pip install 'lookout[gpu]' "
    f"({TENSORRT_REQUIREMENT} and cuda-python; an NVIDIA driver for CUDA 12)"
)


def check_tensorrt_version(version: str) -> None:
    """Refuse, in one line, any TensorRT whose major version is not 10."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise EngineError(f"cannot read the TensorRT version {version!r}") from None
    if major != SUPPORTED_TENSORRT_MAJOR:
        raise EngineError(
            f"TensorRT {version} is not supported: lookout builds and runs TensorRT "
            f"{SUPPORTED_TENSORRT_MAJOR} engines; pip install '{TENSORRT_REQUIREMENT}'"
        )


def import_tensorrt() -> ModuleType:
    """Import ``tensorrt`` and check its version, or raise a one-line ``EngineError``."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise EngineError(f"{GPU_EXTRA_HINT} ({exc})") from None
    check_tensorrt_version(str(trt.__version__))
    return trt


def runtime_version_and_gpu(device: int = 0) -> tuple[str, str]:
    """TensorRT version and the name of CUDA device ``device`` (what a plan is tied to)."""
    trt = import_tensorrt()
    return str(trt.__version__), device_info(device).name


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def check_engine_io(trt: ModuleType, engine: Any, info: EngineInfo) -> int:
    """Check a deserialized engine against its sidecar; returns the profile's smallest batch.

    The output buffer is sized from the sidecar's class count, so an engine whose output is
    wider than the sidecar says would have TensorRT write past it: that, the tensor names,
    dtypes, image shape and batch profile are all checked before any buffer is allocated.
    """
    path = info.path
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if inputs != [info.input_name] or outputs != [info.output_name]:
        raise EngineError(
            f"{path}: engine tensors {inputs} -> {outputs} do not match the sidecar "
            f"({info.input_name} -> {info.output_name})"
        )
    for name in names:
        if trt.nptype(engine.get_tensor_dtype(name)) != np.float32:
            raise EngineError(f"{path}: tensor {name} is not float32 at the engine boundary")
    input_shape = _dims(engine.get_tensor_shape(info.input_name))
    if len(input_shape) != 4 or input_shape[1:] != info.input_shape:
        raise EngineError(f"{path}: engine input is {input_shape}, the sidecar says (B, {info.input_shape})")
    output_shape = _dims(engine.get_tensor_shape(info.output_name))
    classes = len(info.class_names)
    if len(output_shape) != 2 or output_shape[1] != classes:
        raise EngineError(
            f"{path}: engine output is {output_shape} but the sidecar lists {classes} classes; "
            "the sidecar does not belong to this engine: rebuild it"
        )
    if engine.num_optimization_profiles < 1:
        raise EngineError(f"{path}: the engine has no optimization profile")
    low, _, high = (_dims(s) for s in engine.get_tensor_profile_shape(info.input_name, 0))
    if high[0] < info.max_batch or low[0] > info.max_batch:
        raise EngineError(
            f"{path}: profile allows batch {low[0]}..{high[0]}, the sidecar says up to {info.max_batch}"
        )
    return low[0]


@dataclass(frozen=True, slots=True)
class _Io:
    """What one call uses, all allocated once at open for the largest batch."""

    host_in: npt.NDArray[np.float32]
    host_out: npt.NDArray[np.float32]
    dev_in: DeviceBuffer
    dev_out: DeviceBuffer
    stream: Stream


class TensorRTBackend:
    """Runs a serialized TensorRT 10 engine. Owned by one thread (see ``Backend``).

    A batch smaller than the profile's minimum (``engine-build --min-batch``) is padded with
    zero images up to it; the padding rows are computed and dropped.
    """

    def __init__(self, info: EngineInfo, *, device: int = 0) -> None:
        """Deserialize ``info.path`` and allocate buffers for ``info.max_batch`` images."""
        trt = import_tensorrt()
        self.info = info
        self._io: _Io | None = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._host_in: PinnedBuffer | None = None
        self._host_out: PinnedBuffer | None = None
        self._dev_in: DeviceBuffer | None = None
        self._dev_out: DeviceBuffer | None = None
        self._stream: Stream | None = None
        self._min_batch = 1
        self._gpu = open_device(device)
        try:
            self._gpu.push()
        except BaseException:
            self._gpu.release()
            raise
        try:
            self._load(trt)
        except BaseException:
            for failure in self._release():
                log.warning("cleaning up after a failed TensorRT load: %s", failure)
            raise
        self._gpu.pop()

    def _load(self, trt: ModuleType) -> None:
        info = self.info
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        reason = ""
        try:
            self._engine = self._runtime.deserialize_cuda_engine(info.path.read_bytes())
        except Exception as exc:  # TensorRT answers None for a bad plan, but may raise instead
            text = str(exc).strip()
            reason = f" ({text.splitlines()[0] if text else type(exc).__name__})"
            self._engine = None
        if self._engine is None:
            raise EngineError(
                f"TensorRT could not deserialize {info.path}{reason}; rebuild it on this machine with "
                f"`engine-build build --backend tensorrt --precision {info.precision} --out {info.path}`"
            )
        self._min_batch = check_engine_io(trt, self._engine, info)
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"TensorRT could not create an execution context for {info.path}")
        self._host_in = self._gpu.pinned((info.max_batch, *info.input_shape), np.float32)
        self._host_out = self._gpu.pinned((info.max_batch, len(info.class_names)), np.float32)
        self._dev_in = self._gpu.allocate(self._host_in.array.nbytes)
        self._dev_out = self._gpu.allocate(self._host_out.array.nbytes)
        for name, buffer in ((info.input_name, self._dev_in), (info.output_name, self._dev_out)):
            if not self._context.set_tensor_address(name, buffer.address):
                raise EngineError(f"TensorRT refused the device address of tensor {name}")
        self._stream = self._gpu.stream()
        self._io = _Io(self._host_in.array, self._host_out.array, self._dev_in, self._dev_out, self._stream)

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Probabilities for a batch of 1..max_batch preprocessed images."""
        io = self._io
        if io is None:
            raise EngineError("backend is closed")
        size = check_batch(batch, self.info)
        run = max(size, self._min_batch)
        host_in = io.host_in[:run]
        host_out = io.host_out[:run]
        np.copyto(host_in[:size], batch)
        if run > size:
            host_in[size:] = 0.0
        self._gpu.push()
        try:
            shape = (run, *self.info.input_shape)
            if not self._context.set_input_shape(self.info.input_name, shape):
                raise EngineError(f"TensorRT refused input shape {shape} for {self.info.path}")
            io.stream.upload(io.dev_in, host_in)
            if not self._context.execute_async_v3(io.stream.handle):
                raise EngineError(f"TensorRT execution failed for a batch of {size}")
            io.stream.download(host_out, io.dev_out)
            io.stream.synchronize()
        finally:
            self._gpu.pop()
        # The pinned buffer is reused by the next call; the caller gets its own copy.
        probs: npt.NDArray[np.float32] = host_out[:size].copy()
        return probs

    def close(self) -> None:
        """Free the engine, the buffers and the stream in the CUDA context, then release it.

        Raises ``EngineError`` naming whatever could not be freed (after freeing the rest).
        """
        if self._io is None:
            return
        self._io = None
        self._gpu.push()
        failures = self._release()
        if failures:
            raise EngineError(f"closing the TensorRT backend: {'; '.join(failures)}")

    def _release(self) -> list[str]:
        """With the context current: free everything made in it, pop it, release it.

        Every step is attempted; the failures are returned, one line each.
        """
        failures: list[str] = []

        def attempt(what: str, step: Any) -> None:
            try:
                step()
            except Exception as exc:  # keep freeing the rest, report them all
                failures.append(f"{what}: {exc}")

        if self._stream is not None:
            attempt("stream synchronize", self._stream.synchronize)
        # TensorRT's objects hold device memory of their own: execution context, then engine,
        # then runtime, all while the CUDA context is still current.
        self._context = None
        self._engine = None
        self._runtime = None
        for name in ("_dev_in", "_dev_out", "_host_in", "_host_out"):
            buffer = getattr(self, name)
            if buffer is not None:
                attempt(f"free {name.lstrip('_')}", buffer.free)
                setattr(self, name, None)
        if self._stream is not None:
            attempt("stream destroy", self._stream.destroy)
            self._stream = None
        attempt("pop the CUDA context", self._gpu.pop)
        attempt("release the CUDA context", self._gpu.release)
        return failures
