"""The Redis counts sink against a real Redis: exact, idempotent, readable."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from stream_worker.counting import CountedFrame
from stream_worker.dashboard.live import LiveView
from stream_worker.errors import ConfigError
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
    await counts.mark_published({("frames", 0): result.windows})
    assert await counts.dirty("frames", 0) == []


async def test_the_watermark_belongs_to_one_topic_incarnation_and_one_group(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    def writer(group: str) -> CountsWriter:
        return CountsWriter(
            redis_client,
            key_prefix=key_prefix,
            ttl_s=3600,
            event_gap_ms=30_000,
            windows=[("1m", MIN)],
            group=group,
        )

    counts = writer("g1")
    # A watermark written before owners existed (an upgrade) is adopted, not dropped.
    await redis_client.set(f"{counts.stem('frames', 0)}:wm", "41")
    counts.bind_topic_ids({"frames": "id-1"})
    assert (await counts.claim("frames", 0)).watermark == 41
    replay = await counts.apply("frames", 0, [frame(41, "cam-1", 1_000, ("car",))])
    assert replay.applied == 0

    # The topic is deleted and created again: a new ID, offsets from 0 again.
    counts.bind_topic_ids({"frames": "id-2"})
    fresh = await counts.apply(
        "frames", 0, [frame(0, "cam-1", 2_000, ("car",)), frame(1, "cam-1", 3_000, ("bus",))]
    )
    assert (fresh.applied, fresh.reset_from, fresh.watermark) == (2, 41, 1)
    assert (await counts.claim("frames", 0)).reset_from == -1  # only once

    # Another group under the same prefix would count every frame twice: refused, nothing applied.
    other = writer("g2")
    other.bind_topic_ids({"frames": "id-2"})
    with pytest.raises(ConfigError, match=r"'g1'.*--key-prefix"):
        await other.apply("frames", 0, [frame(2, "cam-1", 4_000, ("car",))])
    assert await counts.watermark("frames", 0) == 1


async def test_a_backfill_spanning_more_than_the_ttl_keeps_every_window(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    hour = 3_600_000
    counts = CountsWriter(
        redis_client, key_prefix=key_prefix, ttl_s=3600, event_gap_ms=30_000, windows=[("1m", MIN)]
    )
    now = 1_790_000_040_000  # on a minute
    # An SD card read out hours later: one frame an hour over five hours, then a live frame.
    backfill = [frame(i, "trap-1", now - (5 - i) * hour, ("deer",)) for i in range(5)]
    await counts.apply("frames", 0, backfill)
    await counts.apply("frames", 0, [frame(5, "trap-1", now, ("deer",))])
    windows = await counts.read("trap-1", "1m")
    assert [w.start_ms for w in windows] == [now - (5 - i) * hour for i in range(6)]
    assert [w.frames for w in windows] == [1] * 6

    # Windows whose hashes expired leave the index as new windows come.
    stem = counts.stem("frames", 0)
    for start in [now - 5 * hour, now - 4 * hour]:
        await redis_client.delete(f"{stem}:c:trap-1:1m:{start}")
    await counts.apply("frames", 0, [frame(6, "trap-1", now + MIN, ("deer",))])
    assert len(await redis_client.zrange(f"{stem}:cw:trap-1:1m", 0, -1)) == 5


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
