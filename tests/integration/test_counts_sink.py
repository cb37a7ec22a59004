"""The Redis counts sink against a real Redis: exact, idempotent, readable."""

from __future__ import annotations

import redis.asyncio as aioredis

from stream_worker.counting import CountedFrame
from stream_worker.dashboard.live import LiveView
from stream_worker.sinks.counts import CountsWriter

MIN = 60_000


def frame(
    offset: int, source: str, t: int, labels: tuple[str, ...], events: tuple[str, ...] | None = None
) -> CountedFrame:
    return CountedFrame(offset, source, t, labels, events)


async def test_replayed_batch_changes_nothing(redis_client: aioredis.Redis, key_prefix: str) -> None:
    counts = CountsWriter(
        redis_client, key_prefix=key_prefix, ttl_s=3600, event_gap_ms=30_000, windows=[("1m", MIN)]
    )
    batch = [
        frame(0, "cam-1", 1_000, ("car", "vehicle")),
        frame(1, "cam-1", 2_000, ("bus", "vehicle")),
        frame(2, "cam-2", 61_000, ("car", "vehicle")),
    ]
    first = await counts.apply("frames", 3, batch)
    assert first.applied == 3
    assert await counts.watermark("frames", 3) == 2
    again = await counts.apply("frames", 3, batch)
    assert again.applied == 0
    # A batch that overlaps the watermark applies only its new frames.
    overlap = await counts.apply("frames", 3, [*batch[1:], frame(3, "cam-1", 3_000, ("car", "vehicle"))])
    assert overlap.applied == 1

    cam1 = await counts.read("cam-1", "1m")
    assert [(w.start_ms, w.frames, w.labels) for w in cam1] == [(0, 3, {"car": 2, "bus": 1, "vehicle": 3})]
    cam2 = await counts.read("cam-2", "1m")
    assert [(w.start_ms, w.frames) for w in cam2] == [(60_000, 1)]
    assert await counts.watermark("frames", 3) == 3
    assert await counts.sources() == ["cam-1", "cam-2"]


async def test_camera_trap_sequences_count_each_species_once(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    counts = CountsWriter(
        redis_client, key_prefix=key_prefix, ttl_s=3600, event_gap_ms=10_000, windows=[("1m", MIN)]
    )
    # Sequence 1: deer seen in 3 frames 2 s apart, a fox joins; sequence 2 (after a 20 s gap): deer again.
    batch1 = [
        frame(0, "trap", 0, ("deer", "mammal", "animal"), ("deer",)),
        frame(1, "trap", 2_000, ("deer", "mammal", "animal"), ("deer",)),
    ]
    batch2 = [
        frame(2, "trap", 4_000, ("fox", "mammal", "animal"), ("fox",)),
        frame(3, "trap", 6_000, ("unknown",), ()),
        frame(4, "trap", 26_000, ("deer", "mammal", "animal"), ("deer",)),
    ]
    await counts.apply("frames", 0, batch1)
    result = await counts.apply("frames", 0, batch2)
    await counts.apply("frames", 0, batch2)  # replay: no new events
    [window] = await counts.read("trap", "1m")
    assert window.events == {"deer": 2, "fox": 1}
    assert window.frames == 5
    assert window.labels["deer"] == 3
    assert {w.key for w in result.windows} == {w.key for w in await counts.dirty("frames", 0)}
    await counts.mark_published("frames", 0, result.windows)
    assert await counts.dirty("frames", 0) == []


async def test_a_source_leaves_the_directory_only_once_its_counts_could_have_expired(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    now = [1_800_000_000_000]
    counts = CountsWriter(
        redis_client,
        key_prefix=key_prefix,
        ttl_s=3600,
        event_gap_ms=30_000,
        windows=[("1m", MIN)],
        wall_ms=lambda: now[0],
    )
    await counts.apply("frames", 0, [frame(0, "cam-old", 1_000, ("car",))])
    now[0] += 3_599_000  # one second before cam-old's counts may expire
    await counts.apply("frames", 0, [frame(1, "cam-new", 1_000, ("car",))])
    assert await counts.sources() == ["cam-new", "cam-old"]
    now[0] += 1_000
    await counts.apply("frames", 0, [frame(2, "cam-new", 2_000, ("car",))])
    assert await counts.sources() == ["cam-new"]
    assert 0 < await redis_client.ttl(counts.directory) <= 3600  # gone when no worker writes


async def test_sources_listed_by_workers_before_the_sorted_directory_stay_listed_until_they_expire(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    legacy = f"{key_prefix}:sources"
    await redis_client.sadd(legacy, "cam-before-upgrade")
    counts = CountsWriter(
        redis_client, key_prefix=key_prefix, ttl_s=3600, event_gap_ms=30_000, windows=[("1m", MIN)]
    )
    await counts.apply("frames", 0, [frame(0, "cam-new", 1_000, ("car",))])
    assert await counts.sources() == ["cam-before-upgrade", "cam-new"]
    assert await LiveView(redis_client, key_prefix=key_prefix, windows=["1m"]).source_ids() == [
        "cam-before-upgrade",
        "cam-new",
    ]
    # Nothing adds to the old set any more: it expires once its sources' counts have.
    assert 0 < await redis_client.ttl(legacy) <= 3600
