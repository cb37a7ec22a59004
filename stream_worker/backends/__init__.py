"""Inference backends: ONNX Runtime on the CPU, TensorRT on NVIDIA GPUs.

One module per concern, imported directly (this package file imports nothing, so that the
settings can read the cache default without loading numpy and OpenCV):

- ``base``: the ``Backend`` protocol, ``EngineInfo``, ``check_batch``
- ``registry``: ``open_backend`` (the engine's sidecar picks the backend), ``verify_engine``,
  and the lookup of the default-engine provider
- ``sidecar``: reading engine sidecars and checking them against this machine
- ``cache``: the default cache directory
- ``onnxruntime``, ``tensorrt``: the backends themselves
- ``cuda_memory``: the few CUDA calls the TensorRT backend makes (context, pinned and device
  buffers, stream), through cuda-python or pycuda, whichever is installed
"""
