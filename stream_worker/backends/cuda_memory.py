"""The few CUDA calls the TensorRT backend makes, behind one small interface.

TensorRT runs a plan in the CUDA context current on the calling thread and reads and writes
device memory its caller owns. So the backend needs exactly this: a context it makes current
around each call, page-locked (pinned) host buffers for asynchronous copies, device buffers,
copies host -> device and back on a stream, and the stream. Two implementations, chosen at
start-up by what is installed (``open_device``):

======================  ====================================================================
binding                 why
======================  ====================================================================
cuda-python (default)   NVIDIA's own bindings (``cuda.bindings.driver``), the ones TensorRT's
                        samples use since 10.13; binary wheels, no compiler. The ``gpu`` extra.
pycuda                  compiled at install (needs ``cuda.h``, a compiler, ``Python.h``,
                        ``-lcuda``); used only when cuda-python is absent and pycuda is there.
======================  ====================================================================

Lifetimes, the reason this module exists. Everything allocated in a context (pinned and device
buffers, the stream, and TensorRT's engine) is freed while that context is current, and the
context is released last. A free issued after the context was released is skipped silently by
the driver: the memory leaks. cuda-python retains the device's *primary* context (the one the
CUDA runtime inside TensorRT also uses) and releases it after popping it. pycuda gets its own
context (``make_context``) because pycuda's ``detach()`` of a primary context pushes it when it
is not current and never pops it again (``cuda.hpp``: "pop is implicit in detach" holds for
``cuCtxDetach`` only), which would leave it current on the thread forever.

Contexts are not tied to a thread: ``push`` on any thread makes the context current there until
``pop``; one thread at a time (the backend's owner) uses it.
"""

from __future__ import annotations

import ctypes
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from stream_worker.errors import EngineError

BINDINGS_HINT = "pip install 'lookout[gpu]' (cuda-python), or have pycuda installed"


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """What the driver says about one device, and which binding asked."""

    binding: str
    """``cuda-python <version>`` or ``pycuda <version>``."""
    driver_cuda_version: str
    """The newest CUDA version the installed driver supports, e.g. ``12.8``."""
    device_count: int
    ordinal: int
    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int


class PinnedBuffer:
    """A numpy array over page-locked host memory; ``free`` returns the memory to the driver."""

    def __init__(self, array: npt.NDArray[Any], release: Callable[[], None]) -> None:
        """Wrap ``array`` (a view of the pinned allocation) and the call that frees it."""
        self.array = array
        self._release: Callable[[], None] | None = release

    def free(self) -> None:
        """Free the allocation (idempotent). The array must not be touched afterwards."""
        release, self._release = self._release, None
        if release is not None:
            release()


class DeviceBuffer:
    """``nbytes`` of device memory at ``address``; ``free`` returns it to the driver."""

    def __init__(self, address: int, nbytes: int, release: Callable[[], None]) -> None:
        """Wrap a device allocation and the call that frees it."""
        self.address = address
        self.nbytes = nbytes
        self._release: Callable[[], None] | None = release

    def free(self) -> None:
        """Free the allocation (idempotent)."""
        release, self._release = self._release, None
        if release is not None:
            release()


class Stream(Protocol):
    """A CUDA stream: ordered asynchronous copies, and the handle TensorRT enqueues on."""

    handle: int

    def upload(self, dst: DeviceBuffer, src: npt.NDArray[Any]) -> None:
        """Enqueue a copy of ``src`` (C-contiguous, ideally pinned) to the start of ``dst``."""
        ...

    def download(self, dst: npt.NDArray[Any], src: DeviceBuffer) -> None:
        """Enqueue a copy of the start of ``src`` into ``dst`` (C-contiguous, ideally pinned)."""
        ...

    def synchronize(self) -> None:
        """Wait until everything enqueued so far has finished."""
        ...

    def destroy(self) -> None:
        """Destroy the stream (idempotent); call with the context current."""
        ...


class DeviceContext(Protocol):
    """One device's CUDA context and the allocations made in it."""

    info: GpuInfo

    def push(self) -> None:
        """Make the context current on the calling thread."""
        ...

    def pop(self) -> None:
        """Undo the matching ``push`` on this thread."""
        ...

    def pinned(self, shape: tuple[int, ...], dtype: type[np.generic] = np.float32) -> PinnedBuffer:
        """A page-locked host array (context current)."""
        ...

    def allocate(self, nbytes: int) -> DeviceBuffer:
        """Device memory (context current)."""
        ...

    def stream(self) -> Stream:
        """A new non-blocking stream (context current)."""
        ...

    def memory(self) -> tuple[int, int]:
        """Free and total device memory in bytes (context current)."""
        ...

    def release(self) -> None:
        """Give the context back; call last, not current, after everything in it was freed."""
        ...


