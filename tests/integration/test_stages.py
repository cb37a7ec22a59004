"""Where a batch's time goes, on a real worker: the stage histogram and the trace file."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from stream_worker import codec
from stream_worker.pipeline import Batch
from stream_worker.sinks.counts import CountsReader
from stream_worker.sinks.live import LiveViewSink
from stream_worker.sinks.topics import FrameTopicsSink
from tests.conftest import Services, TopicFactory
from tests.support.media import street_jpegs
from tests.support.pipeline import produce_frames, read_topic, running_worker, worker_settings

FIXED = ["fetched", "opened", "closed", "taken", "decoded", "inferred", "sinking"]
SINKS = ["sink:labels", "sink:counts", "sink:windows", "sink:events"]


async def test_every_batch_is_traced_through_every_stage_in_order(
    services: Services, make_topic: TopicFactory, key_prefix: str, tmp_path: Path
) -> None:
    topic = await make_topic("frames", partitions=2)
    ids = await produce_frames(services.bootstrap, topic, [("cam-a", f) for f in street_jpegs(40)])
    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix, max_batch=8)
    trace_path = tmp_path / "trace.jsonl"
    ops = dataclasses.replace(settings.ops, trace_file=str(trace_path))
    settings = dataclasses.replace(settings, ops=ops)
    async with running_worker(settings) as worker:
        await read_topic(services.bootstrap, settings.topics.labels_topic, len(ids))
    metrics = worker.metrics.render().decode()  # after the drain: every batch committed

    batches = [line for line in map(json.loads, trace_path.read_text().splitlines()) if "batch" in line]
    # Every labelled frame is in exactly one traced batch, and no batch is bigger than --max-batch.
    assert sum(b["frames"] for b in batches) >= len(ids)
    assert all(0 < b["frames"] <= 8 for b in batches)
    for b in batches:
        stamps = b["batch"]
        assert list(stamps) == [*FIXED, *SINKS, "commit"], stamps
        times = list(stamps.values())
        assert times == sorted(times), f"stamps out of order: {stamps}"
        # The first record's Kafka timestamp precedes its fetch (same machine, same clock).
        assert b["kafka_ms"] <= b["fetched_ms"] + 1
    # The histogram has every stage, one observation per committed batch.
    stages = ["backlog", "fill", "infer_queue", "decode_wait", "inference", "sink_queue", *SINKS, "commit"]
    for stage in stages:
        line = f'lookout_stage_seconds_count{{stage="{stage}"}}'
        counted = [float(x.split()[-1]) for x in metrics.splitlines() if x.startswith(line)]
        assert counted and counted[0] >= len(batches), stage


async def test_batches_waiting_for_a_slow_output_are_delivered_together_and_counted_exactly(
    services: Services,
    make_topic: TopicFactory,
    key_prefix: str,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A labels topic that takes 150 ms per write (a slow or distant broker): one batch at a time,
    # 20 two-frame batches would queue for 3 s behind it, and latency would grow with the queue.
    deliveries: list[int] = []
    write = FrameTopicsSink.write

    async def slow_write(self: FrameTopicsSink, batch: Batch) -> None:
        deliveries.append(len(batch.predictions))
        await asyncio.sleep(0.15)
        await write(self, batch)

    monkeypatch.setattr(FrameTopicsSink, "write", slow_write)
    ids = await label_in_small_batches(services, make_topic, key_prefix, 40)
    assert sum(deliveries) == len(ids)  # each frame written once
    assert len(deliveries) <= len(ids) // 4, f"{len(deliveries)} deliveries of {deliveries}"
    counts = CountsReader(redis_client, key_prefix=key_prefix)
    assert sum(w.frames for w in await counts.read("cam-a", "1m")) == len(ids)


async def test_the_live_view_is_written_while_the_next_delivery_is_under_way(
    services: Services, make_topic: TopicFactory, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The live view (dashboard statistics, thumbnails) is best effort and comes after the commit.
    # Awaited in line, a slow one (its thumbnails queue behind the decodes) held up every next
    # delivery; now the next delivery's labels are written while it is still under way.
    live_writing = 0
    overlapped: list[bool] = []
    live_write, labels_write = LiveViewSink.write, FrameTopicsSink.write

    async def slow_live(self: LiveViewSink, batch: Batch) -> None:
        nonlocal live_writing
        live_writing += 1
        try:
            await asyncio.sleep(0.2)
            await live_write(self, batch)
        finally:
            live_writing -= 1

    async def labels(self: FrameTopicsSink, batch: Batch) -> None:
        overlapped.append(live_writing > 0)
        await labels_write(self, batch)

    monkeypatch.setattr(LiveViewSink, "write", slow_live)
    monkeypatch.setattr(FrameTopicsSink, "write", labels)
    await label_in_small_batches(services, make_topic, key_prefix, 24)
    assert any(overlapped), f"no delivery's labels were written during a live-view write: {overlapped}"


async def label_in_small_batches(
    services: Services, make_topic: TopicFactory, key_prefix: str, count: int
) -> list[str]:
    """``count`` frames of one camera through a worker with two-frame batches, every one labelled
    (checked); their frame ids."""
    topic = await make_topic("frames", partitions=1)
    ids = await produce_frames(services.bootstrap, topic, [("cam-a", f) for f in street_jpegs(count)])
    settings = worker_settings(
        services.bootstrap, services.redis_url, topic, key_prefix, max_batch=2, max_wait_ms=5
    )
    async with running_worker(settings):
        labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(ids))
    assert sorted(codec.parse_label_record(r.value)["frame_id"] for r in labels) == sorted(ids)
    return ids
