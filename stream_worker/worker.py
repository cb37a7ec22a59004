"""The coordinator: poll, pause/resume, rebalance, retry and commit, wiring the pipeline to the sinks.

Three asyncio tasks joined by queues, so decoding of the next batch overlaps inference of this
one and publishing of the last:

* **poll**: ``getmany`` from the frames topics; each record goes into a batch
  (:meth:`Pipeline.add`: header guards, decode submitted to the decode pool); a batch closes at
  ``max_batch`` slots or ``max_wait_ms`` after its first frame. It never waits: while
  ``max_in_flight`` frames or ``max_in_flight_bytes`` bytes are uncommitted, or fetched records
  wait for a free batch buffer, it pauses every partition and keeps polling, and resumes when
  there is room.
* **infer**: :meth:`Pipeline.classify` (decodes, engine on its own thread, taxonomy).
* **sink**: every sink of :class:`Outputs` in order (labels/review/dead letters, Redis counts,
  window counts), each retried on its own while its failure is retriable, then, only then, the
  offset commit, then the best-effort live view (which runs beside the next delivery). Anything
  not retriable stops the worker loudly.

Batches leave each stage in the order they entered it, so commits only ever move forward.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from stream_worker.backends.base import Backend, EngineInfo
from stream_worker.batching import BatchPolicy, InFlight
from stream_worker.errors import ConfigError, LookoutError
from stream_worker.faults import Faults
from stream_worker.kafka import commit_revoked, frames_subscription, kafka_failure, make_consumer
from stream_worker.observability import Metrics
from stream_worker.pipeline import Batch, Pipeline
from stream_worker.settings import Settings
from stream_worker.sinks import Outputs, Retrier, deliver
from stream_worker.stages import TraceWriter
from stream_worker.topic_ids import TopicIds

log = logging.getLogger("lookout.worker")


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
        metrics: Metrics | None = None,
        clock_ms: Callable[[], int] | None = None,
        create_topics: bool = True,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics.from_settings(settings)
        self._faults = Faults(settings.faults)
        self._pipeline = Pipeline(
            settings,
            backend_factory,
            metrics=self.metrics,
            wrap_backend=self._faults.backend,
            clock_ms=clock_ms,
        )
        self._outputs: Outputs | None = None
        self._create_topics = create_topics
        self._consumer: AIOKafkaConsumer | None = None
        # Unbounded on purpose: the in-flight limit and the buffer pool bound them, and the poll
        # stage must never wait on a later stage.
        self._infer_q: asyncio.Queue[Batch | None] = asyncio.Queue()
        # Batches in the order they were closed, each with its classification (which may run on
        # another engine session alongside the one before it); the sink stage awaits them in order.
        self._sink_q: asyncio.Queue[tuple[Batch, asyncio.Task[None]] | None] = asyncio.Queue()
        self._classifying: set[asyncio.Task[None]] = set()
        # The last delivery's live-view write, running beside the next delivery's sinks.
        self._live: asyncio.Task[None] | None = None
        self._open: Batch | None = None
        self._in_flight = InFlight(settings.batch.max_in_flight, settings.batch.max_in_flight_bytes)
        self._drained = asyncio.Event()
        self._drained.set()
        self._paused = False
        # True until the first assignment has been checked against the Redis watermarks.
        self._rebalancing = True
        self._held: list[dict[TopicPartition, list[Any]]] = []
        # Each fetched record with the monotonic and wall-clock (ms) time its fetch returned.
        self._backlog: collections.deque[tuple[Any, float, float]] = collections.deque()
        self._fetched_at = (time.monotonic(), time.time() * 1000)
        self._trace = TraceWriter(Path(settings.ops.trace_file)) if settings.ops.trace_file else None
        self._policy = BatchPolicy(settings.batch.max_batch, settings.batch.max_wait_ms)
        self._ready = False
        self._last_poll = time.monotonic()
        self._fatal: BaseException | None = None
        self._abandon = asyncio.Event()
        self._retrier = Retrier(
            retry_max_s=settings.ops.retry_max_s,
            metrics=self.metrics,
            abandon=self._abandon,
            pending=lambda: self._in_flight.count,
        )
        self._resume_at: dict[TopicPartition, int] = {}
        # Partitions being revoked: their in-flight batches are still committed during the drain.
        self._revoking: frozenset[TopicPartition] = frozenset()
        self._topic_ids = TopicIds(settings.kafka)
        # A refusal found in a rebalance callback (aiokafka logs and swallows their errors):
        # the poll stage raises it.
        self._refused: ConfigError | None = None
        self.started = asyncio.Event()

    # ----------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Load the engine (on the inference thread), allocate the batch buffers, connect the sinks."""
        await self._pipeline.open()
        self._policy = BatchPolicy(self._pipeline.max_batch, self.settings.batch.max_wait_ms)
        # The engine may supply thresholds the user left at their defaults (its calibration).
        self.settings = self._pipeline.settings
        self._outputs = Outputs(
            self.settings,
            model=lambda: self._pipeline.model,
            metrics=self.metrics,
            executor=self._pipeline.decode_pool,
            faults=self._faults,
            create_topics=self._create_topics,
        )
        await self._outputs.open()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (then drain within the deadline) or a fatal error is raised."""
        try:
            await self.open()
        except BaseException:
            await self.close()  # whatever open() got to: the engine, the producer, the pools
            raise
        s = self.settings
        self._consumer = make_consumer(s.kafka, s.topics.group, max_poll_records=self.max_batch * 4)
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
        info = self.backend_info
        log.info(
            "worker started",
            extra={
                "engine": info.path.name,
                "precision": info.precision,
                "max_batch": self.max_batch,
                "group": s.topics.group,
                "inference_sessions": self._pipeline.sessions,
            },
        )
        stages = [
            asyncio.create_task(self._poll_loop(stop), name="poll"),
            asyncio.create_task(self._infer_loop(), name="infer"),
            asyncio.create_task(self._sink_loop(), name="sink"),
        ]
        tasks = [*stages, asyncio.create_task(self._lag_loop(), name="lag")]
        try:
            done, _ = await asyncio.wait(stages, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                error = None if task.cancelled() else task.exception()
                if error is not None:
                    self._fatal = error
                    raise error
        finally:
            self._ready = False
            background = [*tasks, *self._classifying, *([self._live] if self._live else [])]
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.close()

    @property
    def backend_info(self) -> EngineInfo:
        """The opened engine's description (after :meth:`open`)."""
        return self._pipeline.info

    @property
    def max_batch(self) -> int:
        """The effective batch size: the setting, capped at the engine's profile."""
        return self._pipeline.max_batch

    async def close(self) -> None:
        """Leave the group, flush and close every client, release the engine."""
        if self._consumer is not None:
            try:
                await self._consumer.stop()  # leaves the group
            except KafkaError as exc:
                log.warning("consumer stop failed: %s", exc)
        await self._topic_ids.close()
        if self._outputs is not None:
            await self._outputs.close()
        await self._pipeline.close()
        if self._trace is not None:
            self._trace.close()

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
        if self._retrier.failing is not None:
            since, why = self._retrier.failing
            return False, f"outputs failing for {time.monotonic() - since:.0f} s, retrying: {why}"
        return True, "ok"

    # ----------------------------------------------------------------- poll stage

    async def _poll_loop(self, stop: asyncio.Event) -> None:
        consumer = self._consumer
        assert consumer is not None
        poll_ms = 100
        while not stop.is_set():
            self._backpressure()
            batch = self._open
            size, opened_ms = (batch.slots, batch.opened_at * 1000) if batch else (0, 0.0)
            timeout_ms = int(self._policy.wait_ms(size, opened_ms, time.monotonic() * 1000, poll_ms))
            room = max(1, self._in_flight.room)
            if self._backlog and not self._rebalancing and not self._pipeline.can_take(self._open):
                # Records queue for a batch buffer and the partitions are paused: wake when a
                # batch leaves inference, not at the end of the poll interval, then poll without
                # waiting (the poll itself must still come round for max.poll.interval.ms).
                await self._pipeline.wait_for_buffer(timeout_ms / 1000)
                timeout_ms = 0
            try:
                records = await consumer.getmany(
                    timeout_ms=timeout_ms, max_records=min(room, self.max_batch * 4)
                )
            except KafkaError as exc:
                raise kafka_failure(exc, "consuming frames") from exc
            self._last_poll = time.monotonic()
            self._fetched_at = (self._last_poll, time.time() * 1000)
            if self._refused is not None:
                raise self._refused
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
            self.metrics.consumed(tp.topic, len(batch_records))
            resume_at = self._resume_at.get(tp, -1)
            # Records fetched before our seek to the watermark took effect were already
            # labelled and counted by a previous owner: skip them.
            fetched, fetched_ms = self._fetched_at
            self._backlog.extend((r, fetched, fetched_ms) for r in batch_records if r.offset >= resume_at)

    def _take_backlog(self) -> None:
        """Move queued records into batches while there is a free buffer slot for them.

        Never waits: without a free buffer the records stay queued, the partitions are paused
        (see _backpressure) and the loop keeps polling, so a slow engine never makes the
        consumer miss max.poll.interval.ms and drop out of its group.
        """
        while self._backlog and not self._rebalancing:
            if not self._pipeline.can_take(self._open):
                return
            self._add(*self._backlog.popleft())

    def _due(self, batch: Batch) -> bool:
        if not batch.frames:
            return bool(batch.dead)  # only dead letters: nothing to wait for
        return self._policy.due(batch.slots, batch.opened_at * 1000, time.monotonic() * 1000)

    def _add(self, record: Any, fetched: float, fetched_ms: float) -> None:
        if self._open is None:
            self._open = Batch(opened_at=time.monotonic())
            clock = self._open.clock
            clock.stamp("fetched", fetched)
            clock.stamp("opened", self._open.opened_at)
            clock.first_kafka_ms = record.timestamp
            clock.first_fetched_ms = round(fetched_ms, 3)
        batch = self._open
        self._in_flight.acquire(1, len(record.value or b""))
        self._drained.clear()
        self._pipeline.add(batch, record)
        if self._pipeline.full(batch):
            self._close_open()

    def _close_open(self) -> None:
        batch, self._open = self._open, None
        if batch is not None and batch.records:
            batch.clock.stamp("closed")
            self._infer_q.put_nowait(batch)

    def _backpressure(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        if self._rebalancing:
            return  # on_revoked owns the pause state until the new assignment arrives
        full = self._in_flight.full or bool(self._backlog)
        if full and not self._paused:
            consumer.pause(*consumer.assignment())
            self.metrics.pauses.inc()
            if self._trace is not None:
                self._trace.event("pause", in_flight=self._in_flight.count, backlog=len(self._backlog))
        elif not full and self._paused:
            consumer.resume(*consumer.paused())
            if self._trace is not None:
                self._trace.event("resume", in_flight=self._in_flight.count)
        self._paused = full
        self._report_in_flight(paused=full)

    def _report_in_flight(self, paused: bool | None = None) -> None:
        self.metrics.backpressure(
            in_flight=self._in_flight.count, in_flight_bytes=self._in_flight.bytes, paused=paused
        )

    # ----------------------------------------------------------------- infer and sink stages

    async def _infer_loop(self) -> None:
        # Never waits for a classification: the batch buffers (one per session plus two) bound
        # how many batches can be classifying at once, and the pipeline hands out its sessions.
        while (batch := await self._infer_q.get()) is not None:
            task = asyncio.create_task(self._pipeline.classify(batch), name="classify")
            self._classifying.add(task)
            task.add_done_callback(self._classifying.discard)
            await self._sink_q.put((batch, task))
        await self._sink_q.put(None)

    async def _sink_loop(self) -> None:
        outputs = self._outputs
        assert outputs is not None
        waiting: collections.deque[tuple[Batch, asyncio.Task[None]] | None] = collections.deque()
        while True:
            if not waiting:
                waiting.append(await self._sink_q.get())
            head = waiting.popleft()
            if head is None:
                await self._live_written()
                return
            batch, classified = head
            await classified
            # Group delivery: the batches already classified behind this one go with it, so
            # their sinks and commit cost one round trip each instead of queueing up one batch
            # at a time (under load, many small batches would otherwise wait here).
            while not self._sink_q.empty():
                waiting.append(self._sink_q.get_nowait())
            group = [batch]
            while waiting and waiting[0] is not None and waiting[0][1].done():
                later, done = waiting.popleft()  # type: ignore[misc]
                done.result()  # a failed classification stops the worker, as before
                group.append(later)
            await self._deliver(group, outputs)

    async def _deliver(self, group: list[Batch], outputs: Outputs) -> None:
        """Every sink, then the commit, for ``group`` as one delivery; then the live view."""
        delivery = group[0] if len(group) == 1 else Batch.merged(group)
        started = time.monotonic()
        delivery.clock.stamp("sinking", started)
        await deliver(delivery, outputs, self._retrier)
        await self._commit(delivery)
        delivery.clock.stamp("commit")
        now_ms = int(time.time() * 1000)
        self.metrics.delivered(delivery, sink_seconds=time.monotonic() - started, now_ms=now_ms)
        for batch in group:
            if batch is not delivery:
                batch.clock.stamps += delivery.clock.stamps
            self.metrics.staged(batch.clock)
            if self._trace is not None:
                frames, records = len(batch.predictions), batch.records
                self._trace.batch(batch.clock, frames=frames, records=records, delivered_with=len(group))
        # The live view is best effort and comes after the commit: it runs beside the next
        # delivery's sinks instead of holding them up (its thumbnails wait for the decode pool,
        # which is busiest when the next delivery is waiting). One at a time, in order.
        await self._live_written()
        self._live = asyncio.create_task(outputs.live.write(delivery), name="live view")
        self._in_flight.release(delivery.records, delivery.bytes)
        self._report_in_flight()
        if self._in_flight.count == 0:
            self._drained.set()

    async def _live_written(self) -> None:
        """Until the last delivery's live-view write has ended (it raises only what cannot be
        retried: a closed pool, a bug)."""
        live, self._live = self._live, None
        if live is not None:
            await live

    async def _commit(self, batch: Batch) -> None:
        consumer = self._consumer
        assert consumer is not None
        owned = consumer.assignment()
        offsets = {
            TopicPartition(*key): OffsetAndMetadata(last + 1, "")
            for key, last in batch.offsets.items()
            if key in owned or key in self._revoking
        }
        if not offsets:
            return
        self._faults.reached("commit")
        try:
            if offsets.keys() <= owned:
                await consumer.commit(offsets)
            else:
                await commit_revoked(consumer, offsets)
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
        # A pattern subscription that matched a new topic has already dropped the assignment
        # (aiokafka replaces the subscription before this callback): the drained batches are
        # committed by partition name, still in the old generation.
        self._revoking = frozenset(revoked)
        try:
            await self._drain(self.settings.ops.drain_deadline_s, "rebalance")
        finally:
            self._revoking = frozenset()

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Resume each partition after the committed offset or the Redis watermark, whichever is further.

        The watermark counts only for the topic incarnation (Kafka topic ID) and the consumer
        group that wrote it: a recreated topic starts again from its first offset.
        """
        consumer, outputs = self._consumer, self._outputs
        assert consumer is not None and outputs is not None
        counts = outputs.counts
        # Records held so far were fetched under the old assignment; the new one starts again from
        # the committed offsets, so they will come back. Those fetched from now on are kept.
        self._held.clear()
        try:
            counts.bind_topic_ids(await self._topic_ids.lookup(sorted({tp.topic for tp in assigned})))
        except LookoutError as exc:
            # The partitions keep their stored topic IDs; a recreated topic is caught on the next
            # assignment. Everything below still runs.
            log.warning("could not look up topic IDs on assignment: %s", exc)
        try:
            for tp in assigned:
                claim = await counts.claim(tp.topic, tp.partition)
                if claim.reset_from >= 0:
                    log.warning(
                        "%s:%d was deleted and created again: its old Redis watermark %d no longer "
                        "applies; counting it from its committed offset",
                        tp.topic,
                        tp.partition,
                        claim.reset_from,
                    )
                watermark = claim.watermark
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
                    await outputs.windows.publish({(tp.topic, tp.partition): dirty})
                await outputs.events.publish([(tp.topic, tp.partition)])
        except ConfigError as exc:
            self._refused = exc
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
            assigned = consumer.assignment()
            lags: dict[tuple[str, int], int] = {}
            for tp in assigned:
                try:
                    high = consumer.highwater(tp)
                    position = await consumer.position(tp)
                except (KafkaError, IllegalStateError):
                    continue
                if high is not None:
                    lags[tp] = max(0, high - position)
            self.metrics.consumer_lag(lags, assigned=assigned)
