"""The benchmark end to end: worker processes on the real broker and Redis, fed by a producer process.

3. maximum sustained throughput, then latency (captured-at to label record) at 50% and 80% of it,
   and where the CPU went (worker, broker, Redis);
4. the naive consumer (one message at a time) against the same broker and frames;
6. the worker's peak RSS and its growth over a soak at 80% load;
and the maximum sustained throughput alone with another engine (:func:`drain_rate`: the int8
engine in ``python -m bench``, any settings in ``bench.knobs``); on request, one worker process
against two in one group.

Every run gets its own topics (named after its frames topic, as the worker's settings name them),
consumer group and Redis key prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import signal
import statistics
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.frames import SOURCE_NOTE, encoded_frames, frames_file
from bench.host import (
    PY,
    REPO,
    cache_dir,
    cpu_of,
    free_port,
    host_load,
    host_ticks,
    log,
    rss_mb,
    service_pids,
    split_ms_per_frame,
    spread_pct,
    thread_cpu,
)
from bench.trace import read as read_trace
from bench.trace import summarise as summarise_trace
from stream_worker.settings import TopicSettings

TOPIC_PARTITIONS = 4
READY_TIMEOUT_S = 180
LIVE_OVERDRIVE = 1.3
"""The live-capacity phase offers this multiple of the backlog drain rate, so the worker never idles."""


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
    sources: int = 4,
) -> dict[str, float]:
    """Run bench.producer as a separate process (``sources`` cameras, taking turns)."""
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
        "--sources",
        str(sources),
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


async def drop_topics(bootstrap: str, *patterns: str) -> int:
    """Delete every topic whose name matches one of ``patterns`` (``fnmatch``: a run's frames
    topic and ``<topic>.*``, the topics named after it; ``bench-*`` for runs cut short); how many.

    A full ``python -m bench`` writes about 6.5 GB of frames to the broker, kept for its
    retention (24 h): without this, a few runs in a day filled a 64 GiB disk and the broker died.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [n for n in await admin.list_topics() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if names:
            await admin.delete_topics(names)
        return len(names)
    finally:
        await admin.close()


async def wait_topic(bootstrap: str, topic: str) -> None:
    """Until ``topic`` exists (the worker creates its output topics), at most 30 s."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for _ in range(60):
            if topic in await admin.list_topics():
                return
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


def start_worker(
    engine: Path, bootstrap: str, redis_url: str, topic: str, run: str, port: int, **extra: str
) -> subprocess.Popen[bytes]:
    """``stream-worker run`` as its own process on ``topic``, with the run's group and key prefix."""
    topics = TopicSettings.named_after(topic, group=f"bench-{run}")
    env = {
        **os.environ,
        "LOOKOUT_ENGINE": str(engine),
        "LOOKOUT_PRECISION": "auto",  # the engine file decides (a pinned one must match it)
        "LOOKOUT_METRICS_PORT": str(port),
        "KAFKA_BOOTSTRAP": bootstrap,
        "REDIS_URL": redis_url,
        "LOOKOUT_FRAMES_TOPIC": topic,
        "LOOKOUT_LABELS_TOPIC": topics.labels_topic,
        "LOOKOUT_COUNTS_TOPIC": topics.counts_topic,
        "LOOKOUT_REVIEW_TOPIC": topics.review_topic,
        "LOOKOUT_EVENTS_TOPIC": topics.events_topic,
        "LOOKOUT_GROUP": topics.group,
        "LOOKOUT_KEY_PREFIX": f"bench-{run}",
        "LOOKOUT_LOG_LEVEL": "WARNING",
        **extra,
    }
    return subprocess.Popen([str(Path(PY).parent / "stream-worker"), "run"], cwd=REPO, env=env)


def worker_ready(port: int) -> bool:
    """Whether the worker with metrics on ``port`` answers ``/readyz`` with 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def until_ready(worker: subprocess.Popen[bytes], port: int, *, poll_s: float) -> None:
    """Until the worker answers ready on ``port``; fails when it exits or takes too long."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.returncode}")
        if worker_ready(port):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker not ready in {READY_TIMEOUT_S} s")
        await asyncio.sleep(poll_s)


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the worker drains), then SIGKILL if it has not exited within 60 s."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()


