"""A dead letter or review sample larger than its topic allows never stops the worker.

Against the real broker and Redis. The test broker raises ``message.max.bytes`` for the whole
broker (frames of up to 25 MB); a production broker keeps Kafka's default of about 1 MiB, which
is what a topic created without its own ``max.message.bytes`` gets there. Before the fix, the
first bad frame over that size made the worker exit (``MessageSizeTooLargeError`` was fatal),
and the restarted worker met the same frame again: a crash loop.
"""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from stream_worker import codec
from stream_worker.service import prepare_topics
from tests.conftest import Services, TopicFactory
from tests.support.media import street_jpegs
from tests.support.pipeline import produce_frames, read_topic, running_worker, worker_settings

DEFAULT_LIMIT = 1_048_588  # Kafka's default message.max.bytes


async def test_a_dead_letter_over_its_topics_limit_is_written_without_its_payload(
    services: Services, make_topic: TopicFactory, key_prefix: str
) -> None:
    topic = await make_topic("frames")
    # The dead-letter topic exists already, with a default-sized limit (as on a stock broker).
    dlq = await make_topic(f"{topic}.dlq-", config={"max.message.bytes": str(DEFAULT_LIMIT)})
    junk = b"not an image " * 200_000  # 2.6 MB that no decoder will take
    good = street_jpegs(3)
    ids = await produce_frames(services.bootstrap, topic, [("cam-1", good[0]), ("cam-1", junk)])
    later = await produce_frames(services.bootstrap, topic, [("cam-2", data) for data in good[1:]])
    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix, dlq_topic=dlq)
    async with running_worker(settings):
        labels = await read_topic(services.bootstrap, settings.topics.labels_topic, 3)
        dead = await read_topic(services.bootstrap, dlq, 1)

    assert {codec.parse_label_record(r.value)["frame_id"] for r in labels} == {ids[0], *later}
    assert len(dead) == 1 and dead[0].value in (b"", None)
    headers = dict(dead[0].headers)
    assert headers[codec.FRAME_ID] == ids[1].encode()
    assert headers["lookout.payload.dropped-bytes"] == str(len(junk)).encode()
    assert headers["__connect.errors.topic"] == topic.encode()
    assert headers["__connect.errors.offset"] == b"1"


async def test_output_topics_that_carry_frames_are_made_large_enough_for_them(
    services: Services, make_topic: TopicFactory, key_prefix: str
) -> None:
    topic = await make_topic("frames")
    settings = worker_settings(
        services.bootstrap, services.redis_url, topic, key_prefix, max_frame_bytes=5_000_000
    )
    await prepare_topics(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=services.bootstrap)
    await admin.start()
    try:
        names = [settings.topics.dlq_topic.format(topic=topic), settings.topics.review_topic]
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        )
        await admin.delete_topics([*names, settings.topics.labels_topic, settings.topics.counts_topic])
    finally:
        await admin.close()
    limits = {
        resource[3]: {entry[0]: entry[1] for entry in resource[4]}["max.message.bytes"]
        for response in described
        for resource in response.resources
    }
    # Room for the largest frame the worker keeps, plus 1 MiB for its headers; set on the topic
    # itself, so a stock broker's default (about 1 MiB) does not apply.
    assert limits == dict.fromkeys(names, str(5_000_000 + 1_048_576))
