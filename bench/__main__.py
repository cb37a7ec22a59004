"""lookout's benchmark, in one run on one machine: ceilings, end to end, naive baseline, memory.

    .venv/bin/python -m bench [--quick] [--no-services] [--scaling] [--size 720p|1080p]

1. decode ceiling: full-size vs reduced-scale (DCT) JPEG decode + preprocessing, 1080p and 720p;
2. inference ceiling: each CPU engine (fp32, int8) at batch 1, 8, 32 and the worker's default;
3. end to end: frames produced by a separate process to the real broker, labelled, published and
   counted by a worker process: maximum sustained throughput, then latency (captured-at to label
   record) at 50% and 80% of it, and where the CPU went (worker, broker, Redis);
4. the naive consumer (one message at a time) against the same broker and frames;
5. ratios; 6. the worker's peak RSS and its growth over a soak at 80% load.

Writes bench/results/<date>-<machine>[-1080p][-quick].json and a PNG plot beside it, and prints a table.
``--quick`` (CI's smoke test) uses fewer frames and shorter phases; it fails only on errors,
never on slow numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.engines import measure
from bench.frames import SIZES, SOURCE_NOTE, encoded_frames
from bench.frames import frames_file as cached_frames
from engine_build.cpu import build_cpu_engine
from stream_worker.backends.base import Backend, EngineInfo, default_onnx_path, verify_engine
from stream_worker.backends.onnxruntime import OnnxRuntimeBackend
from stream_worker.decode import DecodeLimits, decode_into, probe
from stream_worker.errors import EngineError
from stream_worker.preprocess import PreprocessSpec, preprocess_into

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PY = sys.executable
WORKER_DEFAULT_BATCH = 16


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- 1. decode


def decode_ceiling(frames: list[bytes], spec: PreprocessSpec, repeats: int) -> dict[str, dict[str, float]]:
    """Frames/s and CPU-ms/frame of full decode + preprocess vs the worker's guarded reduced decode."""
    cv2.setNumThreads(1)
    out = np.empty((3, spec.height, spec.width), np.float32)
    limits = DecodeLimits()

    def full(data: bytes) -> None:
        image = np.asarray(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), dtype=np.uint8)
        preprocess_into(image, out, spec)

    def reduced(data: bytes) -> None:
        decode_into(data, "image/jpeg", out, spec, limits)

    result = {}
    for name, fn in (("full", full), ("reduced", reduced)):
        fn(frames[0])
        wall0, cpu0 = time.perf_counter(), time.process_time()
        n = 0
        for _ in range(repeats):
            for data in frames:
                fn(data)
                n += 1
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        result[name] = {"fps": n / wall, "cpu_ms_per_frame": 1000 * cpu / n, "frames": n}
    header = probe(frames[0], "image/jpeg", limits)
    result["frame"] = {
        "width": header.width,
        "height": header.height,
        "bytes_avg": float(np.mean([len(f) for f in frames])),
    }
    return result


# --------------------------------------------------------------------------- 2. inference


def inference_ceiling(engines: dict[str, Path], seconds: float) -> list[dict[str, Any]]:
    """Images/s and CPU-ms/image per engine and batch size, on real preprocessed frames."""
    rows = []
    frames = encoded_frames("720p", 32, cache_dir())
    for precision, path in engines.items():
        backend = OnnxRuntimeBackend(EngineInfo.from_sidecar(path, verify_engine(path)))
        rows.extend(measure_batches(backend, precision, frames, seconds))
    return rows


def measure_batches(
    backend: Backend, precision: str, frames: list[bytes], seconds: float
) -> list[dict[str, Any]]:
    """Decode ``frames`` through the serving path, then time the engine at each batch size; closes it."""
    try:
        spec = backend.info.spec
        images = np.empty((len(frames), 3, spec.height, spec.width), np.float32)
        for i, data in enumerate(frames):
            decode_into(data, "image/jpeg", images[i], spec, DecodeLimits())
        return [
            {"precision": precision, "batch": batch, **measure(backend.infer, images[:batch], seconds)}
            for batch in (1, 8, WORKER_DEFAULT_BATCH, 32)
        ]
    finally:
        backend.close()


