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


def settings_with(key_prefix: str, thumbnail_rate: float) -> Settings:
    settings = dataclasses.replace(Settings(), redis=RedisSettings(key_prefix=key_prefix))
    return dataclasses.replace(
        settings, counts=dataclasses.replace(settings.counts, thumbnail_rate=thumbnail_rate)
    )


def clocked_sink(
    client: aioredis.Redis, settings: Settings, pool: ThreadPoolExecutor, clock: list[float]
) -> LiveViewSink:
    """The live-view sink on a simulated clock (``clock[0]``, in ms)."""
    return LiveViewSink(client, settings, model=lambda: MODEL, executor=pool, clock_ms=lambda: clock[0])


def every_source(offset: int, sources: int) -> Batch:
    batch = Batch(opened_at=0.0)
    batch.predictions = [prediction(offset + i, f"cam-{i:02d}") for i in range(sources)]
    batch.drift = {f"cam-{i:02d}": DriftSnapshot(1, 0.0, {"car": 1.0}) for i in range(sources)}
    return batch


async def test_many_cameras_get_their_thumbnails_in_turn_within_the_budget(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    # 12 cameras at one frame a second each, 4 thumbnails a second: each second's write makes
    # 4 (not 12), the cameras never shown first, then the stalest; in 3 seconds every camera
    # has one, and each picture's labels are the labels of the frame it shows.
    clock = [0.0]
    view = LiveView(redis_client, key_prefix=key_prefix, windows=["1m"])
    shown: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        sink = clocked_sink(redis_client, settings_with(key_prefix, 4), pool, clock)
        for second in range(4):
            clock[0] = second * 1000.0
            await sink.write(every_source(100 * second, 12))
            stats = (await view.stats())["sources"]
            shown.append(sum(bool(s["thumbnail"]) for s in stats))
            if second == 0:
                with_picture = sorted(s["id"] for s in stats if s["thumbnail"])
                labelled = sorted(s["id"] for s in stats if s["latest"]["frame_id"])
    assert shown == [4, 8, 12, 12]
    assert with_picture == labelled == ["cam-00", "cam-01", "cam-02", "cam-03"]
    latest = {s["id"]: s["latest"]["frame_id"] for s in (await view.stats())["sources"]}
    # Renewed at second 3: the four shown first; the others still show the frame of their turn.
    assert latest["cam-00"] == "cam-00/300" and latest["cam-04"] == "cam-04/104"
    assert latest["cam-11"] == "cam-11/211"


async def test_with_thumbnails_off_the_latest_labels_stay_and_no_older_picture_is_left_beside_them(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    view = LiveView(redis_client, key_prefix=key_prefix, windows=["1m"])
    with ThreadPoolExecutor(1) as pool:
        on = LiveViewSink(redis_client, settings_with(key_prefix, 20), model=lambda: MODEL, executor=pool)
        await on.write(every_source(0, 1))
        assert (await view.stats())["sources"][0]["thumbnail"]
        off = LiveViewSink(redis_client, settings_with(key_prefix, 0), model=lambda: MODEL, executor=pool)
        await off.write(every_source(1, 1))
    cam = (await view.stats())["sources"][0]
    assert cam["latest"]["frame_id"] == "cam-00/1"
    assert not cam["thumbnail"] and await view.thumbnail("cam-00") is None


async def test_the_picture_budget_goes_to_the_camera_that_waited_longest_whichever_delivery_it_is_in(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    # Two cameras at 20 frames/s whose frames come in turns, one to a delivery, and one picture
    # a second: each second's picture must not always fall to whichever camera's delivery comes
    # when the budget refills.
    clock = [0.0]
    view = LiveView(redis_client, key_prefix=key_prefix, windows=["1m"])
    with ThreadPoolExecutor(1) as pool:
        sink = clocked_sink(redis_client, settings_with(key_prefix, 1), pool, clock)
        for tick in range(160):  # 4 s
            clock[0] = tick * 25.0
            camera = f"cam-{tick % 2:02d}"
            batch = Batch(opened_at=0.0)
            batch.predictions = [prediction(tick, camera)]
            batch.drift = {camera: DriftSnapshot(1, 0.0, {"car": 1.0})}
            await sink.write(batch)
    shown = {s["id"]: (s["thumbnail"], s["latest"]["frame_id"]) for s in (await view.stats())["sources"]}
    assert shown["cam-00"][0] and shown["cam-01"][0], shown
