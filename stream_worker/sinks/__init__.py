"""The worker's outputs, one file each, all with an idempotent ``write(batch)``.

=====================  ==========================================================================
``topics.py``          labels, review samples and dead letters (``FrameTopicsSink``); the
                       absolute window counts on the compacted counts topic (``WindowCountsSink``)
``counts.py``          the exactly-once Redis counts (``CountsSink``, with ``counts.lua``)
``live.py``            the dashboard's live view (best effort, after the commit)
=====================  ==========================================================================

:class:`Outputs` owns the clients they share (one producer, one Redis client) and lists the
sinks in the order a batch must pass them before its offsets may be committed. Each sink's write
is retried on its own (:class:`Retrier`), so a failure re-runs only the sink that failed; a sink
that succeeded is never written twice for the same batch by the same worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from stream_worker.aio import unless_set
from stream_worker.errors import LookoutError, ServiceUnavailable
from stream_worker.faults import Faults
from stream_worker.kafka import ensure_topics, make_producer, message_limits, missing_topics
from stream_worker.observability import Metrics
from stream_worker.pipeline import Batch
from stream_worker.redis_client import make_redis
from stream_worker.settings import Settings, frame_topic_config
from stream_worker.sinks.counts import CountsSink, CountsWriter
from stream_worker.sinks.live import LiveViewSink
from stream_worker.sinks.topics import EventsSink, FrameTopicsSink, WindowCountsSink

log = logging.getLogger("lookout.sinks")


class Sink(Protocol):
    """An output of the worker. ``write`` is idempotent: running it twice for a batch is safe."""

    name: str

    async def write(self, batch: Batch) -> None:
        """Write the batch's part of this output; raise a retriable ``LookoutError`` to be retried."""
        ...


class Outputs:
    """Every sink of the worker and the clients they share."""

    def __init__(
        self,
        settings: Settings,
        *,
        model: Callable[[], Mapping[str, str]],
        metrics: Metrics,
        executor: Executor,
        faults: Faults | None = None,
        create_topics: bool = True,
    ) -> None:
        self._settings = settings
        self._create_topics = create_topics
        # Dead-letter topics known to exist: with --frames-pattern, a new frames topic's one is
        # made on its first bad frame (unless create_topics is off, as with --no-create-topics).
        self._dead_letter_topics: set[str] = set()
        # max.message.bytes of the topics that carry frames (dead letters, review samples): a
        # record over it is written without its payload up front. Letting the broker refuse it
        # would break the idempotent producer's sequence for every batch in flight behind it.
        self._record_limits: dict[str, int] = {}
        faults = faults or Faults(settings.faults)
        self.redis = make_redis(settings.redis)
        # No linger: a sink sends a delivery's records in one go and then waits for their
        # acknowledgement, so they are batched already; a 5 ms linger only added 5 ms to each of
        # a delivery's labels and window-counts writes (docs/BENCHMARKS.md).
        self.producer: AIOKafkaProducer = make_producer(
            settings.kafka, client_id_suffix="worker", linger_ms=0
        )
        self.counts = CountsWriter.from_settings(self.redis, settings)
        self.windows = WindowCountsSink(self.producer, settings.topics.counts_topic, self.counts, model=model)
        self.events = EventsSink(self.producer, settings.topics.events_topic, self.counts, model=model)
        frames = FrameTopicsSink(
            self.producer,
            settings,
            model=model,
            metrics=metrics,
            ensure_topics=self._ensure_dead_letter_topics,
            record_limits=self._record_limits,
        )
        counts = CountsSink(self.counts, skipped=metrics.counts_skipped.inc)
        self.before_commit: list[Sink] = [
            faults.sink(frames, "labels"),
            faults.sink(counts, "counts"),
            self.windows,
            self.events,
        ]
        self.live = LiveViewSink(self.redis, settings, model=model, executor=executor)

    async def open(self) -> None:
        """Connect the producer (Redis connects on first use); learn the review topic's size limit."""
        await self.producer.start()
        self._record_limits.update(
            await message_limits(self._settings.kafka, {self._settings.topics.review_topic})
        )

    async def close(self) -> None:
        """Flush and close the producer, close the Redis client."""
        try:
            await self.producer.stop()
        except KafkaError as exc:
            log.warning("producer stop failed: %s", exc)
        await self.redis.aclose()

    async def _ensure_dead_letter_topics(self, wanted: set[str]) -> None:
        missing = wanted - self._dead_letter_topics
        if not missing:
            return
        if self._create_topics:
            await ensure_topics(
                self._settings.kafka,
                {name: (1, frame_topic_config(self._settings)) for name in sorted(missing)},
                replication=self._settings.topics.topic_replication,
                running=True,
            )
        else:
            absent = await missing_topics(self._settings.kafka, missing)
            if absent:
                # Retried (the operator may create it) and shown by /readyz meanwhile; before, the
                # send waited for the topic's metadata forever in 30 s steps, and nothing said why.
                raise ServiceUnavailable(
                    f"dead-letter topic {', '.join(sorted(absent))} does not exist and topics are not "
                    "created (--no-create-topics): create it, or let the worker create topics"
                )
        self._record_limits.update(await message_limits(self._settings.kafka, missing))
        self._dead_letter_topics |= missing


class Retrier:
    """Retries a retriable failure with exponential backoff; anything else is raised at once.

    ``abandon`` (the worker's shutdown past its drain deadline) cuts an attempt in flight and
    stops retrying: the frames stay uncommitted and the next owner reads them again.
    """

    def __init__(
        self,
        *,
        retry_max_s: float,
        metrics: Metrics,
        abandon: asyncio.Event | None = None,
        pending: Callable[[], int] = lambda: 0,
    ) -> None:
        self._retry_max_s = retry_max_s
        self._metrics = metrics
        self._abandon = abandon or asyncio.Event()
        self._pending = pending
        self.failing: tuple[float, str] | None = None
        """Since when (monotonic seconds) and why a sink is being retried; None while all is well."""

    async def run(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step`` until it succeeds."""
        delay = 0.2
        while True:
            try:
                if not await unless_set(self._abandon, step()):
                    raise self._abandoned()
                self.failing = None
                return
            except LookoutError as exc:
                if not exc.retriable:
                    raise
                if self._abandon.is_set():
                    raise self._abandoned() from exc
                since = self.failing[0] if self.failing else time.monotonic()
                self.failing = (since, str(exc))
                self._metrics.retries.labels(exc.__class__.__name__).inc()
                log.warning("sink write failed, retrying in %.1fs: %s", delay, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._abandon.wait(), timeout=delay)
                delay = min(delay * 2, self._retry_max_s)

    def _abandoned(self) -> LookoutError:
        return LookoutError(
            f"shutdown: drain deadline passed with {self._pending()} frames uncommitted "
            "(they will be read again by the next worker)"
        )


async def deliver(batch: Batch, outputs: Outputs, retrier: Retrier) -> None:
    """Write ``batch`` to every sink that must have it before a commit, each retried on its own.

    In order, never side by side: a partition resumes after a restart at its Redis watermark, so
    counts applied before the labels were acknowledged would leave frames that are counted but
    never labelled (writing the labels beside the counts was tried, and the ACL test caught it).
    """
    for sink in outputs.before_commit:
        await retrier.run(lambda sink=sink: sink.write(batch))  # type: ignore[misc]
        batch.clock.stamp(f"sink:{sink.name}")


__all__ = ["Outputs", "Retrier", "Sink", "deliver"]
