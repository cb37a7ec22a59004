"""TensorRT 10 on an NVIDIA GPU, through the name-based tensor API.

Buffers (pinned host and device) are allocated once for the engine's maximum batch; each
call sets the input shape for the actual batch size, copies in, runs ``execute_async_v3``
on the backend's own stream and copies the valid rows out. The CUDA context is the
device's primary context, made current around each call, so the backend works on whichever
single thread owns it.

``tensorrt`` and ``pycuda`` come with the ``gpu`` extra and are imported only here, lazily.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_worker.backends.base import EngineInfo, check_batch
from stream_worker.errors import EngineError

GPU_EXTRA_HINT = (
    "TensorRT backend needs the gpu extra and an NVIDIA GPU: pip install 'lookout[gpu]' "
    "(TensorRT 10 and pycuda; CUDA driver required)"
)


def import_tensorrt() -> tuple[ModuleType, ModuleType]:
    """Import ``tensorrt`` and ``pycuda.driver`` and initialise CUDA, or raise a one-line ``EngineError``."""
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(f"{GPU_EXTRA_HINT} ({exc})") from None
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            raise EngineError(f"{GPU_EXTRA_HINT} (no CUDA device found)")
    except cuda.Error as exc:
        raise EngineError(f"{GPU_EXTRA_HINT} ({exc})") from None
    if int(str(trt.__version__).split(".")[0]) < 10:
        raise EngineError(f"TensorRT {trt.__version__} is too old: lookout needs TensorRT 10")
    return trt, cuda


def runtime_version_and_gpu(device: int = 0) -> tuple[str, str]:
    """TensorRT version and the name of CUDA device ``device`` (what a plan is tied to)."""
    trt, cuda = import_tensorrt()
    return str(trt.__version__), str(cuda.Device(device).name())


class TensorRTBackend:
    """Runs a serialized TensorRT 10 engine. Owned by one thread (see ``Backend``)."""

    def __init__(self, info: EngineInfo, *, device: int = 0) -> None:
        """Deserialize ``info.path`` and allocate buffers for ``info.max_batch`` images."""
        trt, cuda = import_tensorrt()
        self.info = info
        self._cuda = cuda
        self._cuda_context: Any = cuda.Device(device).retain_primary_context()
        self._cuda_context.push()
        try:
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(info.path.read_bytes())
            if self._engine is None:
                raise EngineError(f"TensorRT could not deserialize {info.path}; rebuild it on this machine")
            self._context = self._engine.create_execution_context()
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            if inputs != [info.input_name] or outputs != [info.output_name]:
                raise EngineError(
                    f"{info.path}: engine tensors {inputs} -> {outputs} do not match the sidecar "
                    f"({info.input_name} -> {info.output_name})"
                )
            for name in names:
                if trt.nptype(self._engine.get_tensor_dtype(name)) != np.float32:
                    raise EngineError(f"{info.path}: tensor {name} is not float32 at the engine boundary")
            _, _, profile_max = self._engine.get_tensor_profile_shape(info.input_name, 0)
            if int(profile_max[0]) < info.max_batch:
                raise EngineError(
                    f"{info.path}: profile allows batch {profile_max[0]}, sidecar says {info.max_batch}"
                )
            num_classes = len(info.class_names)
            self._host_in = cuda.pagelocked_empty((info.max_batch, *info.input_shape), np.float32)
            self._host_out = cuda.pagelocked_empty((info.max_batch, num_classes), np.float32)
            self._dev_in = cuda.mem_alloc(self._host_in.nbytes)
            self._dev_out = cuda.mem_alloc(self._host_out.nbytes)
            self._context.set_tensor_address(info.input_name, int(self._dev_in))
            self._context.set_tensor_address(info.output_name, int(self._dev_out))
            self._stream = cuda.Stream()
        finally:
            self._cuda_context.pop()
        self._closed = False

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Probabilities for a batch of 1..max_batch preprocessed images."""
        if self._closed:
            raise EngineError("backend is closed")
        size = check_batch(batch, self.info)
        cuda = self._cuda
        self._cuda_context.push()
        try:
            host_in = self._host_in[:size]
            host_out = self._host_out[:size]
            np.copyto(host_in, batch)
            cuda.memcpy_htod_async(self._dev_in, host_in, self._stream)
            self._context.set_input_shape(self.info.input_name, (size, *self.info.input_shape))
            if not self._context.execute_async_v3(self._stream.handle):
                raise EngineError(f"TensorRT execution failed for a batch of {size}")
            cuda.memcpy_dtoh_async(host_out, self._dev_out, self._stream)
            self._stream.synchronize()
        finally:
            self._cuda_context.pop()
        # The pinned buffer is reused by the next call; the caller gets its own copy.
        probs: npt.NDArray[np.float32] = host_out.copy()
        return probs

    def close(self) -> None:
        """Free device memory and the engine, and release the primary context."""
        if self._closed:
            return
        self._closed = True
        self._cuda_context.push()
        try:
            self._dev_in.free()
            self._dev_out.free()
            del self._context
            del self._engine
        finally:
            self._cuda_context.pop()
            self._cuda_context.detach()
