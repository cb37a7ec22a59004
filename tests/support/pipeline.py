"""Test helpers that drive a real worker against the real broker and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stream_worker import codec
from stream_worker.frames import SourceKind
from stream_worker.service import backend_factory
from stream_worker.settings import Settings, TopicSettings, load_settings
from stream_worker.worker import Worker

MODEL = {
    "name": "m",
    "version": "1",
    "backend": "onnxruntime",
    "precision": "fp32",
    "engine_sha256": "0" * 64,
    "onnx_sha256": "1" * 64,
    "taxonomy_version": "t1",
}
"""A model description as label records carry it, for sink tests without an engine."""


def worker_settings(
    bootstrap: str, redis_url: str, frames_topic: str, key_prefix: str, **flags: Any
) -> Settings:
    """Settings for a test worker: its own topics, group and key prefix; no metrics port; the
    session's engine precision (fp32, ``tests/conftest.py``) unless ``flags`` say otherwise."""
    topics = TopicSettings.named_after(frames_topic)
    base = {
        "bootstrap": bootstrap,
        "redis_url": redis_url,
        "frames_topic": frames_topic,
        "labels_topic": topics.labels_topic,
        "counts_topic": topics.counts_topic,
        "review_topic": topics.review_topic,
        "events_topic": topics.events_topic,
        "group": f"g-{uuid.uuid4().hex[:8]}",
        "key_prefix": key_prefix,
        "metrics_port": 0,
        "max_wait_ms": 20,
        "session_timeout_ms": 10000,
        "drain_deadline_s": 15,
    }
    base.update({k: str(v) if not isinstance(v, str) else v for k, v in flags.items()})
    return load_settings(flags=base, env={"LOOKOUT_PRECISION": os.environ.get("LOOKOUT_PRECISION", "fp32")})


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker running in this event loop; stopped (drained) on exit."""
    from stream_worker.service import prepare_topics

    await prepare_topics(settings)
    worker = Worker(settings, backend_factory=lambda: backend_factory(settings))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    started = asyncio.create_task(worker.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    if started not in done:
        raise TimeoutError("worker did not start within 120 s")
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


async def produce_frames(
    bootstrap: str,
    topic: str,
    frames: Sequence[tuple[str, bytes]],
    *,
    kind: SourceKind = SourceKind.TRAFFIC,
    start_ms: int = 1_790_000_000_000,
    step_ms: int = 1000,
    content_type: str = "image/jpeg",
    extra_headers: Sequence[tuple[str, bytes]] = (),
    keys: Sequence[bytes | None] | None = None,
) -> list[str]:
    """Produce (source_id, bytes) frames with lookout headers; returns their frame ids in order.

    Records are keyed by their source id unless ``keys`` gives each one's key.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=30_000_000, linger_ms=5)
    await producer.start()
    ids = []
    try:
        seq: dict[str, int] = {}
        futures = []
        for i, (source, data) in enumerate(frames):
            n = seq.get(source, 0)
            seq[source] = n + 1
            frame_id = f"{source}/{n}-{uuid.uuid4().hex[:6]}"
            headers = codec.frame_headers(source, kind, frame_id, start_ms + n * step_ms, content_type)
            futures.append(
                await producer.send(
                    topic,
                    data,
                    key=source.encode() if keys is None else keys[i],
                    headers=[*headers, *extra_headers],
                )
            )
            ids.append(frame_id)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return ids


async def read_topic(
    bootstrap: str, topic: str, expected: int, *, timeout_s: float = 90, settle_s: float = 1.0
) -> list[Any]:
    """Read records from the start of ``topic`` until ``expected`` arrived (then ``settle_s`` more
    to catch extras), or fail after ``timeout_s``."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(records) < expected:
                batch = await consumer.getmany(timeout_ms=500)
                for recs in batch.values():
                    records.extend(recs)
        loop = asyncio.get_running_loop()
        until = loop.time() + settle_s
        while loop.time() < until:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
    except TimeoutError:
        raise AssertionError(
            f"only {len(records)} of {expected} records arrived on {topic} in {timeout_s} s"
        ) from None
    finally:
        await consumer.stop()
    return records
