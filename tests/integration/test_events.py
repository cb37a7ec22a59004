"""Camera-trap events as records: one per event and species on the compacted events topic.

Against the real broker and Redis. Users of camera-trap data work in events (Camtrap DP): a
sequence of a trap's frames closer than the gap, and what it showed. The worker counted them
(``event:<species>`` in the window counts) but published no record a consumer could use.
"""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from stream_worker.frames import SourceKind
from stream_worker.sinks.counts import CountsReader
from tests.conftest import Services, TopicFactory
from tests.support.media import photo_jpeg
from tests.support.pipeline import produce_frames, read_topic, running_worker, worker_settings

T0 = 1_790_000_040_000


async def test_each_camera_trap_event_is_published_and_closed_once_the_next_sequence_starts(
    services: Services, make_topic: TopicFactory, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    topic = await make_topic("frames", partitions=2)
    cat = photo_jpeg("chelsea.png")
    # Two sequences of trap-1 (1 s apart within, 100 s between: the gap is 30 s).
    first = await produce_frames(
        services.bootstrap, topic, [("trap-1", cat)] * 3, kind=SourceKind.WILDLIFE, start_ms=T0
    )
    second = await produce_frames(
        services.bootstrap, topic, [("trap-1", cat)] * 2, kind=SourceKind.WILDLIFE, start_ms=T0 + 100_000
    )
    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix, event_gap_s=30)
    async with running_worker(settings):
        await read_topic(
            services.bootstrap, settings.topics.labels_topic, len(first) + len(second), settle_s=0
        )
        records = await read_topic(services.bootstrap, settings.topics.events_topic, 2, settle_s=2)

    latest = {r.key.decode(): json.loads(r.value) for r in records}  # what compaction keeps
    assert set(latest) == {f"trap-1|{T0}|cat", f"trap-1|{T0 + 100_000}|cat"}
    closed, open_ = latest[f"trap-1|{T0}|cat"], latest[f"trap-1|{T0 + 100_000}|cat"]
    assert (closed["closed"], closed["frames"], closed["start"], closed["end"]) == (True, 3, T0, T0 + 2000)
    assert (open_["closed"], open_["frames"]) == (False, 2)
    assert 0 < closed["best_score"] <= 1
    # The records agree with the event counters: one event per species and sequence.
    windows = await CountsReader(redis_client, key_prefix=key_prefix).read("trap-1", "15m")
    assert sum(w.events.get("cat", 0) for w in windows) == len(latest)
