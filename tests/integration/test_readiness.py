"""/readyz tells the truth while an output cannot be written.

Against the real broker and Redis. Before, with ``--no-create-topics`` and no dead-letter topic,
the first bad frame made the sink retry forever (each attempt waiting 30 s for the topic's
metadata, the log saying only ``KafkaTimeoutError``) while ``/readyz`` answered OK.
"""

from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stream_worker import codec
from stream_worker.service import backend_factory
from stream_worker.worker import Worker
from tests.conftest import Services, TopicFactory
from tests.support.media import street_jpegs
from tests.support.pipeline import produce_frames, read_topic, worker_settings


async def test_a_missing_dead_letter_topic_makes_the_worker_not_ready_and_says_why(
    services: Services, make_topic: TopicFactory, key_prefix: str
) -> None:
    topic = await make_topic("frames")
    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix)
    t = settings.topics
    dlq = t.dlq_topic.format(topic=topic)
    admin = AIOKafkaAdminClient(bootstrap_servers=services.bootstrap)
    await admin.start()
    good = street_jpegs(2)
    ids = await produce_frames(
        services.bootstrap, topic, [("cam-1", good[0]), ("cam-1", b"\xff\xd8 not a jpeg"), ("cam-1", good[1])]
    )
    worker = Worker(settings, backend_factory=lambda: backend_factory(settings), create_topics=False)
    stop = asyncio.Event()
    try:
        await admin.create_topics(
            [
                NewTopic(name, 1, 1)
                for name in (t.labels_topic, t.counts_topic, t.review_topic, t.events_topic)
            ]
        )
        task = asyncio.create_task(worker.run(stop))
        async with asyncio.timeout(90):
            while (state := worker.ready())[0] or "does not exist" not in state[1]:
                assert not task.done(), task
                await asyncio.sleep(0.1)
        assert dlq in state[1] and "--no-create-topics" in state[1]

        await admin.create_topics([NewTopic(dlq, 1, 1)])
        dead = await read_topic(services.bootstrap, dlq, 1, settle_s=0)
        labels = await read_topic(services.bootstrap, t.labels_topic, 2, settle_s=0)
        async with asyncio.timeout(30):
            while not worker.ready()[0]:
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)
        await admin.delete_topics(
            [
                n
                for n in (t.labels_topic, t.counts_topic, t.review_topic, t.events_topic, dlq)
                if n in await admin.list_topics()
            ]
        )
        await admin.close()
    assert dict(dead[0].headers)[codec.FRAME_ID] == ids[1].encode()
    assert sorted(codec.parse_label_record(r.value)["frame_id"] for r in labels) == sorted([ids[0], ids[2]])
