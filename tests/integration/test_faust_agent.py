"""The Faust agent loses nothing when a batch fails: a real Faust worker on the real broker."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter

import redis.asyncio as aioredis

from stream_worker import codec
from stream_worker.settings import TopicSettings
from tests.conftest import REPO, Services, TopicFactory
from tests.integration.test_worker import counts_by_source
from tests.support.media import street_jpegs
from tests.support.pipeline import produce_frames, read_topic


def faust_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "faust", "-A", "tests.support.faust_app", "worker", "-l", "warn"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def test_a_batch_that_fails_is_not_acknowledged_and_is_labelled_after_the_restart(
    services: Services, make_topic: TopicFactory, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    topic = await make_topic("faust-frames", partitions=2)
    frames = [(f"cam-{i % 4}", data) for i, data in enumerate(street_jpegs(60))]
    ids = await produce_frames(services.bootstrap, topic, frames)
    labels_topic = TopicSettings.named_after(topic).labels_topic
    await make_topic_named(services, labels_topic)
    env = {
        **os.environ,
        "LOOKOUT_FAUST_APP": f"lookout-test-{uuid.uuid4().hex[:8]}",
        "KAFKA_BOOTSTRAP": services.bootstrap,
        "REDIS_URL": services.redis_url,
        "LOOKOUT_FRAMES_TOPIC": topic,
        "LOOKOUT_LABELS_TOPIC": labels_topic,
        "LOOKOUT_COUNTS_TOPIC": labels_topic,  # counts records share the topic here; read by key below
        "LOOKOUT_DLQ_TOPIC": labels_topic,
        "LOOKOUT_KEY_PREFIX": key_prefix,
        "LOOKOUT_MAX_BATCH": "8",
        "LOOKOUT_MAX_WAIT_MS": "50",
    }
    # First run: the process dies after publishing the labels of its third batch, before the
    # batch is counted or acknowledged.
    first = faust_worker({**env, "LOOKOUT_FAULT_KILL_AT": "labels:3"})
    try:
        first.wait(timeout=180)
    except subprocess.TimeoutExpired:
        first.kill()
        raise AssertionError("the injected failure did not happen") from None
    assert first.returncode == -9, first.stderr.read().decode()[-2000:] if first.stderr else ""
    labelled_before = {
        codec.parse_label_record(r.value)["frame_id"]
        for r in await read_topic(services.bootstrap, labels_topic, 1, settle_s=2)
        if r.key and b"|" not in r.key
    }
    assert 0 < len(labelled_before) < len(ids)

    second = faust_worker(env)
    try:
        records = await read_topic(services.bootstrap, labels_topic, len(ids), timeout_s=180, settle_s=3)
    finally:
        second.terminate()
        second.wait(timeout=60)
    labelled = [codec.parse_label_record(r.value)["frame_id"] for r in records if r.key and b"|" not in r.key]
    assert set(labelled) == set(ids), "every frame is labelled, including the failed batch's"
    # Counts are exact although some batches were labelled twice.
    by_source = await counts_by_source(redis_client, key_prefix, "1m")
    assert {s: c["_frames"] for s, c in by_source.items()} == dict(Counter(s for s, _ in frames))


async def make_topic_named(services: Services, name: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=services.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        await admin.close()