@contextmanager
def current(context: DeviceContext) -> Iterator[None]:
    """``context`` made current for the ``with`` block, on this thread."""
    context.push()
    try:
        yield
    finally:
        context.pop()


def _check_copy(nbytes: int, capacity: int, array: npt.NDArray[Any]) -> None:
    if not array.flags.c_contiguous:
        raise EngineError("CUDA copies need a C-contiguous host array")
    if nbytes > capacity:
        raise EngineError(f"CUDA copy of {nbytes} bytes does not fit a {capacity}-byte device buffer")


def _cuda_version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def select_binding() -> tuple[str, ModuleType]:
    """The CUDA binding to use: ``("cuda-python", cuda.bindings.driver)`` when installed, else
    ``("pycuda", pycuda.driver)``; a one-line ``EngineError`` when neither is.

    Chosen by what imports, never by trying the driver: a machine without a GPU still gets the
    binding's own "no driver" answer from ``open_device``.
    """
    try:
        return "cuda-python", importlib.import_module("cuda.bindings.driver")
    except ImportError:
        pass
    try:
        return "pycuda", importlib.import_module("pycuda.driver")
    except ImportError:
        pass
    raise EngineError(f"no CUDA bindings are installed: {BINDINGS_HINT}")


def device_info(ordinal: int = 0) -> GpuInfo:
    """Describe CUDA device ``ordinal`` without creating a context; one-line ``EngineError``
    when there is no driver, no device or no binding."""
    name, driver = select_binding()
    if name == "cuda-python":
        return _CudaPython(driver).info(ordinal)
    return _Pycuda(driver).info(ordinal)


def open_device(ordinal: int = 0) -> DeviceContext:
    """A context on CUDA device ``ordinal`` through the installed binding (not current on
    return). Release it with ``release()`` after freeing everything allocated in it."""
    name, driver = select_binding()
    if name == "cuda-python":
        return _CudaPythonContext(_CudaPython(driver), ordinal)
    return _PycudaContext(_Pycuda(driver), ordinal)


def device_free_bytes(ordinal: int = 0) -> int:
    """Free memory of CUDA device ``ordinal`` now, read through a context of its own."""
    context = open_device(ordinal)
    try:
        with current(context):
            return context.memory()[0]
    finally:
        context.release()


# ---------------------------------------------------------------------------------- cuda-python


