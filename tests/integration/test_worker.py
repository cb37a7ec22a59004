"""The worker end to end against the real broker and Redis (issue 4's 'done when')."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import OffsetAndMetadata

from stream_worker import codec
from stream_worker.errors import LookoutError
from stream_worker.frames import SourceKind
from stream_worker.sinks.counts import CountsReader
from stream_worker.verify import verify
from stream_worker.worker import Worker
from tests.conftest import Services, TopicFactory
from tests.support.media import photo_jpeg, photo_png, street_jpegs
from tests.support.pipeline import produce_frames, read_topic, running_worker, worker_settings

SOURCES = ("cam-north", "cam-south", "cam-east", "cam-west", "cam-gate")


async def counts_by_source(
    redis_client: aioredis.Redis, prefix: str, window: str
) -> dict[str, dict[str, int]]:
    counts = CountsReader(redis_client, key_prefix=prefix)
    out: dict[str, dict[str, int]] = {}
    for source in await counts.sources():
        total: Counter[str] = Counter()
        for w in await counts.read(source, window):
            total["_frames"] += w.frames
            total.update(w.labels)
        out[source] = dict(total)
    return out


async def test_every_frame_is_labelled_once_and_counted_exactly(
    services: Services, make_topic: TopicFactory, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    topic = await make_topic("frames", partitions=4)
    images = street_jpegs(120)
    frames = [(SOURCES[i % len(SOURCES)], data) for i, data in enumerate(images)]
    ids = await produce_frames(services.bootstrap, topic, frames, step_ms=7_000)
    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix, windows="1m,15m")
    async with running_worker(settings):
        labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(ids))
    records = [codec.parse_label_record(r.value) for r in labels]
    assert len(records) == len(ids)
    assert sorted(r["frame_id"] for r in records) == sorted(ids)
    for r, record in zip(records, labels, strict=True):
        assert record.key.decode() == r["source_id"]
        assert r["labels"] and r["top_k"] and r["model"]["backend"] == "onnxruntime"

    # Redis: per source and window, frames sum to what was sent, in both window sizes.
    sent = Counter(source for source, _ in frames)
    for window in ("1m", "15m"):
        by_source = await counts_by_source(redis_client, key_prefix, window)
        assert {s: c["_frames"] for s, c in by_source.items()} == dict(sent)
    # Each frame's labels (leaf + parents) are counted once: recompute from the label records.
    expected: dict[str, Counter[str]] = {}
    for r in records:
        names = {name for lab in r["labels"] for name in (lab["label"], *lab["path"]) if name != "unknown"}
        expected.setdefault(r["source_id"], Counter()).update(names or {"unknown"})
    by_source = await counts_by_source(redis_client, key_prefix, "1m")
    for source, counter in expected.items():
        assert {k: v for k, v in by_source[source].items() if k != "_frames"} == dict(counter)

    # The compacted counts topic carries the same absolute values as Redis (latest per key).
    count_records = await read_topic(services.bootstrap, settings.topics.counts_topic, 1, settle_s=2.0)
    latest: dict[bytes, dict[str, object]] = {}
    for rec in count_records:
        latest[rec.key] = codec.parse_count_record(rec.value)
    topic_totals: dict[str, Counter[str]] = {}
    for value in latest.values():
        if value["window"] == "1m" and value["kind"] == "labels":
            topic_totals.setdefault(str(value["source_id"]), Counter()).update(value["counts"])  # type: ignore[arg-type]
    assert {s: dict(c) for s, c in topic_totals.items()} == by_source


async def test_bad_frames_are_dead_lettered_once_and_good_frames_around_them_labelled(
    services: Services, make_topic: TopicFactory, key_prefix: str
) -> None:
    topic = await make_topic("frames", partitions=2)
    good = street_jpegs(12)
    jpeg = good[0]
    big_png = photo_png("astronaut.png")  # ~790 kB: over the cap set below
    bad = {
        "corrupt": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "truncated": jpeg[: len(jpeg) // 2],
        "mistyped": photo_png("chelsea.png"),  # PNG bytes declared as JPEG
        "oversized": big_png,
        "not-an-image": b"GIF89a" + b"\x00" * 100,
    }
    frames: list[tuple[str, bytes]] = []
    for i, data in enumerate(bad.values()):
        frames.extend([("cam-1", good[2 * i]), ("cam-1", data), ("cam-1", good[2 * i + 1])])
    ids = await produce_frames(services.bootstrap, topic, frames)
    bad_ids = {ids[3 * i + 1]: name for i, name in enumerate(bad)}
    settings = worker_settings(
        services.bootstrap, services.redis_url, topic, key_prefix, max_frame_bytes=500_000
    )
    async with running_worker(settings):
        labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(ids) - len(bad))
        dead = await read_topic(services.bootstrap, f"{topic}.dlq", len(bad))
    labelled = sorted(codec.parse_label_record(r.value)["frame_id"] for r in labels)
    assert labelled == sorted(set(ids) - set(bad_ids))
    assert len(dead) == len(bad)
    by_frame = {}
    for record in dead:
        headers = dict(record.headers)
        by_frame[headers["frame-id"].decode()] = (record, headers)
    assert set(by_frame) == set(bad_ids)
    for frame_id, (record, headers) in by_frame.items():
        assert headers["__connect.errors.topic"] == topic.encode()
        assert int(headers["__connect.errors.offset"]) >= 0
        assert headers["__connect.errors.stage"] in (b"guard", b"decode", b"headers")
        assert headers["__connect.errors.exception.class.name"].endswith(b"BadFrame")
        assert headers["__connect.errors.exception.message"]
        assert headers["lookout.errors.reason"]
        original = frames[ids.index(frame_id)][1]
        if bad_ids[frame_id] == "oversized":
            assert headers["lookout.errors.reason"] == b"too_large"
            assert record.value in (b"", None)  # over the cap: bytes not copied
        else:
            assert record.value == original
    assert (
        dict(by_frame[next(k for k, v in bad_ids.items() if v == "mistyped")][1])["lookout.errors.reason"]
        == b"magic_mismatch"
    )


async def test_two_workers_split_the_partitions_and_label_every_frame_once(
    services: Services, make_topic: TopicFactory, key_prefix: str
) -> None:
    topic = await make_topic("frames", partitions=4)
    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix)
    async with running_worker(settings) as first, running_worker(settings) as second:
        # Each member reports its own view, and during the join the first still lists its old
        # partitions: the split is judged once both views agree (or never, within a minute).
        def views() -> list[frozenset[TopicPartition]]:
            return [w._consumer.assignment() if w._consumer else frozenset() for w in (first, second)]

        try:
            async with asyncio.timeout(60):
                while not (
                    all(views()) and not views()[0] & views()[1] and len(views()[0] | views()[1]) == 4
                ):
                    await asyncio.sleep(0.2)
        except TimeoutError:
            raise AssertionError(
                f"the group never split the 4 partitions between both workers: {views()}"
            ) from None
        owned = [first._consumer.assignment(), second._consumer.assignment()]
        frames = [(f"cam-{i % 8}", data) for i, data in enumerate(street_jpegs(80))]
        ids = await produce_frames(services.bootstrap, topic, frames)
        labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(ids), settle_s=2.0)
    assert not owned[0] & owned[1] and len(owned[0] | owned[1]) == 4
    frame_ids = [codec.parse_label_record(r.value)["frame_id"] for r in labels]
    assert sorted(frame_ids) == sorted(ids)  # all of them, none twice
    per_worker = [
        first.metrics.frames_out.labels(topic)._value.get(),
        second.metrics.frames_out.labels(topic)._value.get(),
    ]
    assert all(n > 0 for n in per_worker) and sum(per_worker) == len(ids)


async def test_a_batch_replayed_after_a_crash_leaves_counts_unchanged(
    services: Services, make_topic: TopicFactory, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    topic = await make_topic("frames", partitions=2)
    frames = [(SOURCES[i % 3], data) for i, data in enumerate(street_jpegs(40))]
    frames += [("trap-1", photo_jpeg("chelsea.png"))] * 3
    ids = await produce_frames(services.bootstrap, topic, frames, kind=SourceKind.WILDLIFE)
    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix)
    async with running_worker(settings):
        await read_topic(services.bootstrap, settings.topics.labels_topic, len(ids))
    before = await counts_by_source(redis_client, key_prefix, "1m")
    events_before = [
        w.events for w in await CountsReader(redis_client, key_prefix=key_prefix).read("trap-1", "1m")
    ]

    # Simulate a crash between the Redis update and the commit: rewind the group to offset 0.
    rewind = AIOKafkaConsumer(
        bootstrap_servers=services.bootstrap, group_id=settings.topics.group, enable_auto_commit=False
    )
    await rewind.start()
    try:
        rewind.assign([TopicPartition(topic, p) for p in (0, 1)])
        await rewind.commit({TopicPartition(topic, p): OffsetAndMetadata(0, "") for p in (0, 1)})
    finally:
        await rewind.stop()

    async with running_worker(settings) as worker:
        async with asyncio.timeout(60):
            while not (worker._consumer and worker._consumer.assignment()):
                await asyncio.sleep(0.2)
        await asyncio.sleep(5)  # time enough to replay the whole topic if it were going to
    assert await counts_by_source(redis_client, key_prefix, "1m") == before
    events_after = [
        w.events for w in await CountsReader(redis_client, key_prefix=key_prefix).read("trap-1", "1m")
    ]
    assert events_after == events_before and sum(sum(e.values()) for e in events_after) >= 1
    labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(ids), settle_s=2.0)
    assert len(labels) == len(ids), "the watermark should stop the replay before any label is repeated"
    json.dumps(before)  # counts are plain data


async def test_low_confidence_frames_are_sampled_for_review_and_drift_is_exported(
    services: Services, make_topic: TopicFactory, key_prefix: str
) -> None:
    topic = await make_topic("frames", partitions=1)
    frames = [(f"cam-{i % 2}", data) for i, data in enumerate(street_jpegs(20))]
    ids = await produce_frames(services.bootstrap, topic, frames)
    # A threshold of 1 makes every frame low-confidence; the rate samples half of them by frame id.
    settings = worker_settings(
        services.bootstrap,
        services.redis_url,
        topic,
        key_prefix,
        review_threshold=1.0,
        review_sample_rate=0.5,
    )
    async with running_worker(settings) as worker:
        await read_topic(services.bootstrap, settings.topics.labels_topic, len(ids))
        reviewed = await read_topic(services.bootstrap, settings.topics.review_topic, 1, settle_s=2)
        exposition = worker.metrics.render().decode()
    assert 0 < len(reviewed) < len(ids)
    by_id = dict(zip(ids, (data for _, data in frames), strict=True))
    for record in reviewed:
        headers = dict(record.headers)
        labels = codec.parse_label_record(headers["lookout-labels"])
        assert record.value == by_id[labels["frame_id"]]  # the original frame, for a human to label
    # The drift signal per source: every frame counted as low-confidence here.
    for source in ("cam-0", "cam-1"):
        assert f'lookout_drift_low_confidence_share{{source="{source}"}} 1.0' in exposition
    assert f'lookout_frames_labelled_total{{topic="{topic}"}} {float(len(ids))}' in exposition


async def test_sigterm_during_a_redis_outage_gives_up_after_the_deadline_and_commits_nothing(
    services: Services, make_topic: TopicFactory, key_prefix: str
) -> None:
    topic = await make_topic("frames", partitions=1)
    await produce_frames(services.bootstrap, topic, [("cam-1", d) for d in street_jpegs(10)])
    # Nothing listens on this port: every counts write fails with a retriable error.
    settings = worker_settings(
        services.bootstrap, "redis://127.0.0.1:9/0", topic, key_prefix, drain_deadline_s=2, retry_max_s=1
    )
    from stream_worker.service import backend_factory, prepare_topics

    await prepare_topics(settings)
    worker = Worker(settings, backend_factory=lambda: backend_factory(settings))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    async with asyncio.timeout(120):
        while worker.metrics.retries.labels("ServiceUnavailable")._value.get() < 2:
            await asyncio.sleep(0.2)
    stop.set()
    started = asyncio.get_running_loop().time()
    with pytest.raises(LookoutError, match="drain deadline passed with 10 frames uncommitted"):
        await asyncio.wait_for(task, timeout=30)
    assert asyncio.get_running_loop().time() - started < 15
    check = AIOKafkaConsumer(bootstrap_servers=services.bootstrap, group_id=settings.topics.group)
    await check.start()
    try:
        assert await check.committed(TopicPartition(topic, 0)) is None  # nothing uncounted was committed
    finally:
        await check.stop()


async def test_a_frames_pattern_labels_every_match_and_never_reads_the_workers_own_topics(
    services: Services, key_prefix: str
) -> None:
    # Every topic here matches the pattern: the frames topics, the labels/counts/review topics
    # and the dead-letter topics (`{topic}.dlq` always starts with its frames topic's name).
    prefix = f"pat-{uuid.uuid4().hex[:8]}-"
    a, b = f"{prefix}a", f"{prefix}b"
    admin = AIOKafkaAdminClient(bootstrap_servers=services.bootstrap)
    await admin.start()
    try:
        # a's dead-letter topic is made by the operator; b's must be made by the worker
        # (the broker does not auto-create topics).
        await admin.create_topics([NewTopic(t, 2 if t != f"{a}.dlq" else 1, 1) for t in (a, b, f"{a}.dlq")])
        good = street_jpegs(8)
        corrupt = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4
        ids_a = await produce_frames(services.bootstrap, a, [("cam-a", f) for f in [*good[:4], corrupt]])
        ids_b = await produce_frames(services.bootstrap, b, [("cam-b", f) for f in [*good[4:], corrupt]])
        settings = worker_settings(
            services.bootstrap,
            services.redis_url,
            a,
            key_prefix,
            frames_pattern=f"{prefix}.*",
            labels_topic=f"{prefix}labels",
            counts_topic=f"{prefix}counts",
            review_topic=f"{prefix}review",
            events_topic=f"{prefix}events",
        )
        async with running_worker(settings):
            labels = await read_topic(services.bootstrap, settings.topics.labels_topic, 8, settle_s=5)
            dead_a = await read_topic(services.bootstrap, f"{a}.dlq", 1, settle_s=2)
            dead_b = await read_topic(services.bootstrap, f"{b}.dlq", 1, settle_s=2)
        topics = {t for t in await admin.list_topics() if t.startswith(prefix)}
    finally:
        await admin.close()
    labelled = sorted(codec.parse_label_record(r.value)["frame_id"] for r in labels)
    assert labelled == sorted(ids_a[:4] + ids_b[:4])
    assert [dict(r.headers)["frame-id"].decode() for r in dead_a] == [ids_a[4]]
    assert [dict(r.headers)["frame-id"].decode() for r in dead_b] == [ids_b[4]]
    # No dead letters of dead letters, no records of the worker's own outputs taken as frames.
    assert topics == {
        a,
        b,
        f"{a}.dlq",
        f"{b}.dlq",
        *(f"{prefix}{t}" for t in ("labels", "counts", "review", "events")),
    }


async def test_a_byte_budget_bounds_large_frames_in_flight_and_every_frame_is_labelled(
    services: Services, make_topic: TopicFactory, key_prefix: str
) -> None:
    # PNG frames of 240-470 kB under a 1 MB budget: the record budget (256) never binds,
    # the byte budget does, and the worker pauses and resumes on it without losing a frame.
    topic = await make_topic("frames", partitions=2)
    photos = [photo_png(name) for name in ("chelsea.png", "coffee.png", "rocket.jpg")]
    frames = [(f"cam-{i % 3}", photos[i % 3]) for i in range(30)]
    largest = max(len(data) for _, data in frames)
    budget = 1_000_000
    assert 2 * largest < budget < 30 * largest
    ids = await produce_frames(services.bootstrap, topic, frames, content_type="image/png")
    settings = worker_settings(
        services.bootstrap,
        services.redis_url,
        topic,
        key_prefix,
        max_in_flight_bytes=budget,
        max_frame_bytes=budget,
        max_batch=4,
        max_in_flight=256,
    )
    peak = 0.0
    async with running_worker(settings) as worker:
        reading = asyncio.create_task(read_topic(services.bootstrap, settings.topics.labels_topic, len(ids)))
        while not reading.done():
            peak = max(peak, worker.metrics.in_flight_bytes._value.get())
            await asyncio.sleep(0.01)
        labels = reading.result()
    assert sorted(codec.parse_label_record(r.value)["frame_id"] for r in labels) == sorted(ids)
    # At most the budget plus what one fetch brought in after it was reached.
    assert 0 < peak <= budget + 4 * 4 * largest


async def test_a_new_topic_matching_the_pattern_mid_batch_still_commits_the_drained_batch(
    services: Services, key_prefix: str
) -> None:
    # aiokafka drops the assignment of a pattern subscription that matched a new topic before it
    # calls on_partitions_revoked: the batch drained there was labelled and counted, but its
    # commit was skipped (filtered against the empty assignment), silently.
    prefix = f"grow-{uuid.uuid4().hex[:8]}-"
    a, b = f"{prefix}a", f"{prefix}b"
    admin = AIOKafkaAdminClient(bootstrap_servers=services.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(a, 1, 1)])
        ids_a = await produce_frames(services.bootstrap, a, [("cam-a", f) for f in street_jpegs(16)])
        settings = worker_settings(
            services.bootstrap,
            services.redis_url,
            a,
            key_prefix,
            frames_pattern=f"{prefix}[ab]$",
            labels_topic=f"{prefix}labels",
            counts_topic=f"{prefix}counts",
            review_topic=f"{prefix}review",
            events_topic=f"{prefix}events",
            max_batch=16,
            fault_infer_delay_ms=4000,
            metadata_max_age_ms=300,
        )
        async with running_worker(settings) as worker:
            async with asyncio.timeout(60):  # the whole of topic a is one batch, in inference
                while worker.metrics.in_flight._value.get() < len(ids_a):
                    await asyncio.sleep(0.05)
            await admin.create_topics([NewTopic(b, 1, 1)])
            ids_b = await produce_frames(services.bootstrap, b, [("cam-b", f) for f in street_jpegs(2)])
            labels = await read_topic(services.bootstrap, settings.topics.labels_topic, 18, settle_s=0)
        check = AIOKafkaConsumer(bootstrap_servers=services.bootstrap, group_id=settings.topics.group)
        await check.start()
        try:
            committed = await check.committed(TopicPartition(a, 0))
        finally:
            await check.stop()
    finally:
        await admin.delete_topics([t for t in await admin.list_topics() if t.startswith(prefix)])
        await admin.close()
    labelled = [codec.parse_label_record(r.value)["frame_id"] for r in labels]
    assert sorted(labelled) == sorted(ids_a + ids_b)
    assert committed == len(ids_a)


async def test_camera_trap_frames_not_keyed_by_their_source_are_dead_lettered_with_the_reason(
    services: Services, make_topic: TopicFactory, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    # Keyed by something else, one trap's frames spread over the partitions, and the worker
    # (whose event state is per partition) opened one sequence per partition: one animal was
    # counted as several events, and verify, using the same rule, could not see it.
    topic = await make_topic("frames", partitions=4)
    cat = photo_jpeg("chelsea.png")
    stray = await produce_frames(
        services.bootstrap,
        topic,
        [("trap-9", cat)] * 6,
        kind=SourceKind.WILDLIFE,
        keys=[f"shot-{i}".encode() for i in range(5)] + [None],
    )
    keyed = await produce_frames(services.bootstrap, topic, [("trap-1", cat)] * 3, kind=SourceKind.WILDLIFE)
    traffic = await produce_frames(services.bootstrap, topic, [("cam-1", street_jpegs(1)[0])], keys=[b"any"])
    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix, event_gap_s=30)
    async with running_worker(settings):
        labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(keyed) + 1)
        dead = await read_topic(services.bootstrap, settings.topics.dlq_topic.format(topic=topic), len(stray))

    assert sorted(codec.parse_label_record(r.value)["frame_id"] for r in labels) == sorted([*keyed, *traffic])
    assert sorted(dict(r.headers)[codec.FRAME_ID].decode() for r in dead) == sorted(stray)
    assert {dict(r.headers)[codec.REASON_HEADER] for r in dead} == {b"key_not_source_id"}
    events = [w.events for w in await CountsReader(redis_client, key_prefix=key_prefix).read("trap-1", "1m")]
    assert sum(sum(e.values()) for e in events) == 1
    report = await verify(settings)
    assert report.ok, report.format()
