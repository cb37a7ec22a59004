"""Many distinct source ids through the real worker: per-source state stays bounded (issue 13).

The issue's figure (50,000 sources: 136 MB of RSS, a 10 MB ``/metrics`` page) is measured by
``bench/sources.py``; here a few hundred sources against a cap of 50, and a counts TTL of a few
seconds, so that the whole life of a source (seen, capped, idle, forgotten) fits in CI.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from stream_worker import codec
from stream_worker.dashboard.live import LiveView
from stream_worker.observability import HealthServer
from stream_worker.sinks.counts import CountsReader
from tests.conftest import Services, TopicFactory
from tests.support.media import street_jpegs
from tests.support.pipeline import produce_frames, read_topic, running_worker, worker_settings

CAP = 50
OLD_SOURCES = 300
NEW_SOURCES = 30
IDLE_S = 8  # the counts TTL and the source idle time: long enough for one phase, short for CI
MAX_SOURCE_ID = 200


async def http_get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data.decode().partition("\r\n\r\n")[2]


def series_sources(page: str) -> set[str]:
    """The ``source`` label values of every series on a /metrics page."""
    return set(re.findall(r'^lookout_\w+\{[^}]*source="([^"]*)"', page, re.MULTILINE))


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s:.0f} s")
        await asyncio.sleep(0.1)


async def test_many_sources_leave_bounded_state_in_memory_in_metrics_and_in_redis(
    services: Services, make_topic: TopicFactory, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    topic = await make_topic("frames", partitions=2)
    image = street_jpegs(1)[0]
    old = [f"old-cam-{i}" for i in range(OLD_SOURCES)]
    new = [f"new-cam-{i}" for i in range(NEW_SOURCES)]
    settings = worker_settings(
        services.bootstrap,
        services.redis_url,
        topic,
        key_prefix,
        windows="1m",
        max_tracked_sources=CAP,
        max_metric_sources=CAP,
        source_idle_s=IDLE_S,
        counts_ttl_s=IDLE_S,
    )
    counts = CountsReader(redis_client, key_prefix=key_prefix)
    dashboard = LiveView(redis_client, key_prefix=key_prefix, windows=["1m"])
    async with running_worker(settings) as worker:
        server = HealthServer(worker.metrics, ready=worker.ready, live=worker.live)
        port = await server.start("127.0.0.1", 0)
        try:
            # Phase 1: one frame from each of 300 sources, six times the cap.
            ids = await produce_frames(services.bootstrap, topic, [(s, image) for s in old])
            labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(ids))
            assert sorted(codec.parse_label_record(r.value)["frame_id"] for r in labels) == sorted(ids)
            by_source = series_sources(await http_get(port, "/metrics"))
            assert len(by_source) <= CAP + 1 and "_other" in by_source, sorted(by_source)[:60]
            assert len(worker._pipeline._drift) <= CAP

            # Phase 2, once phase 1's sources are idle and their counts expired: 30 new sources,
            # a bad frame of one of them, and two bad frames keyed by kilobytes of garbage.
            await asyncio.sleep(IDLE_S + 1)
            ids += await produce_frames(services.bootstrap, topic, [(s, image) for s in new])
            await produce_frames(services.bootstrap, topic, [(new[0], b"not a JPEG")])
            producer = AIOKafkaProducer(bootstrap_servers=services.bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(topic, b"junk", key=bytes(range(256)) * 16)  # not UTF-8
                await producer.send_and_wait(topic, b"junk", key=b"k" * 10_000)  # no source id
            finally:
                await producer.stop()
            labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(ids))
            assert sorted(codec.parse_label_record(r.value)["frame_id"] for r in labels) == sorted(ids)
            await read_topic(services.bootstrap, f"{topic}.dlq", 3)

            # Redis: the directories list the new sources only (the old ones' counts are gone).
            async def directories_hold_the_new_sources() -> bool:
                return await counts.sources() == sorted(new) == await dashboard.source_ids()

            await eventually(directories_hold_the_new_sources, "the source directories were not trimmed")
            for source in await counts.sources():
                assert await counts.read(source, "1m"), f"{source} is listed without counts"

            # Every live-view stats key has a TTL and a bounded name, dead frames' included.
            stats_prefix = f"{key_prefix}:live:stats:"

            async def dead_frames_counted() -> bool:
                keys = [k async for k in redis_client.scan_iter(match=stats_prefix + "*", count=1000)]
                dead = [await redis_client.hget(k, "dead") for k in keys]
                return sum(int(d) for d in dead if d is not None) == 3

            await eventually(dead_frames_counted, "the live view did not count the 3 dead frames")
            async for key in redis_client.scan_iter(match=stats_prefix + "*", count=1000):
                assert len(key) <= len(stats_prefix) + MAX_SOURCE_ID, f"a {len(key)}-byte key name"
                assert await redis_client.ttl(key) > 0, f"{key[:80]!r} has no TTL"

            # Memory and /metrics: the idle sources were forgotten, the new ones have series.
            assert series_sources(await http_get(port, "/metrics")) == set(new)
            assert len(worker._pipeline._drift) == NEW_SOURCES
        finally:
            await server.stop()
