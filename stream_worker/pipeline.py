"""record -> slot -> batch -> engine -> taxonomy -> results: the engine side of lookout.

It knows nothing of Kafka clients or Redis: it takes records (anything shaped like a consumed
Kafka record: the worker's aiokafka records, the Faust agent's events) and leaves on each
:class:`Batch` what the sinks publish. The worker and the Faust agent both drive it.

* :meth:`Pipeline.add` parses one record (header guards) into a batch: a dead letter, or a frame
  whose decode + preprocess runs on the decode pool straight into a slot of the batch's
  preallocated buffer. A slot points back to its frame (``Batch.slot_frames``), so one frame may
  one day fill several slots (per-camera zones) without the batch changing shape.
* :meth:`Pipeline.classify` waits for the decodes, runs the engine on the one inference thread
  that owns it, applies the engine's serving temperature (``stream_worker.calibration``) and the
  taxonomy the engine's own class names bind, and derives the counted-frame records per
  partition and the drift snapshot per source.

Thresholds: an engine calibrated by ``engine-build calibrate`` carries a roll-up threshold (with
per-label exceptions) and a review threshold fitted on its calibrated scores. :meth:`Pipeline.open`
uses them in place of the built-in defaults, never in place of a value the user set
(``stream_worker.settings.with_engine_calibration``); :attr:`Pipeline.settings` is the result, the
tree the sinks must use.

An ONNX Runtime engine may be opened as several sessions (``--inference-sessions``), each owned
by a thread of its own: consecutive batches then run side by side, each on one session, and a
batch takes the first session free. Buffers come from a small pool (one filling, one per
session in inference, one spare); :meth:`can_take` tells the caller whether another record can
go into a batch now, so the caller never waits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from stream_worker import codec, counting
from stream_worker.backends.base import Backend, EngineInfo
from stream_worker.counting import CountedFrame, DriftSnapshot, WindowCounts
from stream_worker.decode import DecodeLimits, decode_into
from stream_worker.errors import BadFrame, LookoutError
from stream_worker.frames import Frame, FrameLabels, Prediction, SourceKind
from stream_worker.observability import Metrics
from stream_worker.settings import Settings, check_label_thresholds, with_engine_calibration
from stream_worker.stages import StageClock
from stream_worker.taxonomy import Taxonomy
from stream_worker.threads import named_pool

SPARE_BUFFERS = 2  # besides one per session in inference: one filling, one spare
MULTI_SESSION_BACKENDS = frozenset({"onnxruntime"})
"""Backends whose engine may be opened more than once (TensorRT owns one CUDA context)."""


def inference_layout(sessions: int, threads: int, backend: str, cores: int) -> tuple[int, int]:
    """``(sessions, intra-op threads per session)`` from the settings (0 = auto) and the cores.

    Auto: ONNX Runtime gets two sessions (one only on one core), each with an equal share of the
    cores (measured on 2 cores: two one-thread sessions spend about 13 % less CPU per image than
    one session on two threads, and unlike one one-thread session they can still use both cores
    when inference is the bottleneck; docs/BENCHMARKS.md). Other backends get one session.
    """
    if backend not in MULTI_SESSION_BACKENDS:
        return 1, threads
    chosen = sessions or min(2, max(1, cores))
    return chosen, threads or max(1, cores // chosen)


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota; at least one.

    A container's CPU limit (Kubernetes ``resources.limits.cpu``, ``docker --cpus``) is a CFS
    quota, not an affinity: the process still sees every core of the node. Sizing thread pools
    by the node (16 intra-op threads in a 2-CPU pod) makes them fight for the quota and get
    throttled, so the quota, rounded up to whole cores, caps the count.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota_cores(
        _read_text(CGROUP_V2_CPU_MAX), _read_text(CGROUP_V1_QUOTA), _read_text(CGROUP_V1_PERIOD)
    )
    return max(1, min(cores, quota) if quota else cores)


CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_quota_cores(v2_cpu_max: str | None, v1_quota: str | None, v1_period: str | None) -> int | None:
    """Whole cores a cgroup CPU quota allows (rounded up), or ``None`` when there is no quota.

    cgroup v2 ``cpu.max`` reads ``"max 100000"`` (no limit) or ``"200000 100000"`` (2 CPUs);
    cgroup v1 splits the two numbers into ``cpu.cfs_quota_us`` (``-1``: no limit) and
    ``cpu.cfs_period_us``. Anything unreadable counts as no quota.
    """
    quota, period = None, None
    if v2_cpu_max:
        parts = v2_cpu_max.split()
        if len(parts) == 2 and parts[0] != "max":
            quota, period = parts
    elif v1_quota and v1_period:
        quota, period = v1_quota.strip(), v1_period.strip()
    try:
        q, p = int(quota or "-1"), int(period or "0")
    except ValueError:
        return None
    if q <= 0 or p <= 0:
        return None
    return max(1, math.ceil(q / p))


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


log = logging.getLogger("lookout.pipeline")

PartitionKey = tuple[str, int]
"""(topic, partition); equal to, and hashed like, aiokafka's ``TopicPartition``."""