class _CudaPython:
    """Calls into ``cuda.bindings.driver``: every call returns ``(CUresult, *values)``."""

    def __init__(self, driver: ModuleType) -> None:
        self.driver = driver
        self.binding = f"cuda-python {_distribution_version('cuda-bindings', 'cuda-python')}"

    def call(self, function: str, *args: Any) -> Any:
        """``driver.<function>(*args)``'s values, or a one-line ``EngineError`` naming the error."""
        result = getattr(self.driver, function)(*args)
        status, values = result[0], result[1:]
        if status != self.driver.CUresult.CUDA_SUCCESS:
            raise EngineError(f"CUDA {function} failed: {self.error_text(status)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def error_text(self, status: Any) -> str:
        name = self.driver.cuGetErrorName(status)
        text = self.driver.cuGetErrorString(status)
        label = name[1].decode() if name[0] == self.driver.CUresult.CUDA_SUCCESS else str(status)
        detail = text[1].decode() if text[0] == self.driver.CUresult.CUDA_SUCCESS else ""
        return f"{label} ({detail})" if detail else label

    def init(self) -> int:
        """Initialise the driver API; the device count. No GPU or no driver is one line."""
        try:
            status = self.driver.cuInit(0)[0]
        except Exception as exc:  # cuda-bindings raises its own loader error without libcuda
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineError(
                f"no NVIDIA GPU: the NVIDIA driver (libcuda) cannot be loaded ({reason})"
            ) from None
        if status == self.driver.CUresult.CUDA_ERROR_NO_DEVICE:
            raise EngineError("no NVIDIA GPU: the driver is installed but sees no CUDA device")
        if status != self.driver.CUresult.CUDA_SUCCESS:
            raise EngineError(f"no usable NVIDIA GPU: cuInit failed: {self.error_text(status)}")
        count = int(self.call("cuDeviceGetCount"))
        if count < 1:
            raise EngineError("no NVIDIA GPU: the driver sees no CUDA device")
        return count

    def device(self, ordinal: int) -> tuple[Any, int]:
        count = self.init()
        if not 0 <= ordinal < count:
            raise EngineError(f"CUDA device {ordinal} does not exist (this machine has {count})")
        return self.call("cuDeviceGet", ordinal), count

    def info(self, ordinal: int) -> GpuInfo:
        device, count = self.device(ordinal)
        attribute = self.driver.CUdevice_attribute
        major = int(
            self.call("cuDeviceGetAttribute", attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)
        )
        minor = int(
            self.call("cuDeviceGetAttribute", attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)
        )
        raw_name = bytes(self.call("cuDeviceGetName", 256, device))
        return GpuInfo(
            binding=self.binding,
            driver_cuda_version=_cuda_version_text(int(self.call("cuDriverGetVersion"))),
            device_count=count,
            ordinal=ordinal,
            name=raw_name.split(b"\0", 1)[0].decode(errors="replace"),
            compute_capability=(major, minor),
            total_memory_bytes=int(self.call("cuDeviceTotalMem", device)),
        )

    def native_handle(self, obj: Any) -> int:
        """The address behind a CUDA object (``int(obj)`` is deprecated since cuda-bindings 12.9.1)."""
        try:
            from cuda.bindings.utils import get_cuda_native_handle
        except ImportError:
            return int(obj)
        return int(get_cuda_native_handle(obj))


class _CudaPythonStream:
    def __init__(self, cuda: _CudaPython) -> None:
        self._cuda = cuda
        self._stream: Any = cuda.call(
            "cuStreamCreate", int(cuda.driver.CUstream_flags.CU_STREAM_NON_BLOCKING)
        )
        self.handle = cuda.native_handle(self._stream)

    def upload(self, dst: DeviceBuffer, src: npt.NDArray[Any]) -> None:
        _check_copy(src.nbytes, dst.nbytes, src)
        self._cuda.call("cuMemcpyHtoDAsync", dst.address, src.ctypes.data, src.nbytes, self._stream)

    def download(self, dst: npt.NDArray[Any], src: DeviceBuffer) -> None:
        _check_copy(dst.nbytes, src.nbytes, dst)
        self._cuda.call("cuMemcpyDtoHAsync", dst.ctypes.data, src.address, dst.nbytes, self._stream)

    def synchronize(self) -> None:
        self._cuda.call("cuStreamSynchronize", self._stream)

    def destroy(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self._cuda.call("cuStreamDestroy", stream)


class _CudaPythonContext:
    """The device's primary context, retained on open and released (after a pop) on release."""

    def __init__(self, cuda: _CudaPython, ordinal: int) -> None:
        self._cuda = cuda
        self.info = cuda.info(ordinal)
        self._device = cuda.call("cuDeviceGet", ordinal)
        self._context: Any = cuda.call("cuDevicePrimaryCtxRetain", self._device)

    def push(self) -> None:
        if self._context is None:
            raise EngineError("the CUDA context was already released")
        self._cuda.call("cuCtxPushCurrent", self._context)

    def pop(self) -> None:
        self._cuda.call("cuCtxPopCurrent")

    def pinned(self, shape: tuple[int, ...], dtype: type[np.generic] = np.float32) -> PinnedBuffer:
        np_dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        address = int(self._cuda.call("cuMemHostAlloc", nbytes, 0))
        pointer = ctypes.cast(address, ctypes.POINTER(np.ctypeslib.as_ctypes_type(np_dtype)))
        array = np.ctypeslib.as_array(pointer, shape)
        return PinnedBuffer(array, lambda: self._cuda.call("cuMemFreeHost", address))

    def allocate(self, nbytes: int) -> DeviceBuffer:
        pointer = self._cuda.call("cuMemAlloc", nbytes)
        return DeviceBuffer(int(pointer), nbytes, lambda: self._cuda.call("cuMemFree", pointer))

    def stream(self) -> Stream:
        return _CudaPythonStream(self._cuda)

    def memory(self) -> tuple[int, int]:
        free, total = self._cuda.call("cuMemGetInfo")
        return int(free), int(total)

    def release(self) -> None:
        if self._context is not None:
            self._context = None
            self._cuda.call("cuDevicePrimaryCtxRelease", self._device)


# --------------------------------------------------------------------------------------- pycuda


class _Pycuda:
    """Calls into ``pycuda.driver``, its errors turned into one-line ``EngineError``s."""

    def __init__(self, driver: ModuleType) -> None:
        self.driver = driver
        self.binding = f"pycuda {_distribution_version('pycuda')}"

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(*args)
        except self.driver.Error as exc:
            raise EngineError(
                f"CUDA (pycuda) {getattr(function, '__name__', function)} failed: {exc}"
            ) from None

    def init(self) -> int:
        try:
            self.driver.init()
            count = int(self.driver.Device.count())
        except self.driver.Error as exc:
            raise EngineError(f"no usable NVIDIA GPU: {exc}") from None
        if count < 1:
            raise EngineError("no NVIDIA GPU: the driver sees no CUDA device")
        return count

    def info(self, ordinal: int) -> GpuInfo:
        count = self.init()
        if not 0 <= ordinal < count:
            raise EngineError(f"CUDA device {ordinal} does not exist (this machine has {count})")
        device = self.driver.Device(ordinal)
        major, minor = self.call(device.compute_capability)
        return GpuInfo(
            binding=self.binding,
            driver_cuda_version=_cuda_version_text(int(self.call(self.driver.get_driver_version))),
            device_count=count,
            ordinal=ordinal,
            name=str(self.call(device.name)),
            compute_capability=(int(major), int(minor)),
            total_memory_bytes=int(self.call(device.total_memory)),
        )


class _PycudaStream:
    def __init__(self, cuda: _Pycuda) -> None:
        self._cuda = cuda
        self._stream: Any = cuda.call(cuda.driver.Stream)
        self.handle = int(self._stream.handle)

    def upload(self, dst: DeviceBuffer, src: npt.NDArray[Any]) -> None:
        _check_copy(src.nbytes, dst.nbytes, src)
        self._cuda.call(self._cuda.driver.memcpy_htod_async, dst.address, src, self._stream)

    def download(self, dst: npt.NDArray[Any], src: DeviceBuffer) -> None:
        _check_copy(dst.nbytes, src.nbytes, dst)
        self._cuda.call(self._cuda.driver.memcpy_dtoh_async, dst, src.address, self._stream)

    def synchronize(self) -> None:
        self._cuda.call(self._stream.synchronize)

    def destroy(self) -> None:
        # pycuda destroys a stream when its last reference goes (in the current context).
        self._stream = None


class _PycudaContext:
    """A context of pycuda's own (see the module docstring for why not the primary one)."""

    def __init__(self, cuda: _Pycuda, ordinal: int) -> None:
        self._cuda = cuda
        self.info = cuda.info(ordinal)
        self._context: Any = cuda.call(cuda.driver.Device(ordinal).make_context)
        cuda.call(cuda.driver.Context.pop)  # make_context leaves it current; push() makes it so

    def push(self) -> None:
        if self._context is None:
            raise EngineError("the CUDA context was already released")
        self._cuda.call(self._context.push)

    def pop(self) -> None:
        self._cuda.call(self._cuda.driver.Context.pop)

    def pinned(self, shape: tuple[int, ...], dtype: type[np.generic] = np.float32) -> PinnedBuffer:
        array = self._cuda.call(self._cuda.driver.pagelocked_empty, shape, dtype)
        # The array's base is pycuda's HostAllocation, which frees on demand.
        return PinnedBuffer(array, lambda: self._cuda.call(array.base.free))

    def allocate(self, nbytes: int) -> DeviceBuffer:
        allocation = self._cuda.call(self._cuda.driver.mem_alloc, nbytes)
        return DeviceBuffer(int(allocation), nbytes, lambda: self._cuda.call(allocation.free))

    def stream(self) -> Stream:
        return _PycudaStream(self._cuda)

    def memory(self) -> tuple[int, int]:
        free, total = self._cuda.call(self._cuda.driver.mem_get_info)
        return int(free), int(total)

    def release(self) -> None:
        context, self._context = self._context, None
        if context is not None:
            # Detached while current, so pycuda pops it as it destroys it.
            self._cuda.call(context.push)
            self._cuda.call(context.detach)


def _distribution_version(*names: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "unknown"