def gpu_section(seconds: float) -> dict[str, Any]:
    """TensorRT engines by precision and batch size, where a GPU and TensorRT exist; else why not."""
    from stream_worker.backends.tensorrt import TensorRTBackend, import_tensorrt, runtime_version_and_gpu

    try:
        import_tensorrt()
        version, gpu = runtime_version_and_gpu()
    except EngineError as exc:
        return {"skipped": str(exc)}
    from engine_build.tensorrt import build_tensorrt_engine

    frames = encoded_frames("720p", 32, cache_dir())
    rows: list[dict[str, Any]] = []
    for precision in ("fp32", "fp16", "int8"):
        path = cache_dir() / f"trt-{precision}.plan"
        build_tensorrt_engine(
            default_onnx_path(), path, precision=precision, batch_profile=(1, 16, 32), progress=False
        )
        backend = TensorRTBackend(EngineInfo.from_sidecar(path, verify_engine(path)))
        rows.extend(measure_batches(backend, precision, frames, seconds))
    return {"tensorrt": version, "gpu": gpu, "rows": rows}


# --------------------------------------------------------------------------- 3-6. end to end


def cache_dir() -> Path:
    """Where engines and encoded frames are kept between runs."""
    return Path(os.environ.get("LOOKOUT_CACHE_DIR", Path.home() / ".cache" / "lookout")) / "bench"


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its finished children are not counted)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of a process from /proc, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def service_pids() -> dict[str, int]:
    """Pids of the broker and Redis started by scripts/services (for the CPU split)."""
    state = Path(os.environ.get("LOOKOUT_STATE_DIR", REPO / ".state"))
    pids = {}
    for name, pidfile in (
        ("broker", state / "kafka" / "kafka.pid"),
        ("redis", state / "redis" / "redis.pid"),
    ):
        try:
            pids[name] = int(pidfile.read_text())
        except (OSError, ValueError):
            continue
    return pids


class LabelReader:
    """Reads the labels topic continuously in the background; frame ids and latencies by phase."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.records: list[dict[str, Any]] = []
        self._consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start reading."""
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    value = json.loads(r.value)
                    self.records.append(
                        {
                            "frame_id": value["frame_id"],
                            "captured_at": value["captured_at"],
                            "processed_at": value["processed_at"],
                            "seen_at": time.time() * 1000,
                        }
                    )

    def phase(self, prefix: str) -> list[dict[str, Any]]:
        """Label records of one producer phase."""
        return [r for r in self.records if r["frame_id"].startswith(prefix + "/")]

    async def wait_for(self, prefix: str, count: int, timeout_s: float) -> list[dict[str, Any]]:
        """Until ``count`` labels of the phase arrived; raises after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while len(self.phase(prefix)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(self.phase(prefix))}/{count} labels for {prefix} in {timeout_s:.0f} s"
                )
            await asyncio.sleep(0.2)
        return self.phase(prefix)

    async def stop(self) -> None:
        """Stop reading."""
        if self._task is not None:
            self._task.cancel()
        await self._consumer.stop()


async def produce(
    frames_file: Path,
    topic: str,
    bootstrap: str,
    prefix: str,
    *,
    rate: float = 0.0,
    seconds: float = 0.0,
    count: int = 0,
) -> dict[str, float]:
    """Run bench.producer as a separate process."""
    cmd = [
        PY,
        "-m",
        "bench.producer",
        "--frames",
        str(frames_file),
        "--topic",
        topic,
        "--bootstrap",
        bootstrap,
        "--prefix",
        prefix,
        "--rate",
        str(rate),
        "--seconds",
        str(seconds),
        "--count",
        str(count),
    ]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=REPO, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"producer failed ({proc.returncode})")
    result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max of a list of latencies."""
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
    a = np.asarray(values)
    return {
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "n": len(values),
    }


async def create_topics(bootstrap: str, partitions: dict[str, int]) -> None:
    """Create the run's own topics (name -> partitions)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, n, 1) for name, n in partitions.items()])
    finally:
        await admin.close()


def start_worker(
    engine: Path, bootstrap: str, redis_url: str, topic: str, run: str, port: int, **extra: str
) -> subprocess.Popen[bytes]:
    """``stream-worker run`` as its own process on ``topic``, with the run's group and key prefix."""
    env = {
        **os.environ,
        "LOOKOUT_ENGINE": str(engine),
        "LOOKOUT_METRICS_PORT": str(port),
        "KAFKA_BOOTSTRAP": bootstrap,
        "REDIS_URL": redis_url,
        "LOOKOUT_FRAMES_TOPIC": topic,
        "LOOKOUT_LABELS_TOPIC": f"{topic}.labels",
        "LOOKOUT_COUNTS_TOPIC": f"{topic}.counts",
        "LOOKOUT_REVIEW_TOPIC": f"{topic}.review",
        "LOOKOUT_GROUP": f"bench-{run}",
        "LOOKOUT_KEY_PREFIX": f"bench-{run}",
        "LOOKOUT_LOG_LEVEL": "WARNING",
        **extra,
    }
    return subprocess.Popen([str(Path(PY).parent / "stream-worker"), "run"], cwd=REPO, env=env)


