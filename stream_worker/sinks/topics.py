"""Kafka topic outputs: labels, review samples and dead letters per frame, window counts per batch.

Both sinks write through the worker's one idempotent, acks=all producer: every record of a
write is sent, then every acknowledgement awaited (one flush per batch, never per frame). A
retried write sends the same records again; the label records carry the frame id, so a consumer
sees at most a repeat, never a loss, and the compacted counts topic holds absolute values.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError

from stream_worker import codec
from stream_worker.counting import WindowCounts
from stream_worker.kafka import kafka_failure
from stream_worker.observability import Metrics
from stream_worker.pipeline import Batch, PartitionKey
from stream_worker.settings import Settings
from stream_worker.sinks.counts import CountsWriter


class OutRecord(NamedTuple):
    """A record to produce; ``origin`` is the (topic, partition, offset) of the frame it carries."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Sequence[tuple[str, bytes]]
    origin: tuple[str, int, int] | None = None


TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)


async def send_all(producer: AIOKafkaProducer, records: Sequence[OutRecord], what: str) -> None:
    """Send every record, then wait for every acknowledgement (one flush per batch).

    Records carrying a frame (``origin`` set: dead letters, review samples) arrive here already
    fitted to their topic's known size limit (:meth:`FrameTopicsSink.records`): a refusal by
    the broker fails every batch the idempotent producer has in flight behind it on that
    partition (``OutOfOrderSequenceNumber``). Should one still be refused as too large (a
    limit lowered since it was read, or refused by the producer itself), it is written again
    without its payload (:func:`without_payload`) instead of failing the batch. A refusal fails
    the whole producer batch the record was in, so refused records are first sent again one by
    one, whole; only those still refused lose their payload.
    """
    try:
        futures = [await _send(producer, record) for record in records]
        results = await asyncio.gather(*futures, return_exceptions=True)
    except KafkaError as exc:
        raise kafka_failure(exc, what) from exc
    refused = []
    for record, result in zip(records, results, strict=True):
        if record.origin is not None and isinstance(result, TOO_LARGE):
            refused.append(record)
        elif isinstance(result, BaseException):
            raise kafka_failure(result, what) from result
    for record in refused:
        try:
            await (await _send(producer, record))
        except TOO_LARGE:
            await send_all(producer, [without_payload(record)], what)
        except KafkaError as exc:
            raise kafka_failure(exc, what) from exc


async def _send(producer: AIOKafkaProducer, record: OutRecord) -> asyncio.Future[Any]:
    """The acknowledgement of one record; a record over the producer's own size limit fails here."""
    try:
        acknowledged: asyncio.Future[Any] = await producer.send(
            record.topic, record.value, key=record.key, headers=list(record.headers) or None
        )
        return acknowledged
    except TOO_LARGE as exc:
        refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        refused.set_exception(exc)
        return refused


# A record batch's header (61 bytes) and the record's own varints, rounded up generously.
_RECORD_OVERHEAD = 256


def record_bytes(record: OutRecord) -> int:
    """An upper bound of the bytes ``record`` takes alone in a record batch (what a topic limits)."""
    headers = sum(
        len(name.encode("utf-8", "surrogateescape")) + len(value or b"") + 10
        for name, value in record.headers
    )
    return _RECORD_OVERHEAD + len(record.key or b"") + len(record.value) + headers


def without_payload(record: OutRecord) -> OutRecord:
    """``record`` with an empty value and headers that say what was dropped and where it came from."""
    origin_topic, partition, offset = record.origin or ("", -1, -1)
    dropped = [
        ("lookout.payload.dropped-bytes", str(len(record.value)).encode()),
        ("lookout.payload.topic", origin_topic.encode()),
        ("lookout.payload.partition", str(partition).encode()),
        ("lookout.payload.offset", str(offset).encode()),
    ]
    return record._replace(value=b"", headers=[*record.headers, *dropped], origin=None)