FloatArray = npt.NDArray[np.float32]


class Record(Protocol):
    """What the pipeline reads of a consumed record."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int | None: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@dataclass(slots=True)
class DeadFrame:
    """A record that will never be classified, on its way to the dead-letter topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    error: BadFrame

    @classmethod
    def of_record(cls, record: Record, error: BadFrame) -> DeadFrame:
        """A record refused before decoding (its headers), kept byte for byte."""
        headers = tuple(record.headers or ())
        return cls(record.topic, record.partition, record.offset, record.key, record.value, headers, error)

    @classmethod
    def of_frame(cls, frame: Frame, error: BadFrame) -> DeadFrame:
        """A frame whose image could not be decoded, with its record's own key and headers."""
        return cls(frame.topic, frame.partition, frame.offset, frame.key, frame.data, frame.headers, error)


class Decodes:
    """A batch's decodes on the decode pool, waited for with one event-loop wake-up in all.

    Each decode starts on the pool the moment its record is added (``run_in_executor`` would do
    that too), but a frame's decode finishing does not wake the event loop: only the last one of
    a batch that is already being waited for does. ``run_in_executor`` wakes the loop once per
    frame (a self-pipe write, a ``select`` return, a future callback: measured 0.2-0.3 CPU-ms per
    frame in the worker's flame graph, docs/BENCHMARKS.md).
    """

    __slots__ = ("_futures", "_lock", "_pending", "_waiter")

    def __init__(self) -> None:
        self._futures: list[concurrent.futures.Future[Any]] = []
        self._lock = threading.Lock()
        self._pending = 0
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def submit(self, pool: concurrent.futures.Executor, fn: Callable[..., Any], *args: Any) -> None:
        """Start ``fn(*args)`` on ``pool``."""
        with self._lock:
            self._pending += 1
        try:
            future = pool.submit(fn, *args)
        except BaseException:  # the pool has shut down: this decode will never finish
            with self._lock:
                self._pending -= 1
            raise
        self._futures.append(future)
        future.add_done_callback(self._one_done)

    def _one_done(self, _: concurrent.futures.Future[Any]) -> None:
        """On the decode thread (or the caller's, for a decode done before the callback was added)."""
        with self._lock:
            self._pending -= 1
            waiter = self._waiter if self._pending == 0 else None
        if waiter is not None:
            loop, done = waiter
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(_resolve, done)

    async def results(self) -> list[Any]:
        """Each decode's return value or exception, in the order they were submitted."""
        with self._lock:
            if self._pending:
                loop = asyncio.get_running_loop()
                self._waiter = (loop, loop.create_future())
            waiter = self._waiter
        if waiter is not None:
            await waiter[1]
        return [_outcome(f) for f in self._futures]


def _outcome(future: concurrent.futures.Future[Any]) -> Any:
    """A finished decode's return value, or its exception (a cancelled one: ``CancelledError``)."""
    if future.cancelled():
        return concurrent.futures.CancelledError()
    return future.exception() or future.result()


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