async def end_to_end(
    args: argparse.Namespace, bootstrap: str, redis_url: str, engine: Path
) -> dict[str, Any]:
    """Max throughput, latency at 50%/80%, CPU split, soak; then the naive baseline on the same frames."""
    q = args.quick
    n_max = 300 if q else 2000
    latency_s = 10.0 if q else 30.0
    soak_s = 20.0 if q else 300.0
    naive_n = 100 if q else 400
    size = args.size
    frames = encoded_frames(size, 250, cache_dir())
    frames_file = cached_frames(size, 250, cache_dir())
    run = uuid.uuid4().hex[:8]
    topic = f"bench-{run}"
    await create_topics(bootstrap, {topic: 4, f"{topic}.naive-labels": 1})

    log(
        f"e2e: producing {n_max} frames ({size}, {np.mean([len(f) for f in frames]) / 1000:.0f} kB avg) "
        f"to {topic}"
    )
    await produce(frames_file, topic, bootstrap, "max", count=n_max)

    metrics_port = free_port()
    worker = start_worker(engine, bootstrap, redis_url, topic, run, metrics_port)
    labels = LabelReader(bootstrap, f"{topic}.labels")
    result: dict[str, Any] = {"frames": f"{SOURCE_NOTE}; {size}, quality 85", "topic_partitions": 4}
    try:
        deadline = time.monotonic() + 180
        while (
            not Path(f"/proc/{worker.pid}").exists() or worker.poll() is not None or not _ready(metrics_port)
        ):
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited with {worker.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("worker not ready in 180 s")
            await asyncio.sleep(0.5)
        await _wait_topic(bootstrap, f"{topic}.labels")
        await labels.start()
        pids = {"worker": worker.pid, **service_pids()}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        t0 = time.monotonic()
        got = await labels.wait_for("max", n_max, timeout_s=60 + n_max)
        wall = time.monotonic() - t0
        cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
        first = min(r["processed_at"] for r in got)
        last = max(r["processed_at"] for r in got)
        # Drain rate from the first to the last label: the worker never waited for frames.
        e2e_fps = (len(got) - 1) / max(1e-3, (last - first) / 1000)
        result["max"] = {
            "frames": len(got),
            "e2e_fps": e2e_fps,
            "wall_s": wall,
            "cpu_s_per_frame": {k: (cpu1[k] - cpu0[k]) / len(got) for k in pids},
        }
        log(f"e2e: max sustained {e2e_fps:.1f} frames/s")

        for load in (0.5, 0.8):
            rate = load * e2e_fps
            prefix = f"load{int(load * 100)}"
            sent = await produce(frames_file, topic, bootstrap, prefix, rate=rate, seconds=latency_s)
            got = await labels.wait_for(prefix, int(sent["sent"]), timeout_s=120)
            latencies = [r["processed_at"] - r["captured_at"] for r in got]
            result[prefix] = {"rate": rate, "sent": sent["sent"], "latency_ms": percentiles(latencies)}
            log(f"e2e: {load:.0%} load ({rate:.1f}/s): p99 {result[prefix]['latency_ms']['p99']:.0f} ms")

        # Soak at 80%: RSS after warm-up (first fifth) vs at the end.
        log(f"soak: {soak_s:.0f} s at 80% load")
        samples: list[tuple[float, float]] = []
        soak = asyncio.create_task(
            produce(frames_file, topic, bootstrap, "soak", rate=0.8 * e2e_fps, seconds=soak_s)
        )
        start = time.monotonic()
        while not soak.done():
            samples.append((time.monotonic() - start, rss_mb(worker.pid)))
            await asyncio.sleep(1.0)
        sent = await soak
        await labels.wait_for("soak", int(sent["sent"]), timeout_s=120)
        warm = [m for t, m in samples if t >= soak_s / 5]
        base = warm[0] if warm else samples[0][1]
        result["soak"] = {
            "seconds": soak_s,
            "rss_mb_after_warmup": base,
            "rss_mb_end": samples[-1][1],
            "rss_growth_pct": 100 * (samples[-1][1] - base) / base,
            "samples": samples[::5],
        }
        result["peak_rss_mb"] = rss_mb(worker.pid, "VmHWM")
    finally:
        await labels.stop()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
    log(f"naive: {naive_n} frames one at a time")
    proc = await asyncio.create_subprocess_exec(
        PY,
        "-m",
        "bench.naive",
        "--topic",
        topic,
        "--out-topic",
        f"{topic}.naive-labels",
        "--bootstrap",
        bootstrap,
        "--count",
        str(naive_n),
        "--engine",
        str(engine),
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError("naive consumer failed")
    result["naive"] = json.loads(out.decode().strip().splitlines()[-1])
    log(f"naive: {result['naive']['fps']:.1f} frames/s")
    return result


async def scaling(
    bootstrap: str, redis_url: str, engine: Path, frames_count: int, size: str
) -> dict[str, Any]:
    """Drain throughput of one worker process vs two in one group, on a 4-partition topic."""
    frames_file = cached_frames(size, 250, cache_dir())
    out: dict[str, Any] = {}
    for workers in (1, 2):
        run = uuid.uuid4().hex[:8]
        topic = f"bench-scale-{run}"
        await create_topics(bootstrap, {topic: 4})
        procs = []
        ports = []
        for i in range(workers):
            ports.append(free_port())
            procs.append(
                start_worker(
                    engine, bootstrap, redis_url, topic, run, ports[-1], LOOKOUT_CLIENT_ID=f"bench-{i}"
                )
            )
        labels = LabelReader(bootstrap, f"{topic}.labels")
        try:
            deadline = time.monotonic() + 180
            while not all(_ready(p) for p in ports):
                if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                    raise RuntimeError("a scaling worker did not start")
                await asyncio.sleep(0.5)
            await asyncio.sleep(8)  # let the group settle: every worker owns partitions
            await _wait_topic(bootstrap, f"{topic}.labels")
            await labels.start()
            await produce(frames_file, topic, bootstrap, "scale", count=frames_count)
            got = await labels.wait_for("scale", frames_count, timeout_s=60 + frames_count)
            first = min(r["processed_at"] for r in got)
            last = max(r["processed_at"] for r in got)
            out[f"{workers}_workers_fps"] = (len(got) - 1) / max(1e-3, (last - first) / 1000)
            log(f"scaling: {workers} worker(s): {out[f'{workers}_workers_fps']:.1f} frames/s")
        finally:
            await labels.stop()
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
    return out


def _ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def _wait_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for _ in range(60):
            if topic in await admin.list_topics():
                return
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


# --------------------------------------------------------------------------- report


def plot(result: dict[str, Any], path: Path) -> None:
    """Throughput and latency against offered load, and RSS over the soak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e = result["end_to_end"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    names = ["naive", "lookout e2e", "CPU ceiling"]
    values = [result["naive_fps"], result["e2e_fps"], result["ceiling_fps"]]
    ax.bar(names, values, color=["#999999", "#2b7bb9", "#c7e0f4"])
    ax.set_ylabel("frames/s")
    machine = ", 2-core machine" if os.cpu_count() == 2 else ""
    ax.set_title(f"Throughput ({result['settings']['frames']} frames{machine})")
    loads = [50, 80]
    ax = axes[1]
    for key, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-")):
        ax.plot(loads, [e2e[f"load{x}"]["latency_ms"][key] for x in loads], style, label=key)
    ax.set_xlabel("offered load, % of max throughput")
    ax.set_ylabel("captured-at to label, ms")
    ax.set_title("End-to-end latency vs load")
    ax.legend()
    ax = axes[2]
    samples = e2e["soak"]["samples"]
    ax.plot([s[0] for s in samples], [s[1] for s in samples])
    ax.set_xlabel("soak time, s")
    ax.set_ylabel("worker RSS, MiB")
    ax.set_ylim(0, max(s[1] for s in samples) * 1.15)  # from zero: growth is read against the whole
    ax.set_title("Memory at 80% load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """Run every section and assemble the results."""
    if not args.no_services:
        subprocess.run([str(REPO / "scripts" / "services"), "up"], check=True)
    env_lines = subprocess.run(
        [str(REPO / "scripts" / "services"), "env"], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    env = dict(line.removeprefix("export ").split("=", 1) for line in env_lines)
    bootstrap, redis_url = env["KAFKA_BOOTSTRAP"], env["REDIS_URL"]

    spec = PreprocessSpec.from_metadata({})
    engines = {}
    for precision in ("fp32", "int8"):
        path = cache_dir() / f"engine-{precision}.onnx"
        try:
            verify_engine(path)
        except EngineError:  # stale or missing: rebuild
            log(f"building the {precision} CPU engine")
            build_cpu_engine(default_onnx_path(), path, precision=precision, progress=False)
        engines[precision] = path
        spec = EngineInfo.from_sidecar(path, verify_engine(path)).spec

    log("decode ceiling")
    n_decode = 16 if args.quick else 64
    decode = {
        size: decode_ceiling(encoded_frames(size, n_decode, cache_dir()), spec, 1 if args.quick else 3)
        for size in ("1080p", "720p")
    }
    log("inference ceiling")
    inference = inference_ceiling(engines, 1.0 if args.quick else 4.0)
    log("GPU section (TensorRT)")
    gpu = gpu_section(1.0 if args.quick else 4.0)
    if "skipped" in gpu:
        log(f"GPU section skipped: {gpu['skipped']}")
    e2e = await end_to_end(args, bootstrap, redis_url, engines["fp32"])
    scale = await scaling(bootstrap, redis_url, engines["fp32"], 600, args.size) if args.scaling else {}

    def row(precision: str, batch: int) -> dict[str, Any]:
        return next(r for r in inference if r["precision"] == precision and r["batch"] == batch)

    cores = os.cpu_count() or 1
    decode_ms = decode[args.size]["reduced"]["cpu_ms_per_frame"]
    per_frame_cpu_s = (decode_ms + row("fp32", WORKER_DEFAULT_BATCH)["cpu_ms_per_image"]) / 1000
    ceiling = cores / per_frame_cpu_s
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {
            "cores": cores,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "note": "broker, Redis, producer and worker share the cores",
        },
        "settings": {
            "engine": "onnxruntime fp32 (default)",
            "max_batch": WORKER_DEFAULT_BATCH,
            "max_wait_ms": 25,
            "frames_partitions": 4,
            "frames": args.size,
        },
        "e2e_fps": e2e["max"]["e2e_fps"],
        "naive_fps": e2e["naive"]["fps"],
        "ceiling_fps": ceiling,
        "p99_ms_at_50pct": e2e["load50"]["latency_ms"]["p99"],
        "p99_ms_at_80pct": e2e["load80"]["latency_ms"]["p99"],
        "int8_speedup": row("int8", WORKER_DEFAULT_BATCH)["images_per_s"]
        / row("fp32", WORKER_DEFAULT_BATCH)["images_per_s"],
        "decode_reduced_speedup": decode["1080p"]["reduced"]["fps"] / decode["1080p"]["full"]["fps"],
        "peak_rss_mb": e2e["peak_rss_mb"],
        "rss_growth_pct": e2e["soak"]["rss_growth_pct"],
        "ratios": {
            "e2e_vs_naive": e2e["max"]["e2e_fps"] / e2e["naive"]["fps"],
            "e2e_vs_ceiling": e2e["max"]["e2e_fps"] / ceiling,
        },
        "decode": decode,
        "inference": inference,
        "gpu": gpu,
        "scaling": scale,
        "end_to_end": e2e,
    }


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke test: small and short (< 3 min)")
    parser.add_argument("--no-services", action="store_true", help="Kafka and Redis are already up")
    parser.add_argument("--scaling", action="store_true", help="also measure one worker process against two")
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="720p", help="frame size of the end-to-end and scaling runs"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    started = time.monotonic()
    result = asyncio.run(main_async(args))
    result["bench_seconds"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("" if args.size == "720p" else f"-{args.size}") + ("-quick" if args.quick else "")
    stem = f"{datetime.now(UTC):%Y-%m-%d}-{platform.node() or 'machine'}{suffix}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"{stem}.png")
    print(f"results: {args.out / (stem + '.json')}")
    for key in (
        "e2e_fps",
        "naive_fps",
        "ceiling_fps",
        "p99_ms_at_50pct",
        "p99_ms_at_80pct",
        "int8_speedup",
        "decode_reduced_speedup",
        "peak_rss_mb",
        "rss_growth_pct",
    ):
        print(f"  {key:<24} {result[key]:10.2f}")
    print(f"  {'e2e / naive':<24} {result['ratios']['e2e_vs_naive']:10.2f}")
    print(f"  {'e2e / CPU ceiling':<24} {result['ratios']['e2e_vs_ceiling']:10.2f}")


if __name__ == "__main__":
    main()