class FrameTopicsSink:
    """One record per frame: its labels, a review sample when it is sampled, or its dead letter.

    Review samples are chosen by a hash of the frame id among frames under the review threshold,
    so a replayed frame is sampled the same way. A dead letter keeps the record's key, value and
    headers and adds Connect-style error headers.
    """

    name = "labels"

    def __init__(
        self,
        producer: AIOKafkaProducer,
        settings: Settings,
        *,
        model: Callable[[], Mapping[str, str]],
        metrics: Metrics,
        ensure_topics: Callable[[set[str]], Awaitable[None]],
        record_limits: Mapping[str, int] | None = None,
    ) -> None:
        self._producer = producer
        self._record_limits = record_limits if record_limits is not None else {}
        self._topics = settings.topics
        self._review_threshold = settings.counts.review_threshold
        self._review_cutoff = int(settings.counts.review_sample_rate * 10_000)
        self._max_frame_bytes = settings.batch.max_frame_bytes
        self._model = model
        self._metrics = metrics
        self._ensure_topics = ensure_topics

    async def write(self, batch: Batch) -> None:
        """Publish the batch's label, review and dead-letter records."""
        if batch.dead:
            await self._ensure_topics({self._topics.dlq_topic.format(topic=d.topic) for d in batch.dead})
        records, review = self.records(batch)
        await send_all(self._producer, records, "publishing labels")
        self._metrics.published(batch, review=review)

    def records(self, batch: Batch) -> tuple[list[OutRecord], int]:
        """The batch's records, and how many of them are review samples."""
        topics, model = self._topics, self._model()
        out: list[OutRecord] = []
        review = 0
        for p in batch.predictions:
            value = codec.label_record(p, model)
            key = p.frame.source_id.encode()
            out.append(OutRecord(topics.labels_topic, key, value, []))
            low = p.result.best_score < self._review_threshold
            if low and zlib.crc32(p.frame.frame_id.encode()) % 10_000 < self._review_cutoff:
                headers = [*p.frame.headers, ("lookout-labels", value), *codec.model_headers(model)]
                origin = (p.frame.topic, p.frame.partition, p.frame.offset)
                out.append(self._fitted(OutRecord(topics.review_topic, key, p.frame.data, headers, origin)))
                review += 1
        for d in batch.dead:
            keep = d.value if d.value is not None and len(d.value) <= self._max_frame_bytes else b""
            headers = codec.dead_letter_headers(
                d.topic, d.partition, d.offset, d.error.stage, d.error.reason, d.error, d.headers, model
            )
            origin = (d.topic, d.partition, d.offset)
            out.append(
                self._fitted(OutRecord(topics.dlq_topic.format(topic=d.topic), d.key, keep, headers, origin))
            )
        return out, review

    def _fitted(self, record: OutRecord) -> OutRecord:
        """``record``, or without its payload when it would not fit its topic's size limit."""
        limit = self._record_limits.get(record.topic)
        return without_payload(record) if limit is not None and record_bytes(record) > limit else record


class WindowCountsSink:
    """The absolute counts of every window a batch changed, to the compacted counts topic.

    Reads what the counts sink left on ``batch.windows``; once the records are acknowledged the
    windows' dirty marks in Redis are cleared, so a window whose publication was cut short by a
    crash is published again when its partition is next assigned (:meth:`publish`).
    """

    name = "windows"

    def __init__(
        self,
        producer: AIOKafkaProducer,
        counts_topic: str,
        writer: CountsWriter,
        *,
        model: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self._producer = producer
        self._counts_topic = counts_topic
        self._writer = writer
        self._model = model

    async def write(self, batch: Batch) -> None:
        """Publish the windows the batch changed."""
        await self.publish(batch.windows)

    async def publish(self, windows: Mapping[PartitionKey, Sequence[WindowCounts]]) -> None:
        """Publish ``windows`` (per partition), then clear their dirty marks."""
        records: list[OutRecord] = []
        model = self._model() if self._model is not None else None
        for (topic, partition), group in windows.items():
            shard = f"{topic}:{partition}"
            for w in group:
                key, value = codec.count_record(
                    w.source_id,
                    w.window,
                    w.start_ms,
                    {"_frames": w.frames, **w.labels},
                    shard=shard,
                    model=model,
                )
                records.append(OutRecord(self._counts_topic, key, value, []))
                if w.events:
                    key, value = codec.count_record(
                        w.source_id, w.window, w.start_ms, w.events, "events", shard=shard, model=model
                    )
                    records.append(OutRecord(self._counts_topic, key, value, []))
        if not records:
            return
        await send_all(self._producer, records, "publishing counts")
        await self._writer.mark_published(windows)


class EventsSink:
    """Camera-trap events to the compacted events topic: one record per event and species.

    Reads the event records the counts sink's Lua call left in Redis (listed as dirty) and clears
    their marks once acknowledged, like :class:`WindowCountsSink`: a record whose publication a
    crash cut short is published again when its partition is next assigned. A record is
    published each time its event changes; the last one says ``closed``.
    """

    name = "events"

    def __init__(
        self,
        producer: AIOKafkaProducer,
        events_topic: str,
        writer: CountsWriter,
        *,
        model: Callable[[], Mapping[str, str]],
    ) -> None:
        self._producer = producer
        self._events_topic = events_topic
        self._writer = writer
        self._model = model

    async def write(self, batch: Batch) -> None:
        """Publish the events of the partitions where the batch had camera-trap frames."""
        await self.publish(
            [key for key, frames in batch.counted.items() if any(f.event_labels is not None for f in frames)]
        )

    async def publish(self, partitions: Sequence[PartitionKey]) -> None:
        """Publish the dirty events of ``partitions``, then clear their marks."""
        model = self._model()
        for topic, partition in partitions:
            events = await self._writer.dirty_events(topic, partition)
            if not events:
                continue
            shard = f"{topic}:{partition}"
            records = [
                OutRecord(self._events_topic, *codec.event_record(e, shard, model), []) for e in events
            ]
            await send_all(self._producer, records, "publishing camera-trap events")
            await self._writer.mark_events_published(topic, partition, events)