def drain_fps(labels: list[dict[str, Any]]) -> float:
    """Frames/s from the first label to the last: the rate of a worker that never waited for frames."""
    first = min(float(r["processed_at"]) for r in labels)
    last = max(float(r["processed_at"]) for r in labels)
    return (len(labels) - 1) / max(1e-3, (last - first) / 1000)


@contextlib.asynccontextmanager
async def fresh_topic(bootstrap: str, kind: str) -> AsyncIterator[tuple[str, str]]:
    """``(run id, topic)``: a new frames topic, partitioned as in the main benchmark; it and the
    topics named after it are deleted on exit."""
    run = uuid.uuid4().hex[:8]
    topic = f"bench-{kind}-{run}"
    await create_topics(bootstrap, {topic: TOPIC_PARTITIONS})
    try:
        yield run, topic
    finally:
        await drop_topics(bootstrap, topic, f"{topic}.*")


@contextlib.asynccontextmanager
async def one_worker(
    engine: Path, bootstrap: str, redis_url: str, topic: str, run: str, extra_env: dict[str, str] | None
) -> AsyncIterator[tuple[subprocess.Popen[bytes], LabelReader]]:
    """A worker process on ``topic`` (ready), and a reader of its labels topic (not started yet:
    the worker creates that topic on its first labels); both stopped on exit."""
    port = free_port()
    worker = start_worker(engine, bootstrap, redis_url, topic, run, port, **(extra_env or {}))
    labels = LabelReader(bootstrap, TopicSettings.named_after(topic).labels_topic)
    try:
        await until_ready(worker, port, poll_s=0.3)
        yield worker, labels
    finally:
        try:
            await labels.stop()
        finally:
            stop_worker(worker)


async def drain_rate(
    bootstrap: str,
    redis_url: str,
    frames: int,
    engine: Path,
    *,
    size: str = "720p",
    extra_env: dict[str, str] | None = None,
    sources: int = 4,
) -> dict[str, Any]:
    """Pre-fill a frames topic (partitioned as in the main benchmark) from ``sources`` cameras,
    start one worker on ``engine``, measure the first-to-last label rate and the worker's CPU per
    frame."""
    async with fresh_topic(bootstrap, "drain") as (run, topic):
        await produce(
            frames_file(size, 250, cache_dir()), topic, bootstrap, "drain", count=frames, sources=sources
        )
        async with one_worker(engine, bootstrap, redis_url, topic, run, extra_env) as (worker, labels):
            await wait_topic(bootstrap, TopicSettings.named_after(topic).labels_topic)
            await labels.start()
            pids = {"worker": worker.pid, **service_pids()}
            cpu0, t0 = cpu_of(pids), time.monotonic()
            threads0 = thread_cpu(worker.pid)
            got = await labels.wait_for("drain", frames, timeout_s=60 + frames)
            cpu1 = cpu_of(pids)
            threads1 = thread_cpu(worker.pid)
            ms = {k: 1000 * (cpu1[k] - cpu0[k]) / frames for k in pids}
            return {
                "engine": engine.name,
                "frames": len(got),
                "fps": drain_fps(got),
                "worker_cpu_ms_per_frame": ms.pop("worker"),
                "worker_cpu_ms_per_frame_by_thread": split_ms_per_frame(threads0, threads1, frames),
                "services_cpu_ms_per_frame": ms,
                "wall_s": time.monotonic() - t0,
            }


