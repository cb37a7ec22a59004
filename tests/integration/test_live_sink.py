"""The live-view sink against the real Redis, read back by the dashboard's reader (one key schema)."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import redis.asyncio as aioredis

from stream_worker.counting import DriftSnapshot
from stream_worker.dashboard.live import LiveView
from stream_worker.errors import BadFrame
from stream_worker.frames import ClassScore, Frame, FrameLabels, LabelScore, Prediction, SourceKind
from stream_worker.pipeline import Batch, DeadFrame
from stream_worker.settings import RedisSettings, Settings
from stream_worker.sinks.live import LiveViewSink
from tests.support.pipeline import MODEL
from tests.unit import images


def prediction(offset: int, source: str) -> Prediction:
    frame = Frame(
        "cams",
        0,
        offset,
        source,
        SourceKind.TRAFFIC,
        f"{source}/{offset}",
        1_000,
        "image/jpeg",
        images.jpeg(images.bikes_frame()),
    )
    labels = FrameLabels(
        (LabelScore("car", 0.8, ("vehicle", "car")),), (ClassScore(817, "sports car", 0.8),), 0.8
    )
    return Prediction(frame, labels, 2_000, 1_000.0)


async def test_what_the_sink_writes_is_what_the_dashboard_reads(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    settings = dataclasses.replace(Settings(), redis=RedisSettings(key_prefix=key_prefix))
    with ThreadPoolExecutor(1) as pool:
        sink = LiveViewSink(redis_client, settings, model=lambda: MODEL, executor=pool)
        batch = Batch(opened_at=0.0)
        batch.predictions = [prediction(0, "cam-1"), prediction(1, "cam-1")]
        batch.drift = {"cam-1": DriftSnapshot(2, 0.0, {"car": 1.0})}
        batch.dead = [DeadFrame("cams", 0, 2, b"cam-1", b"junk", (), BadFrame("guard", "empty", "no bytes"))]
        await sink.write(batch)

    view = LiveView(redis_client, key_prefix=key_prefix, windows=["1m"])
    stats = (await view.stats())["sources"]
    assert [s["id"] for s in stats] == ["cam-1"]
    cam = stats[0]
    assert (cam["frames"], cam["dead"], cam["kind"]) == (2, 1, "traffic")
    assert cam["latest"]["frame_id"] == "cam-1/1"
    assert cam["latest"]["labels"][0]["label"] == "car"
    assert cam["thumbnail"] and (await view.thumbnail("cam-1") or b"").startswith(b"\xff\xd8")


async def test_the_directory_forgets_sources_whose_stats_expired_and_dead_frames_get_a_bounded_key(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    settings = dataclasses.replace(Settings(), redis=RedisSettings(key_prefix=key_prefix, counts_ttl_s=60))
    wall = [1_800_000_000_000]
    garbage = b"\xff" * 5_000  # a record key of 5 kB that is not even UTF-8
    with ThreadPoolExecutor(1) as pool:
        sink = LiveViewSink(
            redis_client, settings, model=lambda: MODEL, executor=pool, wall_ms=lambda: wall[0]
        )
        first = Batch(opened_at=0.0)
        first.predictions = [prediction(0, "cam-1")]
        first.drift = {"cam-1": DriftSnapshot(1, 0.0, {"car": 1.0})}
        first.dead = [DeadFrame("cams", 0, 1, garbage, b"junk", (), BadFrame("headers", "not_utf8", "key"))]
        await sink.write(first)
        wall[0] += 60_000
        second = Batch(opened_at=0.0)
        second.predictions = [prediction(2, "cam-2")]
        second.drift = {"cam-2": DriftSnapshot(1, 0.0, {"car": 1.0})}
        await sink.write(second)

    view = LiveView(redis_client, key_prefix=key_prefix, windows=["1m"])
    assert await view.source_ids() == ["cam-2"]
    stats = [k async for k in redis_client.scan_iter(match=f"{key_prefix}:live:stats:*")]
    dead = [k for k in stats if await redis_client.hget(k, "dead") == b"1"]
    assert len(dead) == 1 and len(dead[0]) <= len(f"{key_prefix}:live:stats:") + 200
    for key in stats:
        assert 0 < await redis_client.ttl(key) <= 60
