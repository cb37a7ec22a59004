"""Event time is bounded: a frame dated far in the future cannot move the windows of a source.

Against the real broker and Redis. Before the bound, one such frame (a camera whose clock jumped
a year ahead) was counted in a window a year away, and the window index was trimmed relative to
it: `counts`, the dashboard and verify lost every real window of the source.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from stream_worker import codec
from stream_worker.sinks.counts import CountsReader
from tests.conftest import Services, TopicFactory
from tests.support.media import street_jpegs
from tests.support.pipeline import produce_frames, read_topic, running_worker, worker_settings

YEAR_MS = 365 * 86_400_000


async def test_a_frame_dated_a_year_ahead_is_dead_lettered_and_the_real_windows_stay(
    services: Services, make_topic: TopicFactory, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    topic = await make_topic("frames")
    images = street_jpegs(12)
    now_ms = int(time.time() * 1000)
    real = await produce_frames(
        services.bootstrap, topic, [("cam-1", data) for data in images[:10]], start_ms=now_ms - 120_000
    )
    future = await produce_frames(
        services.bootstrap, topic, [("cam-1", images[10])], start_ms=now_ms + YEAR_MS
    )
    # A later frame of another camera: once it is labelled, everything before it was handled.
    marker = await produce_frames(services.bootstrap, topic, [("cam-marker", images[11])], start_ms=now_ms)
    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix, windows="1m")
    async with running_worker(settings):
        labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(real) + 1)
        dead = await read_topic(services.bootstrap, settings.topics.dlq_topic.format(topic=topic), 1)

    labelled = {codec.parse_label_record(r.value)["frame_id"] for r in labels}
    assert labelled == {*real, *marker}
    reasons = [dict(r.headers)[codec.REASON_HEADER] for r in dead]
    assert reasons == [b"captured_at_in_future"]
    assert dict(dead[0].headers)[codec.FRAME_ID] == future[0].encode()
    windows = await CountsReader(redis_client, key_prefix=key_prefix).read("cam-1", "1m")
    assert sum(w.frames for w in windows) == len(real)
    assert all(w.start_ms <= now_ms for w in windows)