async def latency_at(
    bootstrap: str,
    redis_url: str,
    rate: float,
    seconds: float,
    engine: Path,
    *,
    size: str = "720p",
    extra_env: dict[str, str] | None = None,
    sources: int = 4,
) -> dict[str, Any]:
    """Start one worker on ``engine``, produce to it at ``rate`` frames/s for ``seconds`` from
    ``sources`` cameras (the producer process on the same cores, as in the latency phases) and
    read every label back: captured-at to label record, p50/p95/p99."""
    frames_path = frames_file(size, 250, cache_dir())
    async with (
        fresh_topic(bootstrap, "latency") as (run, topic),
        one_worker(engine, bootstrap, redis_url, topic, run, extra_env) as (_, labels),
    ):
        # A few frames first: the worker creates its output topics on its first labels.
        warm = await produce(frames_path, topic, bootstrap, "warm", count=2 * TOPIC_PARTITIONS)
        await wait_topic(bootstrap, TopicSettings.named_after(topic).labels_topic)
        await labels.start()
        await labels.wait_for("warm", int(warm["sent"]), timeout_s=60)
        sent = await produce(
            frames_path, topic, bootstrap, "rate", rate=rate, seconds=seconds, sources=sources
        )
        got = await labels.wait_for("rate", int(sent["sent"]), timeout_s=120)
        return {
            "engine": engine.name,
            "rate": rate,
            "seconds": seconds,
            "sent": sent["sent"],
            "latency_ms": percentiles([r["seen_at"] - r["captured_at"] for r in got]),
        }


async def end_to_end(
    bootstrap: str, redis_url: str, engine: Path, *, naive_engine: Path, size: str, quick: bool
) -> dict[str, Any]:
    """Max throughput, latency at 50%/80%, CPU split, soak, all with ``engine`` (the precision
    served); then the naive baseline, with ``naive_engine`` (FP32, as it always was), on the
    same frames, on a topic of their own (deleted at the end, with every topic named after it)."""
    async with fresh_topic(bootstrap, "e2e") as (run, topic):
        await create_topics(bootstrap, {f"{topic}.naive-labels": 1})
        return await _end_to_end(bootstrap, redis_url, engine, naive_engine, size, quick, run, topic)