@dataclass(slots=True)
class Batch:
    """One micro-batch: its records, and what classification left on it for the sinks."""

    opened_at: float
    buffer: FloatArray | None = None
    frames: list[Frame] = field(default_factory=list)
    slot_frames: list[int] = field(default_factory=list)  # the frame (index) each buffer slot holds
    decodes: Decodes = field(default_factory=Decodes)  # one per slot
    dead: list[DeadFrame] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    offsets: dict[PartitionKey, int] = field(default_factory=dict)  # last offset seen per partition
    records: int = 0
    bytes: int = 0  # of the records' values: what the in-flight byte budget holds
    counted: dict[PartitionKey, list[CountedFrame]] = field(default_factory=dict)
    drift: dict[str, DriftSnapshot] = field(default_factory=dict)  # per source, after classification
    windows: dict[PartitionKey, tuple[WindowCounts, ...]] = field(default_factory=dict)  # by the counts sink
    clock: StageClock = field(default_factory=StageClock)  # where its time went (stream_worker.stages)

    @property
    def slots(self) -> int:
        """Buffer slots in use."""
        return len(self.slot_frames)

    @classmethod
    def merged(cls, batches: Sequence[Batch]) -> Batch:
        """Classified batches, in the order they were closed, as one delivery to the sinks.

        Every sink write is idempotent per frame and the Redis watermark is per partition, so
        writing several batches as one changes nothing but the number of round trips: one
        produce flush, one Redis call per partition and one commit for all of them.
        """
        out = cls(opened_at=batches[0].opened_at)
        for batch in batches:
            out.frames += batch.frames
            out.dead += batch.dead
            out.predictions += batch.predictions
            out.offsets.update(batch.offsets)  # a later batch holds a partition's later offsets
            out.records += batch.records
            out.bytes += batch.bytes
            for key, counted in batch.counted.items():
                out.counted.setdefault(key, []).extend(counted)
            out.drift.update(batch.drift)  # a later snapshot of a source replaces an earlier one
        return out


