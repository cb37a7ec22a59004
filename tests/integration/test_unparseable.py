"""A record the Kafka client cannot parse must not stop the worker (issue #13, case 1).

Real broker, real Redis, the worker in this process. A header name that is not UTF-8 (a
librdkafka producer can write one; the broker stores it) used to make aiokafka raise
``UnicodeDecodeError`` inside ``getmany``: the poll stage died, the worker exited, and every
worker that took the partition died on the same offset. Now the record is dead-lettered, and
every good frame, before it and after it in the same record batch, and on the other partition
fetched alongside, is labelled exactly once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from prometheus_client import Counter as PromCounter

from stream_worker import codec
from stream_worker.verify import verify
from stream_worker.worker import Worker
from tests.conftest import Services, TopicFactory
from tests.support.media import street_jpegs
from tests.support.outputs import assert_exact
from tests.support.pipeline import read_topic, running_worker, worker_settings
from tests.support.raw_records import RawRecord, produce_batch

START_MS = 1_790_000_000_000
RAW_NAME = b"cam\xe9ra-name"  # "caméra-name" written in Latin-1 by a C producer


def _total(counter: PromCounter) -> float:
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


async def wait_until_out(worker: Worker, labelled: int, dead: int, timeout_s: float = 120) -> None:
    """Until the worker has labelled and dead-lettered that many frames; fails at once if it died."""
    async with asyncio.timeout(timeout_s):
        while _total(worker.metrics.frames_out) < labelled or _total(worker.metrics.frames_dead) < dead:
            alive, why = worker.live()
            assert alive, why
            await asyncio.sleep(0.2)


class Frames:
    """Frames of one camera with unique frame ids and increasing capture times."""

    def __init__(self, images: Sequence[bytes]) -> None:
        self._images = iter(images)
        self.sequence = 0
        self.good: list[str] = []
        self.bad: list[str] = []

    def record(self, *, extra: Sequence[tuple[str | bytes, bytes | None]] = ()) -> RawRecord:
        """A real street frame; with ``extra`` headers it is one that must be dead-lettered."""
        self.sequence += 1
        frame_id = f"cam-1/{self.sequence}-{uuid.uuid4().hex[:6]}"
        headers: list[tuple[str | bytes, bytes | None]] = [
            *codec.frame_headers("cam-1", "traffic", frame_id, START_MS + self.sequence * 1000, "image/jpeg"),
            *extra,
        ]
        (self.bad if extra else self.good).append(frame_id)
        return RawRecord(b"cam-1", next(self._images), headers)

    def batch(self, count: int) -> list[RawRecord]:
        """``count`` good frames."""
        return [self.record() for _ in range(count)]


async def test_a_header_name_that_is_not_utf8_is_dead_lettered_and_its_batch_neighbours_are_labelled(
    services: Services, make_topic: TopicFactory, key_prefix: str
) -> None:
    topic = await make_topic("frames", partitions=2)
    frames = Frames(street_jpegs(20))
    # Partition 0: a batch of 3 frames; then ONE record batch of 3 frames, the bad record and
    # 3 frames; then a last batch of 2. Partition 1: 4 frames, fetched in the same poll.
    bad = frames.record(extra=[(RAW_NAME, b"north gate")])
    await produce_batch(services.bootstrap, topic, 0, frames.batch(3))
    await produce_batch(services.bootstrap, topic, 1, frames.batch(4))
    await produce_batch(services.bootstrap, topic, 0, [*frames.batch(3), bad, *frames.batch(3)])
    await produce_batch(services.bootstrap, topic, 0, frames.batch(2))
    good, [bad_frame_id] = frames.good, frames.bad

    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix, windows="1m")
    async with running_worker(settings) as worker:
        await wait_until_out(worker, labelled=len(good), dead=1)
        labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(good), settle_s=0)
        dead = await read_topic(
            services.bootstrap, settings.topics.dlq_topic.format(topic=topic), 1, settle_s=0
        )
        assert worker.live() == (True, "ok")
        dead_counted = worker.metrics.frames_dead.labels("headers", "header_name_not_utf8")._value.get()

    labelled = sorted(codec.parse_label_record(r.value)["frame_id"] for r in labels)
    assert labelled == sorted(good)
    assert dead_counted == 1

    assert len(dead) == 1
    letter = dead[0]
    headers = dict(letter.headers)
    assert headers[codec.REASON_HEADER] == b"header_name_not_utf8"
    assert headers["__connect.errors.stage"] == b"headers"
    assert headers["__connect.errors.topic"] == topic.encode()
    assert headers["__connect.errors.partition"] == b"0"
    assert headers["__connect.errors.offset"] == b"6"
    assert b"cam\\xe9ra-name" in headers["__connect.errors.exception.message"]
    # The record as it came: key, value and headers, the unreadable name written with its
    # bytes escaped (a Kafka client can only write UTF-8 names).
    assert letter.key == b"cam-1"
    assert letter.value == bad.value
    assert headers[codec.FRAME_ID] == bad_frame_id.encode()
    assert headers["cam\\xe9ra-name"] == b"north gate"

    # Read to the end offsets after the drain: nothing missing, nothing labelled twice, the
    # Redis and counts-topic counts exact, and the bad record accounted for as a dead letter.
    report = await verify(settings)
    assert_exact(report, duplicates_allowed=False)
    assert report.dead_lettered == {"header_name_not_utf8": [bad_frame_id]}
    assert report.frames_in == len(good) + 1
