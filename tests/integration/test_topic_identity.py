"""The offset watermark belongs to one incarnation of a topic and one consumer group.

Against the real broker and Redis. Before, the watermark key outlived its topic and ignored the
group: after ``frames`` was deleted and created again (a common way to purge poison pills), the
worker sought to the old watermark and dropped every new frame below it (not labelled, not
dead-lettered, not counted, not logged); a second group sharing the key prefix skipped every
frame the first had counted.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stream_worker import codec
from stream_worker.errors import ConfigError
from stream_worker.service import backend_factory
from stream_worker.sinks.counts import CountsReader
from stream_worker.worker import Worker
from tests.conftest import Services, TopicFactory
from tests.support.media import street_jpegs
from tests.support.pipeline import produce_frames, read_topic, running_worker, worker_settings


async def _recreate(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
        async with asyncio.timeout(60):
            while topic in await admin.list_topics():
                await asyncio.sleep(0.2)
            while True:  # the broker refuses the name until the deletion has completed
                response = await admin.create_topics([NewTopic(topic, partitions, 1)])
                if not any(code for _t, code, *_ in response.topic_errors):
                    return
                await asyncio.sleep(0.5)
    finally:
        await admin.close()


async def test_a_recreated_frames_topic_is_labelled_and_counted_from_its_first_frame(
    services: Services, make_topic: TopicFactory, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    topic = await make_topic("frames")
    images = street_jpegs(10)
    first = await produce_frames(services.bootstrap, topic, [("cam-1", images[i % 10]) for i in range(100)])
    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix, windows="15m")
    async with running_worker(settings):
        await read_topic(services.bootstrap, settings.topics.labels_topic, len(first), settle_s=0)

    await _recreate(services.bootstrap, topic, 1)
    second = await produce_frames(services.bootstrap, topic, [("cam-1", data) for data in images])
    async with running_worker(settings):
        labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(first) + len(second))

    labelled = [codec.parse_label_record(r.value)["frame_id"] for r in labels]
    assert set(second) <= set(labelled)
    assert sorted(labelled) == sorted([*first, *second])
    windows = await CountsReader(redis_client, key_prefix=key_prefix).read("cam-1", "15m")
    assert sum(w.frames for w in windows) == len(first) + len(second)


async def test_a_second_group_on_the_same_key_prefix_is_refused_in_one_line(
    services: Services, make_topic: TopicFactory, key_prefix: str
) -> None:
    topic = await make_topic("frames")
    ids = await produce_frames(services.bootstrap, topic, [("cam-1", data) for data in street_jpegs(4)])
    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix)
    async with running_worker(settings):
        await read_topic(services.bootstrap, settings.topics.labels_topic, len(ids), settle_s=0)

    other = dataclasses.replace(
        settings, topics=dataclasses.replace(settings.topics, group=f"{settings.topics.group}-2")
    )
    worker = Worker(other, backend_factory=lambda: backend_factory(other))
    with pytest.raises(ConfigError) as refused:
        # The refusal comes with the first assignment; a worker that is not refused runs on (and,
        # before the fix, skipped every frame below the first group's watermark).
        await asyncio.wait_for(worker.run(asyncio.Event()), timeout=60)
    message = str(refused.value)
    assert "\n" not in message
    assert settings.topics.group in message and "--key-prefix" in message
