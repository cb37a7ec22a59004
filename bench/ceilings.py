"""The benchmark's ceilings: what decode and inference alone could do on this machine.

1. decode: full-size vs reduced-scale (DCT) JPEG decode + preprocessing, per frame size;
2. inference: each CPU engine at batch 1, 8, 32 and the worker's batch size;
and the same inference table for TensorRT engines where a GPU and TensorRT exist.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.engines import measure
from bench.frames import encoded_frames
from bench.host import cache_dir
from engine_build.default import default_onnx_path
from stream_worker.backends.base import Backend, EngineInfo
from stream_worker.backends.onnxruntime import OnnxRuntimeBackend
from stream_worker.backends.registry import verify_engine
from stream_worker.decode import DecodeLimits, decode_into, probe
from stream_worker.errors import EngineError
from stream_worker.preprocess import PreprocessSpec, preprocess_into


def decode_ceiling(frames: list[bytes], spec: PreprocessSpec, repeats: int) -> dict[str, dict[str, float]]:
    """Frames/s and CPU-ms/frame of full decode + preprocess vs the worker's guarded reduced decode."""
    cv2.setNumThreads(1)
    out = np.empty((3, spec.height, spec.width), np.float32)

    def full(data: bytes) -> None:
        image = np.asarray(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), dtype=np.uint8)
        preprocess_into(image, out, spec)

    result = {"full": timed(full, frames, repeats), "reduced": reduced_decode(frames, spec, repeats)}
    header = probe(frames[0], "image/jpeg", DecodeLimits())
    result["frame"] = {
        "width": header.width,
        "height": header.height,
        "bytes_avg": float(np.mean([len(f) for f in frames])),
    }
    return result


def reduced_decode(frames: list[bytes], spec: PreprocessSpec, repeats: int) -> dict[str, float]:
    """Frames/s and CPU-ms/frame of the worker's guarded reduced decode + preprocess, one thread."""
    cv2.setNumThreads(1)
    out = np.empty((3, spec.height, spec.width), np.float32)
    limits = DecodeLimits()
    return timed(lambda data: decode_into(data, "image/jpeg", out, spec, limits), frames, repeats)


def timed(fn: Callable[[bytes], object], frames: list[bytes], repeats: int) -> dict[str, float]:
    """``fn`` over every frame ``repeats`` times (after one warm-up call): frames/s, CPU-ms/frame."""
    fn(frames[0])
    wall0, cpu0 = time.perf_counter(), time.process_time()
    n = 0
    for _ in range(repeats):
        for data in frames:
            fn(data)
            n += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"fps": n / wall, "cpu_ms_per_frame": 1000 * cpu / n, "frames": n}


def inference_ceiling(engines: dict[str, Path], seconds: float, worker_batch: int) -> list[dict[str, Any]]:
    """Images/s and CPU-ms/image per engine and batch size, on real preprocessed frames."""
    rows = []
    frames = encoded_frames("720p", max(32, worker_batch), cache_dir())
    for precision, path in engines.items():
        backend = OnnxRuntimeBackend(EngineInfo.from_sidecar(path, verify_engine(path)))
        rows.extend(measure_batches(backend, precision, frames, seconds, worker_batch))
    return rows


def decoded(frames: list[bytes], spec: PreprocessSpec) -> np.ndarray:
    """``frames`` through the serving decode and preprocessing, as one batch."""
    images = np.empty((len(frames), 3, spec.height, spec.width), np.float32)
    for i, data in enumerate(frames):
        decode_into(data, "image/jpeg", images[i], spec, DecodeLimits())
    return images


def served_layout_inference(
    path: Path, sessions: int, threads: int, batch: int, seconds: float
) -> dict[str, float]:
    """Images/s and CPU-ms/image of ``sessions`` sessions of ``threads`` intra-op threads each,
    all running batches at once, as the worker runs them (``inference_layout``): inference alone
    in the layout served, the stricter basis for a ceiling."""
    frames = encoded_frames("720p", batch, cache_dir())
    backends = [
        OnnxRuntimeBackend(EngineInfo.from_sidecar(path, verify_engine(path)), threads=threads)
        for _ in range(sessions)
    ]
    try:
        images = decoded(frames, backends[0].info.spec)
        for backend in backends:  # warm-up: the arena
            backend.infer(images)
        counts = [0] * sessions
        wall0, cpu0 = time.perf_counter(), time.process_time()

        def loop(i: int) -> None:
            while time.perf_counter() - wall0 < seconds:
                backends[i].infer(images)
                counts[i] += len(images)

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(sessions)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        n = sum(counts)
        return {
            "sessions": sessions,
            "threads": threads,
            "batch": batch,
            "images_per_s": n / wall,
            "cpu_ms_per_image": 1000 * cpu / n,
        }
    finally:
        for backend in backends:
            backend.close()


def measure_batches(
    backend: Backend, precision: str, frames: list[bytes], seconds: float, worker_batch: int
) -> list[dict[str, Any]]:
    """Decode ``frames`` through the serving path, then time the engine at batch 1, 8, 32 and
    ``worker_batch``; closes it."""
    try:
        images = decoded(frames, backend.info.spec)
        return [
            {"precision": precision, "batch": batch, **measure(backend.infer, images[:batch], seconds)}
            for batch in sorted({1, 8, worker_batch, 32})
        ]
    finally:
        backend.close()


def gpu_section(seconds: float, worker_batch: int) -> dict[str, Any]:
    """TensorRT engines by precision and batch size, where a GPU and TensorRT exist; else why not.

    Engines are built into the cache dir once and reused while their sidecars still match this
    GPU, this TensorRT and the model. ``python -m bench.gpu_check`` proves the path first.
    """
    from stream_worker.backends.tensorrt import TensorRTBackend, runtime_version_and_gpu

    try:
        version, gpu = runtime_version_and_gpu()
    except EngineError as exc:
        return {"skipped": str(exc)}
    from engine_build.tensorrt import build_tensorrt_engine

    frames = encoded_frames("720p", max(32, worker_batch), cache_dir())
    profile = (1, worker_batch, max(32, worker_batch))
    rows: list[dict[str, Any]] = []
    for precision in ("fp32", "fp16", "int8"):
        path = cache_dir() / f"trt-{precision}-b{profile[2]}.plan"
        try:
            verify_engine(path)
        except EngineError:  # missing or stale: build
            build_tensorrt_engine(
                default_onnx_path(), path, precision=precision, batch_profile=profile, progress=False
            )
        backend = TensorRTBackend(EngineInfo.from_sidecar(path, verify_engine(path)))
        rows.extend(measure_batches(backend, precision, frames, seconds, worker_batch))
    return {"tensorrt": version, "gpu": gpu, "rows": rows}
