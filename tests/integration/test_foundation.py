"""The real broker and Redis behave as every other test assumes."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.conftest import Services, TopicFactory


async def test_produce_consume_round_trip_keeps_value_key_and_headers(
    services: Services, make_topic: TopicFactory
) -> None:
    topic = await make_topic("roundtrip")
    producer = AIOKafkaProducer(bootstrap_servers=services.bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    sent = []
    try:
        for i in range(20):
            value = bytes([i]) * (100 + i)
            headers = [("source-id", f"cam-{i % 3}".encode()), ("frame-id", f"f{i}".encode())]
            await producer.send_and_wait(topic, value, key=f"cam-{i % 3}".encode(), headers=headers)
            sent.append((value, f"cam-{i % 3}".encode(), headers))
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=services.bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    got = []
    try:
        async with asyncio.timeout(30):
            while len(got) < len(sent):
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    got.extend((r.value, r.key, list(r.headers)) for r in records)
    finally:
        await consumer.stop()
    assert got == [(v, k, [(hk, hv) for hk, hv in h]) for v, k, h in sent]


async def test_two_consumers_in_one_group_split_partitions_and_see_every_record_once(
    services: Services, make_topic: TopicFactory
) -> None:
    topic = await make_topic("group", partitions=4)
    group = f"g-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=services.bootstrap)
    await producer.start()
    try:
        for i in range(200):
            await producer.send(topic, str(i).encode(), key=str(i).encode())
        await producer.flush()
    finally:
        await producer.stop()

    consumers = [
        AIOKafkaConsumer(
            topic,
            bootstrap_servers=services.bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        for _ in range(2)
    ]
    for c in consumers:
        await c.start()
    seen: list[list[int]] = [[], []]
    try:
        async with asyncio.timeout(60):
            # Keep both polling until each owns partitions and together they have read everything.
            while sum(len(s) for s in seen) < 200 or not all(c.assignment() for c in consumers):
                for idx, c in enumerate(consumers):
                    batch = await c.getmany(timeout_ms=200)
                    for records in batch.values():
                        seen[idx].extend(int(r.value) for r in records)
        assignments = [c.assignment() for c in consumers]
    finally:
        for c in consumers:
            await c.stop()
    assert all(assignments), "each consumer should own at least one partition"
    assert not (assignments[0] & assignments[1]), "no partition may be owned twice"
    assert {tp.partition for a in assignments for tp in a} == {0, 1, 2, 3}
    assert sorted(seen[0] + seen[1]) == list(range(200))


async def test_committed_offsets_survive_a_new_consumer(services: Services, make_topic: TopicFactory) -> None:
    topic = await make_topic("commit")
    group = f"g-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=services.bootstrap)
    await producer.start()
    for i in range(10):
        await producer.send(topic, str(i).encode())
    await producer.flush()
    await producer.stop()
    tp = TopicPartition(topic, 0)

    first = AIOKafkaConsumer(
        topic,
        bootstrap_servers=services.bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await first.start()
    try:
        async with asyncio.timeout(30):
            records = []
            while len(records) < 6:
                records.extend(
                    (await first.getmany(tp, timeout_ms=500, max_records=6 - len(records))).get(tp, [])
                )
        await first.commit({tp: records[-1].offset + 1})
    finally:
        await first.stop()

    second = AIOKafkaConsumer(
        topic,
        bootstrap_servers=services.bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await second.start()
    try:
        async with asyncio.timeout(30):
            rest: list[int] = []
            while len(rest) < 4:
                rest.extend(int(r.value) for r in (await second.getmany(tp, timeout_ms=500)).get(tp, []))
    finally:
        await second.stop()
    assert rest == [6, 7, 8, 9]


async def test_redis_round_trip_with_a_lua_script(redis_client: aioredis.Redis, key_prefix: str) -> None:
    key = f"{key_prefix}:{{cam-1}}:counts"
    script = redis_client.register_script(
        "redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2]); return redis.call('HGET', KEYS[1], ARGV[1])"
    )
    assert int(await script(keys=[key], args=["car", 3])) == 3
    assert int(await script(keys=[key], args=["car", 2])) == 5
    assert await redis_client.hgetall(key) == {b"car": b"5"}
    await redis_client.delete(key)
