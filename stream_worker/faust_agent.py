"""lookout's pipeline as a Faust agent, for teams that already run Faust (extra: ``faust``).

    from stream_worker.faust_agent import frames_agent
    from stream_worker.settings import load_settings

    app = faust.App("cameras", broker="kafka://127.0.0.1:9092", store="memory://")
    frames_agent(app, load_settings())

Events are taken with ``Stream.noack_take(max_batch, within=max_wait_ms)`` and acknowledged only
after their whole batch has been decoded, classified, published to the labels and dead-letter
topics and counted in Redis. Faust's ``take()`` acknowledges a batch even when processing it
fails (faust-streaming issues #315 and #527), which silently loses frames; this agent never does.
A retriable sink failure retries the same batch with backoff; any other failure crashes the
Faust worker without acknowledging, so the batch is delivered again after the restart, and the
Redis offset watermark keeps the counts exact when it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from stream_worker.backends.base import Backend
from stream_worker.errors import LookoutError
from stream_worker.faults import Faults
from stream_worker.kafka import frames_subscription
from stream_worker.observability import Metrics
from stream_worker.pipeline import Batch, Pipeline
from stream_worker.record_batches import tolerate_unreadable_header_names
from stream_worker.settings import Settings
from stream_worker.sinks import Outputs, Retrier, deliver

log = logging.getLogger("lookout.faust")


@dataclass(frozen=True, slots=True)
class EventRecord:
    """The parts of a Faust event's message that the worker reads, shaped like a Kafka record."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]

    @classmethod
    def from_event(cls, event: Any) -> EventRecord:
        """Adapt ``faust.Event`` (its message has the raw key, value and headers)."""
        message = event.message
        headers = message.headers or ()
        if isinstance(headers, dict):
            headers = list(headers.items())
        timestamp = message.timestamp
        return cls(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            timestamp=int(timestamp * 1000) if timestamp is not None else None,
            key=message.key,
            value=message.value,
            headers=[(str(k), bytes(v) if v is not None else b"") for k, v in headers],
        )


def frames_agent(
    app: Any,
    settings: Settings,
    *,
    backend_factory: Callable[[], Backend] | None = None,
    metrics: Metrics | None = None,
) -> Any:
    """Register lookout's agent on ``app`` for the settings' frames topics; returns the agent.

    The agent drives the same pipeline and sinks as ``stream-worker run``; Faust owns the
    consumer, the group and the commits. Faust's consumer is aiokafka's too: a record whose
    header name is not UTF-8 is read and dead-lettered, not fatal (:mod:`stream_worker.record_batches`).
    """
    tolerate_unreadable_header_names()

    if settings.topics.frames_pattern:
        source = app.topic(
            pattern=frames_subscription(settings.topics), key_serializer="raw", value_serializer="raw"
        )
    else:
        source = app.topic(*settings.topics.frames_topic, key_serializer="raw", value_serializer="raw")
    if backend_factory is None:
        from stream_worker.service import EngineOpener

        backend_factory = EngineOpener(settings)

    metrics = metrics or Metrics.from_settings(settings)
    faults = Faults(settings.faults)
    pipeline = Pipeline(settings, backend_factory, metrics=metrics, wrap_backend=faults.backend)
    retrier = Retrier(retry_max_s=settings.ops.retry_max_s, metrics=metrics)
    outputs: list[Outputs] = []  # made when the app starts: the clients need the running loop
    opened = asyncio.Event()

    @app.task  # type: ignore[untyped-decorator]
    async def open_lookout() -> None:
        await pipeline.open()
        sinks = Outputs(
            pipeline.settings,  # with the engine's fitted thresholds where none was set
            model=lambda: pipeline.model,
            metrics=metrics,
            executor=pipeline.decode_pool,
            faults=faults,
        )
        await sinks.open()
        outputs.append(sinks)
        opened.set()
        log.info("lookout agent ready (max batch %d)", pipeline.max_batch)

    async def process(records: Sequence[EventRecord]) -> Batch:
        if len(records) > pipeline.max_batch:
            raise LookoutError(f"at most {pipeline.max_batch} records per batch, got {len(records)}")
        batch = Batch(opened_at=time.monotonic())
        for record in records:
            pipeline.add(batch, record)
        await pipeline.classify(batch)
        await deliver(batch, outputs[0], retrier)
        await outputs[0].live.write(batch)
        return batch

    async def classify(stream: Any) -> None:  # faust.StreamT; its stubs lack noack_take
        await opened.wait()
        within = max(0.001, settings.batch.max_wait_ms / 1000)
        async for events in stream.noack_take(pipeline.max_batch, within=within):
            await process([EventRecord.from_event(event) for event in events])
            # Only now, with every sink done, may Faust commit past these offsets.
            for event in events:
                await stream.ack(event)

    return app.agent(source, name="lookout.classify")(classify)