class Pipeline:
    """Fills batches from records and classifies them on the engine's own thread."""

    def __init__(
        self,
        settings: Settings,
        backend_factory: Callable[[], Backend],
        *,
        metrics: Metrics,
        wrap_backend: Callable[[Backend], Backend] = lambda backend: backend,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._settings = settings
        self._backend_factory = backend_factory
        self._wrap_backend = wrap_backend
        self._metrics = metrics
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        b = settings.batch
        self._limits = DecodeLimits.of(b)
        self._max_skew_ms = int(b.max_clock_skew_s * 1000)
        # The pool is the parallelism; OpenCV's own threads would only fight it for the cores.
        cv2.setNumThreads(1)
        self.decode_pool = named_pool(b.decode_threads, "lk-decode")
        # One thread per engine session; the first is opened before the layout is known.
        self._infer_pools = [named_pool(1, "lk-infer-0")]
        self._free_sessions: asyncio.Queue[int] | None = None
        self._drift = self._drift_tracker(settings)
        self._rollup_label_thresholds: dict[str, float] = {}
        self._backends: list[Backend] = []
        self._taxonomy: Taxonomy | None = None
        self._buffers: list[FloatArray] = []
        self._buffer_freed = asyncio.Event()
        self.max_batch = b.max_batch

    @property
    def sessions(self) -> int:
        """Engine sessions classifying side by side (after :meth:`open`)."""
        return len(self._backends)

    # ----------------------------------------------------------------- lifecycle

    async def open(self) -> EngineInfo:
        """Load the engine's sessions, each on its own thread; bind the taxonomy; allocate the buffers."""
        loop = asyncio.get_running_loop()
        e = self._settings.engine
        # Each backend is created on its inference thread: it owns the engine (and a CUDA context).
        # The first one tells which backend this is, and so how many sessions it may have.
        opened = [await loop.run_in_executor(self._infer_pools[0], self._backend_factory)]
        info = opened[0].info
        sessions, _ = inference_layout(
            e.inference_sessions, e.inference_threads, info.backend, usable_cores()
        )
        try:
            for i in range(1, sessions):
                pool = named_pool(1, f"lk-infer-{i}")
                self._infer_pools.append(pool)
                opened.append(await loop.run_in_executor(pool, self._backend_factory))
        except BaseException:
            # The sessions already open are not the pipeline's yet: close() would not see them.
            for pool, backend in zip(self._infer_pools, opened, strict=False):
                await loop.run_in_executor(pool, backend.close)
            raise
        self._backends = [self._wrap_backend(b) for b in opened]
        self._free_sessions = asyncio.Queue()
        for i in range(len(self._backends)):
            self._free_sessions.put_nowait(i)
        self._metrics.serving(info)
        self._taxonomy = Taxonomy.for_engine(info)
        # Settings were checked against the taxonomy the sidecar named; this is the one bound.
        check_label_thresholds(
            self._settings, self._taxonomy.labels, f"taxonomy {self._taxonomy.version} of engine {info.path}"
        )
        self._use_engine_calibration(info)
        self.max_batch = max(1, min(self._settings.batch.max_batch, info.max_batch))
        shape = (self.max_batch, 3, info.spec.height, info.spec.width)
        self._buffers = [
            np.zeros(shape, dtype=np.float32) for _ in range(len(self._backends) + SPARE_BUFFERS)
        ]
        await self._warm_up(opened)
        return info

    async def _warm_up(self, backends: list[Backend]) -> None:
        """Run a full batch twice on every session before the first frame.

        An engine allocates its working memory on first use: ONNX Runtime's arena grows to the
        largest batch it has run (133 MB per session for the shipped model at batch 16), and
        the second run of a shape adds the block its memory pattern planned on the first (30 MB
        more); TensorRT sets up its execution context. Done here, that memory is held from
        start-up instead of appearing during the first busy minute, and no real batch is the
        slow first one. The unwrapped backends run it, so fault injection never counts it.
        """
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        zeros = np.zeros_like(self._buffers[0])

        def twice(backend: Backend) -> None:
            backend.infer(zeros)
            backend.infer(zeros)

        pools = zip(self._infer_pools, backends, strict=True)
        await asyncio.gather(*(loop.run_in_executor(pool, twice, b) for pool, b in pools))
        log.info(
            "engine warmed up: %d session(s), batch %d in %.0f ms",
            len(backends),
            self.max_batch,
            (time.perf_counter() - started) * 1000,
        )

    def _use_engine_calibration(self, info: EngineInfo) -> None:
        """Take the engine's fitted thresholds where the user set none, and say which were taken."""
        calibration = info.calibration
        settings, taken = with_engine_calibration(self._settings, calibration, info.path.name)
        per_label = dict(calibration.rollup_label_thresholds)
        # Fitted together with the engine's roll-up threshold: a roll-up threshold the user set
        # replaces them as well.
        if settings.origin("labels", "rollup_threshold").kind != "engine":
            per_label = {}
        unknown = sorted(set(per_label) - set(self.taxonomy.labels))
        if unknown:
            raise LookoutError(
                f"engine {info.path}: its calibration names label(s) {', '.join(unknown)}, "
                f"which taxonomy {self.taxonomy.version} does not have; recalibrate it"
            )
        self._settings, self._rollup_label_thresholds = settings, per_label
        self._drift = self._drift_tracker(settings)
        if calibration.serving_temperature != 1.0 or taken:
            values = {"rollup_threshold": settings.labels.rollup_threshold}
            values["review_threshold"] = settings.counts.review_threshold
            fitted = ", ".join(f"{name} {values[name]:g}" for name in taken) or "no threshold (yours are set)"
            log.info(
                "engine %s is calibrated: serving temperature %.4g; thresholds from the engine: %s%s",
                info.path.name,
                calibration.serving_temperature,
                fitted,
                f", per-label roll-up {per_label}" if per_label else "",
            )

    @staticmethod
    def _drift_tracker(settings: Settings) -> counting.DriftTracker:
        return counting.DriftTracker(
            settings.counts.drift_window_frames,
            settings.counts.review_threshold,
            limits=settings.counts.source_limits,
        )

    @property
    def settings(self) -> Settings:
        """The settings in force: the user's, with the engine's fitted thresholds where none was set."""
        return self._settings

    async def close(self) -> None:
        """Release the engine's sessions (each on its thread) and the thread pools."""
        backends, self._backends = self._backends, []
        loop = asyncio.get_running_loop()
        for pool, backend in zip(self._infer_pools, backends, strict=False):
            await loop.run_in_executor(pool, backend.close)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        for pool in self._infer_pools:
            pool.shutdown(wait=False)

    @property
    def info(self) -> EngineInfo:
        """The opened engine's description."""
        if not self._backends:
            raise LookoutError("the pipeline is not open")
        return self._backends[0].info

    @property
    def taxonomy(self) -> Taxonomy:
        """The taxonomy bound to the opened engine's class names."""
        if self._taxonomy is None:
            raise LookoutError("the pipeline is not open")
        return self._taxonomy

    @property
    def model(self) -> dict[str, str]:
        """The ``model`` object of every label record: the engine, its file's digest, the taxonomy applied."""
        info = self.info
        return {
            "name": info.model_name,
            "version": info.model_version,
            "backend": info.backend,
            "precision": info.precision,
            "engine_sha256": info.engine_sha256,
            "onnx_sha256": info.onnx_sha256,
            "taxonomy_version": self.taxonomy.version,
        }

    # ----------------------------------------------------------------- filling

    def can_take(self, batch: Batch | None) -> bool:
        """Whether one more record can go into ``batch`` (or a new batch) without waiting."""
        return (batch is not None and batch.buffer is not None) or bool(self._buffers)

    async def wait_for_buffer(self, timeout_s: float) -> bool:
        """Until a batch buffer is free, at most ``timeout_s``; whether one is.

        The poll stage waits here while fetched records queue for a buffer: it wakes the moment a
        batch leaves inference, not a whole poll interval later (at 80 % load that interval was
        up to 100 ms of a frame's latency).
        """
        if self._buffers:
            return True
        self._buffer_freed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._buffer_freed.wait()
        return bool(self._buffers)

    def full(self, batch: Batch) -> bool:
        """Whether every slot of the batch is taken."""
        return batch.slots >= self.max_batch

    def add(self, batch: Batch, record: Record) -> None:
        """Parse one record into ``batch``: a dead letter, or a frame whose decode is under way.

        Synchronous on purpose: a rebalance callback can never see a half-added record. The
        caller makes sure :meth:`can_take` holds.
        """
        key = (record.topic, record.partition)
        batch.records += 1
        batch.bytes += len(record.value or b"")
        batch.offsets[key] = record.offset
        try:
            frame = codec.frame_from_record(
                record.topic,
                record.partition,
                record.offset,
                record.timestamp,
                record.key,
                record.value,
                list(record.headers or ()),
                max_skew_ms=self._max_skew_ms,
            )
        except BadFrame as exc:
            batch.dead.append(DeadFrame.of_record(record, exc))
            return
        if batch.buffer is None:
            batch.buffer = self._buffers.pop()
            batch.opened_at = time.monotonic()
        slot = batch.buffer[batch.slots]
        batch.slot_frames.append(len(batch.frames))
        batch.frames.append(frame)
        batch.decodes.submit(
            self.decode_pool, decode_into, frame.data, frame.content_type, slot, self.info.spec, self._limits
        )

    # ----------------------------------------------------------------- classifying

    async def classify(self, batch: Batch) -> None:
        """Wait for the batch's decodes, run the engine and the taxonomy; the buffer goes back."""
        if batch.buffer is None:
            return
        started = time.monotonic()
        batch.clock.stamp("taken", started)
        results = await batch.decodes.results()
        decoded = time.monotonic()
        batch.clock.stamp("decoded", decoded)
        self._metrics.decoded(decoded - started)
        good: list[int] = []
        for slot, result in enumerate(results):
            frame = batch.frames[batch.slot_frames[slot]]
            if isinstance(result, BadFrame):
                batch.dead.append(DeadFrame.of_frame(frame, result))
            elif isinstance(result, BaseException):
                # An unexpected decoder exception is still about this frame's bytes.
                error = BadFrame("decode", "decoder_error", f"{result.__class__.__name__}: {result}")
                batch.dead.append(DeadFrame.of_frame(frame, error))
            else:
                good.append(slot)
        buffer = batch.buffer
        try:
            if good:
                labels = await self._run_session(buffer, batch.slots, good)
                inferred = time.monotonic()
                batch.clock.stamp("inferred", inferred)
                self._metrics.classified(inferred - decoded, len(good))
                now_ms = self._clock_ms()
                for slot, frame_labels in zip(good, labels, strict=True):
                    frame = batch.frames[batch.slot_frames[slot]]
                    latency_ms = float(now_ms - frame.captured_at_ms)
                    batch.predictions.append(Prediction(frame, frame_labels, now_ms, latency_ms))
        finally:
            batch.buffer = None
            batch.decodes = Decodes()
            self._buffers.append(buffer)
            self._buffer_freed.set()
        self._summarise(batch)

    async def _run_session(self, buffer: FloatArray, slots: int, good: list[int]) -> list[FrameLabels]:
        """Classify on the first free session (batches queue for one in the order they ask)."""
        free = self._free_sessions
        if free is None or not self._backends:
            raise LookoutError("the pipeline is closed")
        session = await free.get()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._infer_pools[session], self._infer, self._backends[session], buffer, slots, good
            )
        finally:
            free.put_nowait(session)

    def _infer(self, backend: Backend, buffer: FloatArray, slots: int, good: list[int]) -> list[FrameLabels]:
        """Runs on the session's thread: engine, then taxonomy (both CPU-bound)."""
        probs = backend.infer(buffer[:slots])
        if len(good) != slots:
            probs = probs[good]
        probs = backend.info.calibration.apply(probs)
        lab = self._settings.labels
        return self.taxonomy.classify(
            probs,
            mode=lab.label_mode,  # type: ignore[arg-type]
            rollup_threshold=lab.rollup_threshold,
            rollup_label_thresholds=self._rollup_label_thresholds or None,
            thresholds=lab.label_thresholds or None,
            default_threshold=lab.default_label_threshold,
            top_k=lab.top_k,
        )

    def _summarise(self, batch: Batch) -> None:
        """The counted-frame records per partition and the drift snapshot per source."""
        parents = self.taxonomy.parent_labels
        now_ms = time.monotonic() * 1000
        for p in batch.predictions:
            frame = p.frame
            events: tuple[str, ...] | None = None
            scores: tuple[float, ...] = ()
            if frame.source_kind is SourceKind.WILDLIFE:
                events = tuple(sorted(counting.species_of(p.result.labels, parents)))
                best = {label.label: label.score for label in p.result.labels}
                scores = tuple(round(float(best[s]), 4) for s in events)
            batch.counted.setdefault((frame.topic, frame.partition), []).append(
                CountedFrame(
                    frame.offset,
                    frame.source_id,
                    frame.captured_at_ms,
                    tuple(sorted(counting.counted_labels(p.result.labels))),
                    events,
                    scores,
                )
            )
            top = p.result.labels[0].label if p.result.labels else "unknown"
            self._drift.observe(frame.source_id, top, p.result.best_score, now_ms=now_ms)
        for source in {p.frame.source_id for p in batch.predictions}:
            batch.drift[source] = self._drift.snapshot(source)
        # After the snapshots: a batch's own sources are never forgotten before they are read.
        self._drift.forget(now_ms)


__all__ = ["Batch", "DeadFrame", "PartitionKey", "Pipeline", "Record"]
