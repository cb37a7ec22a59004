"""The consume -> decode -> infer -> publish -> count -> commit loop: the one place that wires it all.

Three asyncio tasks form a pipeline joined by queues, so decoding of the next batch overlaps
inference of this one and publishing of the last:

* **poll**: ``getmany`` from the frames topics, header checks, decode + preprocess submitted to a
  thread pool straight into a slot of a preallocated batch buffer; closes a batch at
  ``max_batch`` frames or ``max_wait_ms`` after its first frame. It never waits: while
  ``max_in_flight`` frames are uncommitted, or fetched frames wait for a free batch buffer, it
  pauses every partition and keeps polling, and resumes when there is room.
* **infer**: waits for the batch's decodes, runs the engine on the one inference thread that owns
  it, applies the taxonomy.
* **sink**: labels, dead letters and review samples to Kafka (idempotent producer, acks=all,
  all acknowledged), then one Lua call per partition-batch to Redis (exactly-once through the
  partition's offset watermark), then the absolute window counts to the compacted counts topic,
  then, only then, the offset commit. A retriable failure retries the unfinished steps of the same
  batch with backoff; anything else stops the worker loudly.

Batches leave each stage in the order they entered it, so commits only ever move forward.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import os
import signal
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from redis import exceptions as redis_errors

from stream_worker import codec, counting
from stream_worker.backends.base import Backend, EngineInfo
from stream_worker.batching import BatchPolicy, InFlight
from stream_worker.decode import DecodeLimits, decode_into
from stream_worker.errors import BadFrame, LookoutError
from stream_worker.frames import Frame, FrameLabels, Prediction, SourceKind
from stream_worker.kafka import (
    ensure_topics,
    frames_subscription,
    kafka_failure,
    make_consumer,
    make_producer,
)
from stream_worker.observability import Metrics
from stream_worker.settings import Settings
from stream_worker.sinks.counts import CountedFrame, RedisCounts, WindowCounts, make_redis
from stream_worker.taxonomy import Taxonomy

log = logging.getLogger("lookout.worker")

BUFFER_POOL_SIZE = 3  # one filling, one in inference, one spare


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


@dataclass(slots=True)
class Batch:
    """One micro-batch moving through the pipeline, with what each stage left on it."""

    opened_at: float
    buffer: npt.NDArray[np.float32] | None = None
    frames: list[Frame] = field(default_factory=list)
    decodes: list[asyncio.Future[Any]] = field(default_factory=list)
    dead: list[DeadFrame] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # last offset seen per partition
    records: int = 0
    # Progress, so a retry redoes only what failed.
    published: bool = False
    counted: set[TopicPartition] = field(default_factory=set)
    windows: dict[TopicPartition, tuple[WindowCounts, ...]] = field(default_factory=dict)
    counts_published: bool = False
    drift: dict[str, counting.DriftSnapshot] = field(default_factory=dict)  # per source, once published


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self._worker.on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self._worker.on_assigned(list(assigned))


class Worker:
    """One lookout worker: a consumer-group member that labels and counts frames."""

    def __init__(
        self,
        settings: Settings,
        *,
        backend_factory: Callable[[], Backend],
        taxonomy: Taxonomy,
        metrics: Metrics | None = None,
        clock_ms: Callable[[], int] | None = None,
        create_topics: bool = True,
    ) -> None:
        self.settings = settings
        # Dead-letter topics known to exist: with --frames-pattern, a new frames topic's one is
        # made on its first bad frame (unless create_topics is off, as with --no-create-topics).
        self._create_topics = create_topics
        self._dead_letter_topics: set[str] = set()
        self.metrics = metrics or Metrics()
        self._backend_factory = backend_factory
        self._taxonomy = taxonomy
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        b = settings.batch
        self._limits = DecodeLimits(max_frame_bytes=b.max_frame_bytes, max_pixels=b.max_pixels)
        self._windows = [counting.WindowSpec.parse(w) for w in settings.counts.windows]
        self._event_gap_ms = int(settings.counts.event_gap_s * 1000)
        self._review_cutoff = int(settings.counts.review_sample_rate * 10_000)
        # The pool is the parallelism; OpenCV's own threads would only fight it for the cores.
        cv2.setNumThreads(1)
        self._decode_pool = ThreadPoolExecutor(b.decode_threads, thread_name_prefix="lookout-decode")
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="lookout-infer")
        self._backend: Backend | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._redis: aioredis.Redis | None = None
        self._counts: RedisCounts | None = None
        self._parent_labels = frozenset(p for p in taxonomy.parents.values() if p)
        self._drift = counting.DriftTracker(
            settings.counts.drift_window_frames, settings.counts.review_threshold
        )
        self._pool: asyncio.Queue[npt.NDArray[np.float32]] = asyncio.Queue()
        # Unbounded on purpose: the in-flight limit and the buffer pool bound them, and the poll
        # stage must never wait on a later stage.
        self._infer_q: asyncio.Queue[Batch | None] = asyncio.Queue()
        self._sink_q: asyncio.Queue[Batch | None] = asyncio.Queue()
        self._open: Batch | None = None
        self._in_flight = InFlight(b.max_in_flight)
        self._drained = asyncio.Event()
        self._drained.set()
        self._paused = False
        # True until the first assignment has been checked against the Redis watermarks.
        self._rebalancing = True
        self._held: list[dict[TopicPartition, list[Any]]] = []
        self._backlog: collections.deque[tuple[TopicPartition, Any]] = collections.deque()
        self._max_batch = b.max_batch
        self._policy = BatchPolicy(b.max_batch, b.max_wait_ms)
        self._model: dict[str, str] = {}
        self._ready = False
        self._last_poll = time.monotonic()
        self._fatal: BaseException | None = None
        self._abandon = asyncio.Event()
        self._live_last: dict[str, float] = {}
        self._resume_at: dict[TopicPartition, int] = {}
        self._infer_delay_s = settings.faults.fault_infer_delay_ms / 1000
        stage, _, nth = settings.faults.fault_kill_at.partition(":")
        self._kill_stage, self._kill_countdown = (stage, int(nth)) if stage else ("", 0)
        self.started = asyncio.Event()

    # ----------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Load the engine (on the inference thread), allocate the batch buffers, connect the sinks."""
        loop = asyncio.get_running_loop()
        # The backend is created on the inference thread: it owns the engine (and a CUDA context).
        self._backend = await loop.run_in_executor(self._infer_pool, self._backend_factory)
        info = self._backend.info
        self._max_batch = max(1, min(self.settings.batch.max_batch, info.max_batch))
        self._policy = BatchPolicy(self._max_batch, self.settings.batch.max_wait_ms)
        self._model = {
            "name": info.model_name,
            "version": info.model_version,
            "backend": info.backend,
            "precision": info.precision,
        }
        height, width = info.spec.height, info.spec.width
        for _ in range(BUFFER_POOL_SIZE):
            self._pool.put_nowait(np.zeros((self._max_batch, 3, height, width), dtype=np.float32))

        s = self.settings
        self._redis = make_redis(s.redis)
        self._counts = RedisCounts(
            self._redis,
            key_prefix=s.redis.key_prefix,
            ttl_s=s.redis.counts_ttl_s,
            event_gap_ms=self._event_gap_ms,
            windows=[(w.name, w.size_ms) for w in self._windows],
        )
        self._producer = make_producer(s.kafka, client_id_suffix="worker")
        await self._producer.start()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (then drain within the deadline) or a fatal error is raised."""
        await self.open()
        s = self.settings
        info = self.backend_info
        self._consumer = make_consumer(s.kafka, s.topics.group, max_poll_records=self._max_batch * 4)
        listener = _Rebalance(self)
        if s.topics.frames_pattern:
            self._consumer.subscribe(pattern=frames_subscription(s.topics), listener=listener)
        else:
            self._consumer.subscribe(topics=list(s.topics.frames_topic), listener=listener)
        try:
            await self._consumer.start()
        except KafkaError as exc:  # e.g. the group's ACL refuses the worker: say so and close cleanly
            await self.close()
            raise kafka_failure(exc, f"joining consumer group {s.topics.group!r}") from exc
        self._ready = True
        self.started.set()
        log.info(
            "worker started",
            extra={
                "engine": info.path.name if hasattr(info.path, "name") else str(info.path),
                "max_batch": self._max_batch,
                "group": s.topics.group,
            },
        )
        pipeline = [
            asyncio.create_task(self._poll_loop(stop), name="poll"),
            asyncio.create_task(self._infer_loop(), name="infer"),
            asyncio.create_task(self._sink_loop(), name="sink"),
        ]
        tasks = [*pipeline, asyncio.create_task(self._lag_loop(), name="lag")]
        try:
            done, _ = await asyncio.wait(pipeline, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                error = None if task.cancelled() else task.exception()
                if error is not None:
                    self._fatal = error
                    raise error
        finally:
            self._ready = False
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()

    @property
    def backend_info(self) -> EngineInfo:
        """The opened engine's description (after :meth:`open`)."""
        if self._backend is None:
            raise LookoutError("the worker is not open")
        return self._backend.info

    @property
    def max_batch(self) -> int:
        """The effective batch size: the setting, capped at the engine's profile."""
        return self._max_batch

    async def process(self, records: Sequence[Any]) -> Batch:
        """Decode, classify, publish and count ``records`` as one batch (no commit).

        For callers that own their consumer and acknowledgements (the Faust agent): returns once
        every sink has the batch; retriable sink failures are retried, others raised.
        """
        if len(records) > self._max_batch:
            raise LookoutError(f"at most {self._max_batch} records per batch, got {len(records)}")
        batch = Batch(opened_at=time.monotonic())
        for record in records:
            self._fill(batch, TopicPartition(record.topic, record.partition), record)
        await self._infer_batch(batch)
        await self._retrying(functools.partial(self._publish, batch))
        await self._publish_live(batch)
        return batch

    async def close(self) -> None:
        """Leave the group, flush and close every client, release the engine."""
        if self._consumer is not None:
            try:
                await self._consumer.stop()  # leaves the group
            except KafkaError as exc:
                log.warning("consumer stop failed: %s", exc)
        if self._producer is not None:
            try:
                await self._producer.stop()
            except KafkaError as exc:
                log.warning("producer stop failed: %s", exc)
        if self._redis is not None:
            await self._redis.aclose()
        backend = self._backend
        if backend is not None:
            await asyncio.get_running_loop().run_in_executor(self._infer_pool, backend.close)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._infer_pool.shutdown(wait=False)

    def live(self) -> tuple[bool, str]:
        """Liveness: the loop answers and the pipeline has not died."""
        if self._fatal is not None:
            return False, f"fatal: {self._fatal}"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Readiness: engine loaded, consumer running, polling recently."""
        if not self._ready:
            return False, "starting or stopping"
        if time.monotonic() - self._last_poll > 30:
            return False, "no poll for 30 s"
        return True, "ok"

    # ----------------------------------------------------------------- poll stage

    async def _poll_loop(self, stop: asyncio.Event) -> None:
        consumer = self._consumer
        assert consumer is not None
        poll_ms = 100
        while not stop.is_set():
            self._backpressure()
            batch = self._open
            size, opened_ms = (len(batch.frames), batch.opened_at * 1000) if batch else (0, 0.0)
            timeout_ms = int(self._policy.wait_ms(size, opened_ms, time.monotonic() * 1000, poll_ms))
            room = max(1, self._in_flight.room)
            try:
                records = await consumer.getmany(
                    timeout_ms=timeout_ms, max_records=min(room, self._max_batch * 4)
                )
            except KafkaError as exc:
                raise kafka_failure(exc, "consuming frames") from exc
            self._last_poll = time.monotonic()
            if self._rebalancing:
                # aiokafka may hand out records while our assignment callback is still seeking
                # to the Redis watermarks: hold them until it is done, then filter them.
                self._held.append(records)
                continue
            if self._held:
                held, self._held = self._held, []
                owned = consumer.assignment()
                for earlier in held:
                    self._consume({tp: rs for tp, rs in earlier.items() if tp in owned})
            self._consume(records)
            self._take_backlog()
            if self._open is not None and self._due(self._open):
                self._close_open()
        self._close_open()
        if not await self._drain(self.settings.ops.drain_deadline_s, "shutdown"):
            # A sink is still failing: stop retrying and leave without committing. The next owner
            # re-reads those frames from the committed offsets and the watermark keeps counts exact.
            self._abandon.set()
        await self._infer_q.put(None)

    def _consume(self, records: dict[TopicPartition, list[Any]]) -> None:
        """Queue fetched records for the batches, skipping any below the resume offset."""
        for tp, batch_records in records.items():
            self.metrics.frames_in.labels(tp.topic).inc(len(batch_records))
            resume_at = self._resume_at.get(tp, -1)
            # Records fetched before our seek to the watermark took effect were already
            # labelled and counted by a previous owner: skip them.
            self._backlog.extend((tp, r) for r in batch_records if r.offset >= resume_at)

    def _take_backlog(self) -> None:
        """Move queued records into batches while there is a free buffer slot for them.

        Never waits: without a free buffer the records stay queued, the partitions are paused
        (see _backpressure) and the loop keeps polling, so a slow engine never makes the
        consumer miss max.poll.interval.ms and drop out of its group.
        """
        while self._backlog and not self._rebalancing:
            batch = self._open
            if (batch is None or batch.buffer is None) and self._pool.empty():
                return
            tp, record = self._backlog.popleft()
            self._add(tp, record)

    def _due(self, batch: Batch) -> bool:
        if not batch.frames:
            return bool(batch.dead)  # only dead letters: nothing to wait for
        return self._policy.due(len(batch.frames), batch.opened_at * 1000, time.monotonic() * 1000)

    def _add(self, tp: TopicPartition, record: Any) -> None:
        if self._open is None:
            self._open = Batch(opened_at=time.monotonic())
        batch = self._open
        self._in_flight.acquire()
        self._drained.clear()
        self._fill(batch, tp, record)
        if len(batch.frames) >= self._max_batch:
            self._close_open()

    def _fill(self, batch: Batch, tp: TopicPartition, record: Any) -> None:
        """Parse one record into ``batch``: a dead letter, or a frame whose decode is under way.

        Synchronous on purpose: a rebalance callback can never see a half-added record.
        """
        batch.records += 1
        batch.offsets[tp] = record.offset
        try:
            frame = codec.frame_from_record(
                record.topic,
                record.partition,
                record.offset,
                record.timestamp,
                record.key,
                record.value,
                list(record.headers),
            )
        except BadFrame as exc:
            batch.dead.append(_dead(record, exc))
            return
        if batch.buffer is None:
            batch.buffer = self._pool.get_nowait()  # the callers made sure one is free
            batch.opened_at = time.monotonic()
        slot = batch.buffer[len(batch.frames)]
        assert self._backend is not None
        spec = self._backend.info.spec
        batch.frames.append(frame)
        batch.decodes.append(
            asyncio.get_running_loop().run_in_executor(
                self._decode_pool, decode_into, frame.data, frame.content_type, slot, spec, self._limits
            )
        )

    def _close_open(self) -> None:
        batch, self._open = self._open, None
        if batch is not None and batch.records:
            self._infer_q.put_nowait(batch)

    def _backpressure(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        if self._rebalancing:
            return  # on_revoked owns the pause state until the new assignment arrives
        full = self._in_flight.full or bool(self._backlog)
        if full and not self._paused:
            consumer.pause(*consumer.assignment())
            self._paused = True
            self.metrics.paused.set(1)
        elif not full and self._paused:
            consumer.resume(*consumer.paused())
            self._paused = False
            self.metrics.paused.set(0)
        self.metrics.in_flight.set(self._in_flight.count)

    # ----------------------------------------------------------------- infer stage

    async def _infer_loop(self) -> None:
        while (batch := await self._infer_q.get()) is not None:
            await self._infer_batch(batch)
            await self._sink_q.put(batch)
        await self._sink_q.put(None)

    async def _infer_batch(self, batch: Batch) -> None:
        """Wait for the batch's decodes, run the engine on the inference thread, apply the taxonomy."""
        if not batch.frames:
            return
        loop = asyncio.get_running_loop()
        backend = self._backend
        assert backend is not None
        started = time.monotonic()
        results = await asyncio.gather(*batch.decodes, return_exceptions=True)
        self.metrics.decode_seconds.observe(time.monotonic() - started)
        good = []
        for i, (frame, result) in enumerate(zip(batch.frames, results, strict=True)):
            if isinstance(result, BadFrame):
                batch.dead.append(_dead_frame(frame, result))
            elif isinstance(result, BaseException):
                # An unexpected decoder exception is still about this frame's bytes.
                error = BadFrame("decode", "decoder_error", f"{result.__class__.__name__}: {result}")
                batch.dead.append(_dead_frame(frame, error))
            else:
                good.append(i)
        buffer = batch.buffer
        assert buffer is not None
        try:
            if good:
                n = len(batch.frames)
                started = time.monotonic()
                labels = await loop.run_in_executor(
                    self._infer_pool, self._classify, backend, buffer, n, good
                )
                self.metrics.inference_seconds.observe(time.monotonic() - started)
                self.metrics.batch_size.observe(len(good))
                now_ms = self._clock_ms()
                for i, result in zip(good, labels, strict=True):
                    frame = batch.frames[i]
                    batch.predictions.append(
                        Prediction(frame, result, now_ms, float(now_ms - frame.captured_at_ms))
                    )
        finally:
            batch.buffer = None
            batch.decodes = []
            self._pool.put_nowait(buffer)

    def _classify(
        self, backend: Backend, buffer: npt.NDArray[np.float32], n: int, good: list[int]
    ) -> list[FrameLabels]:
        """Runs on the inference thread: engine, then taxonomy (both CPU-bound)."""
        probs = backend.infer(buffer[:n])
        if self._infer_delay_s:
            time.sleep(self._infer_delay_s)
        self._fault("inference")
        if len(good) != n:
            probs = probs[good]
        lab = self.settings.labels
        return self._taxonomy.classify(
            probs,
            mode=lab.label_mode,  # type: ignore[arg-type]
            rollup_threshold=lab.rollup_threshold,
            thresholds=lab.label_thresholds or None,
            default_threshold=lab.default_label_threshold,
            top_k=lab.top_k,
        )

    # ----------------------------------------------------------------- sink stage

    async def _sink_loop(self) -> None:
        while (batch := await self._sink_q.get()) is not None:
            started = time.monotonic()
            await self._retrying(functools.partial(self._publish, batch))
            await self._commit(batch)
            self.metrics.sink_seconds.observe(time.monotonic() - started)
            await self._publish_live(batch)
            now_ms = self._clock_ms()
            for p in batch.predictions:
                self.metrics.e2e_seconds.observe(max(0.0, (now_ms - p.frame.captured_at_ms) / 1000))
            self._in_flight.release(batch.records)
            self.metrics.in_flight.set(self._in_flight.count)
            if self._in_flight.count == 0:
                self._drained.set()

    def _fault(self, stage: str) -> None:
        """Test-only fault injection (tests/faults): SIGKILL this process at STAGE:N."""
        if stage != self._kill_stage:
            return
        self._kill_countdown -= 1
        if self._kill_countdown == 0:
            log.warning("fault injection: SIGKILL at %s", stage)
            os.kill(os.getpid(), signal.SIGKILL)

    async def _publish_live(self, batch: Batch) -> None:
        """Best-effort live view for the dashboard: per-source stats, latest labels and thumbnail.

        Never retried and never blocks a commit: it is a view, not a record.
        """
        if self._redis is None or (not batch.predictions and not batch.dead):
            return
        prefix, ttl = f"{self.settings.redis.key_prefix}:live", self.settings.counts.thumbnail_ttl_s
        now = time.monotonic()
        latest: dict[str, Prediction] = {}
        per_source: dict[str, int] = {}
        for p in batch.predictions:
            latest[p.frame.source_id] = p
            per_source[p.frame.source_id] = per_source.get(p.frame.source_id, 0) + 1
        due = [p for s, p in latest.items() if now - self._live_last.get(s, 0.0) >= 1.0]
        thumbs = (
            await asyncio.get_running_loop().run_in_executor(self._decode_pool, _thumbnails, due)
            if due
            else {}
        )
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for source, n in per_source.items():
                    key = f"{prefix}:stats:{source}"
                    snapshot = batch.drift[source]
                    p = latest[source]
                    pipe.hincrby(key, "frames", n)
                    pipe.hset(
                        key,
                        mapping={
                            "kind": p.frame.source_kind.value,
                            "latency_ms": f"{p.latency_ms:.1f}",
                            "low_confidence_share": f"{snapshot.low_confidence_share:.4f}",
                            "label_share": json.dumps(snapshot.label_share),
                            "updated_ms": str(p.processed_at_ms),
                        },
                    )
                    pipe.expire(key, self.settings.redis.counts_ttl_s)
                    pipe.sadd(f"{prefix}:sources", source)
                for d in batch.dead:
                    source = d.key.decode(errors="replace") if d.key else "unknown"
                    pipe.hincrby(f"{prefix}:stats:{source}", "dead", 1)
                for p in due:
                    source = p.frame.source_id
                    self._live_last[source] = now
                    pipe.set(f"{prefix}:frame:{source}", codec.label_record(p, self._model), ex=ttl)
                    if source in thumbs:
                        pipe.set(f"{prefix}:thumb:{source}", thumbs[source], ex=ttl)
                await pipe.execute()
        except redis_errors.RedisError as exc:
            log.debug("live view not updated: %s", exc)

    async def _retrying(self, step: Callable[[], Awaitable[None]]) -> None:
        delay = 0.2
        while True:
            try:
                await self._unless_abandoned(step)
                return
            except LookoutError as exc:
                if not exc.retriable:
                    self._fatal = exc
                    raise
                if self._abandon.is_set():
                    raise LookoutError(
                        f"shutdown: drain deadline passed with {self._in_flight.count} frames uncommitted "
                        f"(they will be read again by the next worker): {exc}"
                    ) from exc
                self.metrics.retries.labels(exc.__class__.__name__).inc()
                log.warning("sink write failed, retrying in %.1fs: %s", delay, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._abandon.wait(), timeout=delay)
                delay = min(delay * 2, self.settings.ops.retry_max_s)

    async def _unless_abandoned(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run one attempt of a sink step; cut it short if shutdown gives up on draining."""
        attempt = asyncio.ensure_future(step())
        abandoned = asyncio.ensure_future(self._abandon.wait())
        try:
            await asyncio.wait({attempt, abandoned}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abandoned.cancel()
        if not attempt.done():
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError, LookoutError):
                await attempt
            raise LookoutError(
                f"shutdown: drain deadline passed with {self._in_flight.count} frames uncommitted "
                "(they will be read again by the next worker)"
            )
        attempt.result()

    async def _publish(self, batch: Batch) -> None:
        producer, counts = self._producer, self._counts
        assert producer is not None and counts is not None
        if not batch.published:
            await self._ensure_dead_letter_topics(batch)
            await self._send_all(producer, self._kafka_records(batch), "publishing labels")
            batch.published = True
            self._count_published(batch)
            self._fault("labels")
        by_partition: dict[TopicPartition, list[CountedFrame]] = {}
        for p in batch.predictions:
            by_partition.setdefault(TopicPartition(p.frame.topic, p.frame.partition), []).append(
                self._counted(p)
            )
        for tp, frames in by_partition.items():
            if tp in batch.counted:
                continue
            result = await counts.apply(tp.topic, tp.partition, frames)
            self.metrics.counts_skipped.inc(len(frames) - result.applied)
            batch.windows[tp] = result.windows
            batch.counted.add(tp)
            self._fault("counts")
        if not batch.counts_published:
            await self._publish_windows(batch.windows)
            batch.counts_published = True

    async def _publish_windows(self, windows: dict[TopicPartition, tuple[WindowCounts, ...]]) -> None:
        producer, counts = self._producer, self._counts
        assert producer is not None and counts is not None
        records: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = []
        for tp, group in windows.items():
            shard = f"{tp.topic}:{tp.partition}"
            for w in group:
                key, value = codec.count_record(
                    w.source_id, w.window, w.start_ms, {"_frames": w.frames, **w.labels}, shard=shard
                )
                records.append((self.settings.topics.counts_topic, key, value, []))
                if w.events:
                    key, value = codec.count_record(
                        w.source_id, w.window, w.start_ms, w.events, "events", shard=shard
                    )
                    records.append((self.settings.topics.counts_topic, key, value, []))
        if not records:
            return
        await self._send_all(producer, records, "publishing counts")
        for tp, group in windows.items():
            await counts.mark_published(tp.topic, tp.partition, group)

    def _kafka_records(self, batch: Batch) -> list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]]:
        topics = self.settings.topics
        out: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = []
        for p in batch.predictions:
            value = codec.label_record(p, self._model)
            out.append((topics.labels_topic, p.frame.source_id.encode(), value, []))
            # Sampling by a hash of the frame id, so a replayed frame is sampled the same way.
            low = p.result.best_score < self.settings.counts.review_threshold
            if low and zlib.crc32(p.frame.frame_id.encode()) % 10_000 < self._review_cutoff:
                out.append(
                    (
                        topics.review_topic,
                        p.frame.source_id.encode(),
                        p.frame.data,
                        [*p.frame.headers, ("lookout-labels", value)],
                    )
                )
                self.metrics.frames_review.inc()
        for d in batch.dead:
            keep = (
                d.value
                if d.value is not None and len(d.value) <= self.settings.batch.max_frame_bytes
                else b""
            )
            headers = codec.dead_letter_headers(
                d.topic, d.partition, d.offset, d.error.stage, d.error.reason, d.error, d.headers
            )
            out.append((topics.dlq_topic.format(topic=d.topic), d.key, keep, headers))
        return out

    async def _ensure_dead_letter_topics(self, batch: Batch) -> None:
        """Create the dead-letter topics this batch needs that are not known to exist yet."""
        topics = self.settings.topics
        wanted = {topics.dlq_topic.format(topic=d.topic) for d in batch.dead} - self._dead_letter_topics
        if wanted and self._create_topics:
            await ensure_topics(
                self.settings.kafka,
                {name: (1, {}) for name in sorted(wanted)},
                replication=topics.topic_replication,
                running=True,
            )
        self._dead_letter_topics |= wanted

    def _count_published(self, batch: Batch) -> None:
        """Metrics and the drift signal for a published batch (per batch, not per frame)."""
        by_topic: dict[str, int] = {}
        for p in batch.predictions:
            by_topic[p.frame.topic] = by_topic.get(p.frame.topic, 0) + 1
            top = p.result.labels[0].label if p.result.labels else "unknown"
            self._drift.observe(p.frame.source_id, top, p.result.best_score)
        for topic, n in by_topic.items():
            self.metrics.frames_out.labels(topic).inc(n)
        for d in batch.dead:
            self.metrics.frames_dead.labels(d.error.stage, d.error.reason).inc()
        for source in {p.frame.source_id for p in batch.predictions}:
            snapshot = batch.drift[source] = self._drift.snapshot(source)
            self.metrics.low_confidence_share.labels(source).set(snapshot.low_confidence_share)
            for label, share in snapshot.label_share.items():
                self.metrics.label_share.labels(source, label).set(share)

    def _counted(self, p: Prediction) -> CountedFrame:
        events: tuple[str, ...] | None = None
        if p.frame.source_kind is SourceKind.WILDLIFE:
            events = tuple(sorted(counting.species_of(p.result.labels, self._parent_labels)))
        return CountedFrame(
            p.frame.offset,
            p.frame.source_id,
            p.frame.captured_at_ms,
            tuple(sorted(counting.counted_labels(p.result.labels))),
            events,
        )

    @staticmethod
    async def _send_all(
        producer: AIOKafkaProducer,
        records: Sequence[tuple[str, bytes | None, bytes, Sequence[tuple[str, bytes]]]],
        what: str,
    ) -> None:
        """Send every record, then wait for every acknowledgement (one flush per batch)."""
        try:
            futures = [
                await producer.send(topic, value, key=key, headers=list(headers) or None)
                for topic, key, value, headers in records
            ]
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise kafka_failure(exc, what) from exc

    async def _commit(self, batch: Batch) -> None:
        consumer = self._consumer
        assert consumer is not None
        owned = consumer.assignment()
        offsets = {tp: OffsetAndMetadata(last + 1, "") for tp, last in batch.offsets.items() if tp in owned}
        if not offsets:
            return
        self._fault("commit")
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The partitions moved to another worker; it resumes from the Redis watermark, so
            # the counts stay exact (labels may repeat, with the same frame ids).
            log.warning("commit refused after a rebalance: %s", exc)
        except KafkaError as exc:
            raise kafka_failure(exc, "committing offsets") from exc

    # ----------------------------------------------------------------- rebalance

    async def _drain(self, deadline_s: float, why: str) -> bool:
        try:
            await asyncio.wait_for(self._drained.wait(), timeout=deadline_s)
            return True
        except TimeoutError:
            log.warning("%s: %d frames still in flight after %.0fs", why, self._in_flight.count, deadline_s)
            return False

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Finish and commit what belongs to the revoked partitions before they move."""
        self._rebalancing = True
        if not revoked:
            return
        consumer = self._consumer
        assert consumer is not None
        # Nothing new from the revoked partitions while their in-flight frames drain; every
        # record already in a batch is finished and committed, never dropped.
        consumer.pause(*[tp for tp in revoked if tp in consumer.assignment()])
        # Queued records were never added to a batch or committed; the next owner (or we, after
        # the reassignment resets positions to the committed offsets) fetches them again.
        self._backlog.clear()
        self._close_open()
        await self._drain(self.settings.ops.drain_deadline_s, "rebalance")

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Resume each partition after the committed offset or the Redis watermark, whichever is further."""
        consumer, counts = self._consumer, self._counts
        assert consumer is not None and counts is not None
        # Records held so far were fetched under the old assignment; the new one starts again from
        # the committed offsets, so they will come back. Those fetched from now on are kept.
        self._held.clear()
        try:
            for tp in assigned:
                watermark = await counts.watermark(tp.topic, tp.partition)
                committed = await consumer.committed(tp)
                if watermark >= 0 and (committed is None or watermark + 1 > committed):
                    log.info(
                        "resuming %s:%d at the Redis watermark %d (committed %s)",
                        tp.topic,
                        tp.partition,
                        watermark + 1,
                        committed,
                    )
                    consumer.seek(tp, watermark + 1)
                    self._resume_at[tp] = watermark + 1
                else:
                    self._resume_at.pop(tp, None)
                dirty = await counts.dirty(tp.topic, tp.partition)
                if dirty:
                    await self._publish_windows({tp: tuple(dirty)})
        except LookoutError as exc:
            # Still safe: the watermark makes any replay a no-op for the counts.
            log.warning("could not check watermarks on assignment: %s", exc)
        finally:
            self._rebalancing = False
            self._paused = False

    async def _lag_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            await asyncio.sleep(5)
            for tp in consumer.assignment():
                try:
                    high = consumer.highwater(tp)
                    position = await consumer.position(tp)
                except (KafkaError, IllegalStateError):
                    continue
                if high is not None:
                    self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, high - position))


THUMBNAIL_WIDTH = 240


def _thumbnails(predictions: list[Prediction]) -> dict[str, bytes]:
    """Small JPEG thumbnails of each source's latest frame (runs on the decode pool)."""
    out: dict[str, bytes] = {}
    for p in predictions:
        image = cv2.imdecode(np.frombuffer(p.frame.data, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
        if image is None:
            continue
        height = max(1, round(image.shape[0] * THUMBNAIL_WIDTH / image.shape[1]))
        small = cv2.resize(image, (THUMBNAIL_WIDTH, height), interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 75])
        if ok:
            out[p.frame.source_id] = data.tobytes()
    return out


def _dead(record: Any, error: BadFrame) -> DeadFrame:
    return DeadFrame(
        record.topic,
        record.partition,
        record.offset,
        record.key,
        record.value,
        tuple(record.headers or ()),
        error,
    )


def _dead_frame(frame: Frame, error: BadFrame) -> DeadFrame:
    return DeadFrame(
        frame.topic, frame.partition, frame.offset, frame.source_id.encode(), frame.data, frame.headers, error
    )


__all__ = ["Batch", "DeadFrame", "Worker"]
