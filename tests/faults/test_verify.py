"""The verifier itself: it must pass a clean run and fail on every kind of damage it claims to see."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from stream_worker import codec, counting
from stream_worker.verify import (
    DeadLetter,
    InputFrame,
    expected_counts,
    latest_counts,
    read_to_end,
    reconcile,
)
from tests.support.feeds import mixed_feed, produce_feed
from tests.support.outputs import OutputWatcher
from tests.support.pipeline import read_topic
from tests.support.workers import WORKER_BIN, Harness, Pipeline

WINDOWS = [counting.WindowSpec.parse("1m")]


def label(
    frame_id: str, source: str, t: int, name: str, *, kind: str = "traffic", offset: int = 0
) -> dict[str, Any]:
    path = {"car": ["vehicle"], "cat": ["animal", "mammal"], "dog": ["animal", "mammal"]}.get(name, [])
    return {
        "schema_version": 1,
        "frame_id": frame_id,
        "source_id": source,
        "source_kind": kind,
        "captured_at": t,
        "processed_at": 1,
        "latency_ms": 2.0,
        "labels": [{"label": name, "score": 0.9, "path": [*path, name]}],
        "topic": "frames",
        "partition": 0,
        "offset": offset,
    }


def test_reference_counts_roll_up_labels_and_count_each_species_once_per_sequence() -> None:
    records = [
        label("a", "cam", 1_000, "car", offset=0),
        label("b", "cam", 2_000, "car", offset=1),
        label("c", "trap", 10_000, "cat", kind="wildlife", offset=2),
        label("d", "trap", 15_000, "cat", kind="wildlife", offset=3),  # same sequence: no new event
        label("e", "trap", 50_000, "dog", kind="wildlife", offset=4),  # gap 35 s > 30 s: new sequence
    ]
    expected = expected_counts(records, WINDOWS, gap_ms=30_000)
    assert expected[("cam", "1m", 0, "labels")] == {"_frames": 2, "car": 2, "vehicle": 2}
    assert expected[("trap", "1m", 0, "labels")] == {
        "_frames": 3,
        "cat": 2,
        "dog": 1,
        "animal": 3,
        "mammal": 3,
    }
    assert expected[("trap", "1m", 0, "events")] == {"cat": 1, "dog": 1}


def test_reference_events_follow_each_source_whatever_the_partitions() -> None:
    # One camera trap's frames spread over two partitions (not keyed by source id) are still one
    # sequence: the expectation must not copy the worker's per-partition event state, or verify
    # could never see a worker that opened one sequence per partition.
    records = [
        {**label("c", "trap", 10_000, "cat", kind="wildlife", offset=0), "partition": 0},
        {**label("d", "trap", 12_000, "cat", kind="wildlife", offset=0), "partition": 1},
    ]
    assert expected_counts(records, WINDOWS, gap_ms=30_000)[("trap", "1m", 0, "events")] == {"cat": 1}


def test_a_lost_frame_that_shares_its_id_with_a_labelled_one_is_missing() -> None:
    inputs = [
        InputFrame("x", "frames", 0, 0),
        InputFrame("x", "frames", 0, 1),
        InputFrame("y", "frames", 0, 2),
    ]
    labelled = [label("x", "cam", 1_000, "car", offset=0)]
    report = reconcile(
        inputs,
        labelled,
        [DeadLetter("y", "truncated", ("frames", 0, 2))],
        windows=WINDOWS,
        gap_ms=30_000,
        redis_counts=None,
        topic_counts=None,
    )
    assert report.missing == ["x (frames/0/1)"] and report.repeated_inputs == ["x"] and not report.ok


def test_reconcile_reports_missing_duplicates_dead_letters_and_wrong_counts() -> None:
    inputs = [InputFrame(fid, "frames", 0, i) for i, fid in enumerate("abcde")]
    a = label("a", "cam", 1_000, "car", offset=0)
    a_again = {**a, "processed_at": 99, "latency_ms": 50.0}  # a replay: only timing differs
    b = label("b", "cam", 2_000, "car", offset=1)
    b_other = label("b", "cam", 2_000, "cat", offset=1)  # same frame id, different labels
    ghost = label("zz", "cam", 3_000, "car", offset=9)
    truth = {("cam", "1m", 0, "labels"): {"_frames": 2, "car": 2, "vehicle": 2}}
    wrong = {("cam", "1m", 0, "labels"): {"_frames": 3, "car": 2, "vehicle": 2}}

    report = reconcile(
        inputs,
        [a, a_again, b, b_other],
        [DeadLetter("c", "truncated"), DeadLetter("d", "too_large")],
        windows=WINDOWS,
        gap_ms=30_000,
        redis_counts=wrong,
        topic_counts=truth,
    )
    assert report.missing == ["e"]
    assert [(d.frame_id, d.copies, d.identical) for d in report.duplicates] == [
        ("a", 2, True),
        ("b", 2, False),
    ]
    assert report.dead_lettered == {"too_large": ["d"], "truncated": ["c"]}
    assert [(m.field, m.expected, m.actual) for m in report.redis_mismatches] == [("_frames", 2, 3)]
    assert not report.topic_mismatches and not report.counts_exact and not report.ok
    assert "missing: 1" in report.format() and "expected 2, found 3" in report.format()

    clean = reconcile(
        inputs[:2], [a, b, ghost], [], windows=WINDOWS, gap_ms=30_000, redis_counts=truth, topic_counts=truth
    )
    assert clean.unexpected == ["zz"] and not clean.ok  # a label for a frame that never went in
    exact = reconcile(
        inputs[:2], [a, b], [], windows=WINDOWS, gap_ms=30_000, redis_counts=truth, topic_counts=truth
    )
    assert exact.ok and exact.as_dict()["counts_exact"] is True


def test_the_counts_topic_is_read_as_compaction_leaves_it() -> None:
    key, old = codec.count_record("cam", "1m", 0, {"_frames": 1, "car": 1})
    _, new = codec.count_record("cam", "1m", 0, {"_frames": 2, "car": 2})
    gone, value = codec.count_record("cam", "1m", 60_000, {"_frames": 1})
    latest = latest_counts([(key, old), (gone, value), (key, new), (gone, None)])
    assert latest == {("cam", "1m", 0, "labels"): {"_frames": 2, "car": 2}}


async def test_verify_passes_a_clean_run_and_fails_on_a_lost_frame_and_a_corrupted_count(
    harness: Harness, redis_client: aioredis.Redis
) -> None:
    pipeline = await harness.pipeline(partitions=3)
    feed = mixed_feed(90, seed=7)
    await produce_feed(pipeline.bootstrap, pipeline.frames_topic, feed)
    worker = harness.worker(pipeline).start()
    async with OutputWatcher(pipeline, [f.frame_id for f in feed]) as out:
        await out.wait_all(180, workers=[worker])
    assert await worker.stop() == 0, worker.tail()

    cli = [str(WORKER_BIN), "verify", *verify_flags(pipeline), "--json"]
    clean = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    result = json.loads(clean.stdout)
    for key in ("missing", "duplicates", "dead_lettered", "counts_exact", "redis_mismatches"):
        assert key in result
    assert result["frames_in"] == result["labelled"] == len(feed) and result["counts_exact"] is True
    # The feed really exercises camera-trap events, so their check is not vacuous.
    assert any(k[0].startswith("trap") and k[3] == "events" for k in await _event_keys(pipeline))

    # A frame that no worker ever labels is reported missing, and the verdict is a failure.
    lost = mixed_feed(1, seed=8)
    await produce_feed(pipeline.bootstrap, pipeline.frames_topic, lost)
    report = await pipeline.verify()
    assert report.missing == [lost[0].frame_id] and not report.ok

    # A count corrupted in Redis (one more car than there were) is reported where it is.
    keys = [k async for k in redis_client.scan_iter(match=f"{pipeline.key_prefix}:*:c:cam-*:1m:*")]
    assert keys
    await redis_client.hincrby(keys[0], "_frames", 1)
    report = await pipeline.verify()
    (mismatch,) = report.redis_mismatches
    assert mismatch.field == "_frames" and mismatch.actual == mismatch.expected + 1
    assert not report.topic_mismatches and not report.counts_exact

    # A second label record of a frame with different labels is a non-identical duplicate.
    producer = AIOKafkaProducer(bootstrap_servers=pipeline.bootstrap)
    await producer.start()
    try:
        records = await read_topic(pipeline.bootstrap, pipeline.labels_topic, len(feed), settle_s=0)
        (real,) = [
            r
            for r in map(codec.parse_label_record, (r.value for r in records))
            if r["frame_id"] == feed[0].frame_id
        ]
        forged = {**real, "labels": label(feed[0].frame_id, feed[0].source_id, 0, "dog")["labels"]}
        await producer.send_and_wait(pipeline.labels_topic, json.dumps(forged).encode())
    finally:
        await producer.stop()
    failed = subprocess.run(cli[:-1], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert "FAILED" in failed.stdout and "DIFFERENT" in failed.stdout and "missing: 1" in failed.stdout


def verify_flags(pipeline: Pipeline) -> list[str]:
    s = pipeline.settings()
    return [
        "--bootstrap",
        s.kafka.bootstrap,
        "--redis-url",
        s.redis.redis_url,
        "--frames-topic",
        pipeline.frames_topic,
        "--labels-topic",
        s.topics.labels_topic,
        "--counts-topic",
        s.topics.counts_topic,
        "--key-prefix",
        s.redis.key_prefix,
        "--windows",
        ",".join(s.counts.windows),
        "--event-gap-s",
        str(s.counts.event_gap_s),
    ]


async def _event_keys(pipeline: Pipeline) -> list[tuple[str, str, int, str]]:
    records = await read_to_end(pipeline.settings(), pipeline.counts_topic)
    return list(latest_counts((r.key, r.value) for r in records))
