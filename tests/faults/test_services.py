"""Kafka or Redis going away under a running worker: it waits, then finishes exactly.

Both tests run against a broker or Redis of their own (scripts/services with private ports and
state dirs), so killing it does not disturb the other tests on the shared services.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.support.feeds import mixed_feed, produce_feed, scaled
from tests.support.outputs import OutputWatcher, assert_exact, record_result
from tests.support.services import PrivateServices
from tests.support.workers import Harness, Pipeline

REDIS_OUTAGE_S = 30


async def test_kafka_broker_killed_and_restarted_while_the_worker_runs(
    harness: Harness, private_kafka: tuple[str, PrivateServices]
) -> None:
    bootstrap, broker = private_kafka
    pipeline = await harness.pipeline(partitions=4, bootstrap=bootstrap)
    feed = mixed_feed(scaled(500), seed=13)
    await produce_feed(bootstrap, pipeline.frames_topic, feed)
    worker = harness.worker(pipeline).start()
    async with OutputWatcher(pipeline, [f.frame_id for f in feed]) as out:
        await out.wait_for(120, 180, workers=[worker])
        await asyncio.to_thread(broker.run, "kill", "kafka")
        down_at = time.monotonic()
        await asyncio.sleep(3)  # the worker sees the broker gone mid-batch
        await asyncio.to_thread(broker.run, "up", "kafka")
        up_at = time.monotonic()
        before = out.progress
        await out.wait_for(before + 1, 180, workers=[worker])
        recovery_s = time.monotonic() - up_at
        await out.wait_all(300, workers=[worker])
        assert await worker.stop() == 0, worker.tail()
    assert worker.count_in_log("worker started") == 1, "the worker should ride out the outage, not restart"
    report = await pipeline.verify()
    # Sends retried across the outage may repeat a label record; it must be the same record.
    assert_exact(report, duplicates_allowed=True)
    record_result(
        "kafka-broker-sigkill",
        report,
        broker_down_s=round(up_at - down_at, 1),
        recovery_after_broker_up_s=round(recovery_s, 1),
    )


async def test_redis_stopped_for_30s_pauses_the_worker_and_commits_nothing_uncounted(
    harness: Harness, private_redis: tuple[str, PrivateServices]
) -> None:
    redis_url, redis = private_redis
    pipeline = await harness.pipeline(partitions=4, redis_url=redis_url)
    feed = mixed_feed(scaled(500), seed=14)
    feeding = asyncio.create_task(produce_feed(pipeline.bootstrap, pipeline.frames_topic, feed, pause_s=1.0))
    # A short backoff cap, so the worker notices Redis back within seconds (the default is 30 s).
    worker = harness.worker(pipeline).start(LOOKOUT_RETRY_MAX_S="3")
    async with OutputWatcher(pipeline, [f.frame_id for f in feed]) as out:
        await out.wait_for(100, 180, workers=[worker])
        await asyncio.to_thread(redis.run, "down", "redis")
        down_at = time.monotonic()
        await asyncio.sleep(3)  # a batch counted just before the stop may still commit
        committed_early = await committed(pipeline)
        out_early = out.progress
        while time.monotonic() - down_at < REDIS_OUTAGE_S:
            await out.poll()
            assert worker.alive(), worker.tail()
        committed_late = await committed(pipeline)
        out_late = out.progress
        await asyncio.to_thread(redis.run, "up", "redis")
        up_at = time.monotonic()
        await out.wait_for(out_late + 1, 120, workers=[worker])
        recovery_s = time.monotonic() - up_at
        await feeding
        await out.wait_all(300, workers=[worker])
        assert await worker.stop() == 0, worker.tail()
    # Nothing was committed while Redis was down: the offsets only move after the counts do.
    assert committed_late == committed_early, (committed_early, committed_late)
    # At most the batches already in the sink got their labels out; then the worker paused.
    assert out_late - out_early <= 64, (out_early, out_late)
    assert worker.count_in_log("worker started") == 1
    report = await pipeline.verify()
    assert_exact(report, duplicates_allowed=False)
    record_result(
        "redis-stopped-30s",
        report,
        redis_down_s=round(up_at - down_at, 1),
        labelled_during_outage=out_late - out_early,
        recovery_after_redis_up_s=round(recovery_s, 1),
    )


async def test_redis_sigkilled_right_after_commits_loses_no_count_and_counts_nothing_twice(
    harness: Harness, private_redis: tuple[str, PrivateServices]
) -> None:
    # Redis runs as scripts/services runs it (appendonly, appendfsync always, noeviction): an
    # acknowledged count and its offset watermark are on disk before the worker commits. Each
    # kill lands while batches flow, so a commit has just followed the last acknowledged write.
    redis_url, redis = private_redis
    pipeline = await harness.pipeline(partitions=4, redis_url=redis_url)
    feed = mixed_feed(scaled(500), seed=15)
    feeding = asyncio.create_task(produce_feed(pipeline.bootstrap, pipeline.frames_topic, feed, pause_s=1.0))
    worker = harness.worker(pipeline).start(LOOKOUT_RETRY_MAX_S="2")
    kills = 3
    recoveries = []
    async with OutputWatcher(pipeline, [f.frame_id for f in feed]) as out:
        for k in range(kills):
            await out.wait_for(60 + k * 120, 180, workers=[worker])
            before = await committed(pipeline)
            await asyncio.to_thread(redis.run, "kill", "redis")
            await asyncio.to_thread(redis.run, "up", "redis")
            up_at = time.monotonic()
            # Recovered once the group commits past where it stood at the kill.
            async with asyncio.timeout(120):
                while not _moved_past(before, await committed(pipeline)):
                    await out.poll()
                    assert worker.alive(), worker.tail()
            recoveries.append(round(time.monotonic() - up_at, 1))
        await feeding
        await out.wait_all(300, workers=[worker])
        assert await worker.stop() == 0, worker.tail()
    assert worker.count_in_log("worker started") == 1
    report = await pipeline.verify()
    assert_exact(report, duplicates_allowed=False)
    record_result("redis-sigkill-x3", report, kills=kills, recovery_after_redis_up_s=max(recoveries))


def _moved_past(before: dict[int, int | None], now: dict[int, int | None]) -> bool:
    return any((now.get(p) or 0) > (offset or 0) for p, offset in before.items())


async def committed(pipeline: Pipeline) -> dict[int, int | None]:
    """The group's committed offset of every frames partition."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=pipeline.bootstrap, group_id=pipeline.group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = sorted(consumer.partitions_for_topic(pipeline.frames_topic) or range(4))
        return {p: await consumer.committed(TopicPartition(pipeline.frames_topic, p)) for p in partitions}
    finally:
        await consumer.stop()
