"""Every single-record fault of the reliability review in one feed, under a worker process.

The fault tier's feed is otherwise clean. Here the seeded mixed feed carries, on a stock-sized
dead-letter topic (Kafka's default 1 MiB limit) and a one-hour counts TTL:

* a record whose header name is not UTF-8 (case 1), in a record batch with good frames;
* a 2.6 MB record that no decoder takes, too large for its dead-letter topic (case 2);
* a frame dated a year ahead of its record (case 5) and a camera-trap SD card spanning five
  hours, more than the TTL (case 5);
* a hundred one-frame source ids (case 6);
* camera-trap frames keyed by something other than their source id (case 8).

The worker must stay up (one start), and the verifier must find nothing missing, nothing
twice, every count exact, and each bad record dead-lettered with its reason.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stream_worker import codec
from stream_worker.frames import SourceKind
from tests.support.feeds import mixed_feed, produce_feed, scaled
from tests.support.media import photo_jpeg, street_jpegs
from tests.support.outputs import OutputWatcher, assert_exact, record_result
from tests.support.pipeline import produce_frames
from tests.support.raw_records import RawRecord, produce_batch
from tests.support.workers import Harness

HOUR_MS = 3_600_000
STOCK_LIMIT = 1_048_588  # Kafka's default message.max.bytes


async def test_a_feed_with_every_single_record_fault_is_labelled_and_counted_exactly(
    harness: Harness,
) -> None:
    pipeline = await harness.pipeline(partitions=4)
    admin = AIOKafkaAdminClient(bootstrap_servers=pipeline.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(pipeline.dlq_topic, 1, 1, topic_configs={"max.message.bytes": str(STOCK_LIMIT)})]
        )
    finally:
        await admin.close()

    feed = mixed_feed(scaled(300), seed=21)
    await produce_feed(pipeline.bootstrap, pipeline.frames_topic, feed)
    expected = [f.frame_id for f in feed]
    streets = street_jpegs(8)
    cat = photo_jpeg("chelsea.png", quality=80)
    now_ms = int(time.time() * 1000)

    # Case 1: a header name that is not UTF-8, between good frames in one record batch.
    def raw(frame_id: str, extra: list[tuple[str | bytes, bytes | None]]) -> RawRecord:
        headers = codec.frame_headers("cam-raw", SourceKind.TRAFFIC, frame_id, now_ms, "image/jpeg")
        return RawRecord(b"cam-raw", streets[0], [*headers, *extra])

    raw_ids = [f"cam-raw/{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    await produce_batch(
        pipeline.bootstrap,
        pipeline.frames_topic,
        0,
        [raw(raw_ids[0], []), raw(raw_ids[1], [(b"cam\xe9ra-name", b"x")]), raw(raw_ids[2], [])],
    )
    # Case 2: junk too large for the stock-sized dead-letter topic.
    junk = await produce_frames(
        pipeline.bootstrap, pipeline.frames_topic, [("cam-junk", b"not an image " * 200_000)]
    )
    # Case 5: a camera clock a year ahead, and an SD card read out hours later.
    future = await produce_frames(
        pipeline.bootstrap,
        pipeline.frames_topic,
        [("cam-clock", streets[1])],
        start_ms=now_ms + 365 * 24 * HOUR_MS,
    )
    backfill = await produce_frames(
        pipeline.bootstrap,
        pipeline.frames_topic,
        [("trap-sd", cat)] * 6,
        kind=SourceKind.WILDLIFE,
        start_ms=now_ms - 5 * HOUR_MS,
        step_ms=HOUR_MS,
    )
    # Case 6: many source ids, one frame each.
    many = await produce_frames(
        pipeline.bootstrap, pipeline.frames_topic, [(f"cam-u{i}", streets[i % 8]) for i in range(100)]
    )
    # Case 8: camera-trap frames keyed by their shot number.
    stray = await produce_frames(
        pipeline.bootstrap,
        pipeline.frames_topic,
        [("trap-stray", cat)] * 4,
        kind=SourceKind.WILDLIFE,
        keys=[f"shot-{i}".encode() for i in range(4)],
        start_ms=now_ms,
    )
    expected += [*raw_ids, *junk, *future, *backfill, *many, *stray]

    worker = harness.worker(pipeline).start(LOOKOUT_COUNTS_TTL_S="3600")
    async with OutputWatcher(pipeline, expected) as out:
        await out.wait_all(300, workers=[worker])
        assert await worker.stop() == 0, worker.tail()
    assert worker.count_in_log("worker started") == 1, "one record must never stop the worker"

    report = await pipeline.verify()
    assert_exact(report, duplicates_allowed=False)
    reasons = Counter({reason: len(ids) for reason, ids in report.dead_lettered.items()})
    assert report.dead_lettered["header_name_not_utf8"] == [raw_ids[1]]
    assert report.dead_lettered["captured_at_in_future"] == future
    assert sorted(report.dead_lettered["key_not_source_id"]) == sorted(stray)
    assert sum(reasons.values()) == 1 + 1 + 1 + len(stray)  # and the junk, under its decode reason
    assert junk[0] in {fid for ids in report.dead_lettered.values() for fid in ids}
    record_result(
        "hostile-feed",
        report,
        dead_letters=", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items())),
        sources=len({f.source_id for f in feed}) + 100 + 6,
    )