async def _end_to_end(
    bootstrap: str,
    redis_url: str,
    engine: Path,
    naive_engine: Path,
    size: str,
    quick: bool,
    run: str,
    topic: str,
) -> dict[str, Any]:
    n_max = 300 if quick else 2000
    # Three runs of 40 s per load: the tail of a 30 s run moved 20-30 % between two benchmark
    # runs on the same machine (2026-12-03).
    latency_s = 10.0 if quick else 40.0
    # Each latency run's load is taken of a capacity measured just before it: on this kind of VM
    # the speed moves by 15-30 % within minutes, and one capacity measured before all six runs
    # made "80 %" an overload when it fell in a fast spell (2026-12-03, fifth session: a basis of
    # 211.6 frames/s, the cores 97-99 % busy, p99 545-6,613 ms).
    probe_s = 5.0 if quick else 15.0
    repeats = 1 if quick else 3
    soak_s = 20.0 if quick else 300.0
    naive_n = 100 if quick else 400
    frames = encoded_frames(size, 250, cache_dir())
    frames_path = frames_file(size, 250, cache_dir())
    labels_topic = TopicSettings.named_after(topic).labels_topic

    log(
        f"e2e: producing {n_max} frames ({size}, {np.mean([len(f) for f in frames]) / 1000:.0f} kB avg) "
        f"to {topic}"
    )
    await produce(frames_path, topic, bootstrap, "max", count=n_max)

    metrics_port = free_port()
    trace_path = cache_dir() / f"trace-{run}.jsonl"
    worker = start_worker(
        engine, bootstrap, redis_url, topic, run, metrics_port, LOOKOUT_TRACE_FILE=str(trace_path)
    )
    labels = LabelReader(bootstrap, labels_topic)
    result: dict[str, Any] = {
        "frames": f"{SOURCE_NOTE}; {size}, quality 85",
        "topic_partitions": TOPIC_PARTITIONS,
        "trace_file": str(trace_path),
    }
    try:
        await until_ready(worker, metrics_port, poll_s=0.5)
        await wait_topic(bootstrap, labels_topic)
        await labels.start()
        pids = {"worker": worker.pid, **service_pids()}
        cpu0 = cpu_of(pids)
        threads0 = thread_cpu(worker.pid)
        t0 = time.monotonic()
        got = await labels.wait_for("max", n_max, timeout_s=60 + n_max)
        wall = time.monotonic() - t0
        cpu1 = cpu_of(pids)
        threads1 = thread_cpu(worker.pid)
        e2e_fps = drain_fps(got)
        result["max"] = {
            "frames": len(got),
            "e2e_fps": e2e_fps,
            "wall_s": wall,
            "cpu_s_per_frame": {k: (cpu1[k] - cpu0[k]) / len(got) for k in pids},
            "worker_cpu_ms_per_frame_by_thread": split_ms_per_frame(threads0, threads1, len(got)),
        }
        log(f"e2e: max sustained {e2e_fps:.1f} frames/s")

        # The live capacity over a longer window, reported on its own; each latency run below
        # takes its load of a shorter probe just before it. A basis is never more than the worker
        # drained alone: on a shared VM a live window can land in a fast spell (run 4 of
        # 2026-12-03: 192 frames/s live against 175 drained), and "80 %" of that was overload.
        capacity = await live_capacity(frames_path, topic, bootstrap, labels, e2e_fps, latency_s)
        result["live"] = capacity
        log(f"e2e: live capacity {capacity['fps']:.1f} frames/s (offered {capacity['offered']:.1f}/s)")

        for load in (0.5, 0.8):
            prefix = f"load{int(load * 100)}"
            runs: list[dict[str, Any]] = []
            pooled: list[float] = []
            for i in range(repeats):
                probe = await live_capacity(
                    frames_path, topic, bootstrap, labels, e2e_fps, probe_s, prefix=f"{prefix}p{i}"
                )
                basis = min(probe["fps"], e2e_fps)
                rate = load * basis
                since, ticks = time.monotonic(), host_ticks()
                sent = await produce(
                    frames_path, topic, bootstrap, f"{prefix}r{i}", rate=rate, seconds=latency_s
                )
                got = await labels.wait_for(f"{prefix}r{i}", int(sent["sent"]), timeout_s=120)
                host = host_load(ticks, host_ticks())
                # Captured-at to the label record read back from the labels topic by a consumer:
                # what a user waits for. processed_at (stamped after inference, before the sinks)
                # would leave out the sinks and the wait for them.
                latencies = [r["seen_at"] - r["captured_at"] for r in got]
                pooled += latencies
                runs.append(
                    {
                        "rate": rate,
                        "load_basis_fps": basis,
                        "capacity_probe": probe,
                        "sent": sent["sent"],
                        "latency_ms": percentiles(latencies),
                        "to_inference_ms": percentiles([r["processed_at"] - r["captured_at"] for r in got]),
                        "stages": summarise_trace(read_trace(trace_path, since, time.monotonic())),
                        "host": host,
                    }
                )
            p99s = [r["latency_ms"]["p99"] for r in runs]
            result[prefix] = {
                "rate": statistics.median(r["rate"] for r in runs),
                "load_basis": (
                    f"each run's: live capacity (producer running) over {probe_s:.0f} s just before it, "
                    "at most the backlog drain rate"
                ),
                "seconds_per_run": latency_s,
                "runs": runs,
                "sent": sum(r["sent"] for r in runs),
                "latency_ms": percentiles(pooled),
                "p99_spread_pct": spread_pct(p99s),
            }
            log(
                f"e2e: {load:.0%} load ({', '.join(format(r['rate'], '.1f') for r in runs)}/s): p99 "
                f"{result[prefix]['latency_ms']['p99']:.0f} ms (runs: {', '.join(f'{p:.0f}' for p in p99s)}; "
                f"cores busy {', '.join(format(r['host']['busy_pct'], '.0f') for r in runs)} %)"
            )

        # Soak at 80% (of the 80 % runs' median basis): RSS after warm-up (first fifth) vs at the end.
        soak_rate = result["load80"]["rate"]
        log(f"soak: {soak_s:.0f} s at 80% load ({soak_rate:.1f}/s)")
        samples: list[tuple[float, float]] = []
        soak = asyncio.create_task(
            produce(frames_path, topic, bootstrap, "soak", rate=soak_rate, seconds=soak_s)
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
        stop_worker(worker)
    log(f"naive: {naive_n} frames one at a time")
    result["naive"] = await naive(bootstrap, topic, f"{topic}.naive-labels", naive_n, naive_engine)
    log(f"naive: {result['naive']['fps']:.1f} frames/s")
    return result


async def live_capacity(
    frames_path: Path,
    topic: str,
    bootstrap: str,
    labels: LabelReader,
    backlog_fps: float,
    seconds: float,
    *,
    prefix: str = "live",
) -> dict[str, Any]:
    """Frames/s the worker labels while the producer runs on the same cores (offered above it).

    The backlog phase measures the worker alone; under live load the producer and the broker's
    writes take CPU too, so this is the capacity that load percentages are taken of. Returns once
    every frame offered is labelled (no backlog is left for what comes next).
    """
    offered = LIVE_OVERDRIVE * backlog_fps
    sent = await produce(frames_path, topic, bootstrap, prefix, rate=offered, seconds=seconds)
    got = await labels.wait_for(prefix, int(sent["sent"]), timeout_s=120 + seconds)
    start = min(float(r["captured_at"]) for r in got)
    # Skip the first fifth (the worker ramping up) and stop when the producer stopped.
    lo, hi = start + 1000 * seconds / 5, start + 1000 * float(sent["seconds"])
    inside = [r for r in got if lo <= float(r["processed_at"]) <= hi]
    return {
        "offered": offered,
        "sent": sent["sent"],
        "achieved_offer": sent["rate"],
        "fps": len(inside) / max(1e-3, (hi - lo) / 1000),
    }


async def naive(bootstrap: str, topic: str, out_topic: str, count: int, engine: Path) -> dict[str, Any]:
    """Run bench.naive (one message at a time) over the first ``count`` frames of ``topic``."""
    proc = await asyncio.create_subprocess_exec(
        PY,
        "-m",
        "bench.naive",
        "--topic",
        topic,
        "--out-topic",
        out_topic,
        "--bootstrap",
        bootstrap,
        "--count",
        str(count),
        "--engine",
        str(engine),
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError("naive consumer failed")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return {**result, "engine": engine.name}


async def scaling(
    bootstrap: str, redis_url: str, engine: Path, frames_count: int, size: str
) -> dict[str, Any]:
    """Drain throughput of one worker process vs two in one group, on a 4-partition topic."""
    frames_path = frames_file(size, 250, cache_dir())
    out: dict[str, Any] = {}
    for workers in (1, 2):
        async with fresh_topic(bootstrap, "scale") as (run, topic):
            labels_topic = TopicSettings.named_after(topic).labels_topic
            procs = []
            ports = []
            for i in range(workers):
                ports.append(free_port())
                procs.append(
                    start_worker(
                        engine, bootstrap, redis_url, topic, run, ports[-1], LOOKOUT_CLIENT_ID=f"bench-{i}"
                    )
                )
            labels = LabelReader(bootstrap, labels_topic)
            try:
                deadline = time.monotonic() + READY_TIMEOUT_S
                while not all(worker_ready(p) for p in ports):
                    if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                        raise RuntimeError("a scaling worker did not start")
                    await asyncio.sleep(0.5)
                await asyncio.sleep(8)  # let the group settle: every worker owns partitions
                await wait_topic(bootstrap, labels_topic)
                await labels.start()
                await produce(frames_path, topic, bootstrap, "scale", count=frames_count)
                got = await labels.wait_for("scale", frames_count, timeout_s=60 + frames_count)
                out[f"{workers}_workers_fps"] = drain_fps(got)
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
