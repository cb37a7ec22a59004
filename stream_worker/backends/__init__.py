"""Inference backends: ONNX Runtime on the CPU, TensorRT on NVIDIA GPUs.

Open an engine with :func:`open_backend`; its sidecar decides which backend runs it.
"""

from stream_worker.backends.base import (
    Backend,
    EngineInfo,
    default_engine_path,
    default_onnx_path,
    ensure_default_engine,
    open_backend,
)

__all__ = [
    "Backend",
    "EngineInfo",
    "default_engine_path",
    "default_onnx_path",
    "ensure_default_engine",
    "open_backend",
]
