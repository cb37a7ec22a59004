"""Hostile and odd input end to end: real broker, real Redis, the worker in this process.

Every record below goes through the whole pipeline (consume, headers, guard, decode, infer,
sinks). Odd-but-valid images must be labelled; every bad record must come out on the
dead-letter topic exactly once, with the reason a user can act on, while the real frames
around it keep being labelled. A burst of 1,000 bad frames must not grow the worker's memory.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import gc
import uuid
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter as PromCounter

from stream_worker import codec
from stream_worker.worker import Worker
from tests.conftest import Services, TopicFactory
from tests.support.media import photo_png, street_jpegs
from tests.support.pipeline import read_topic, running_worker, worker_settings
from tests.unit import images

SOURCE = "cam-hostile"
CAP_BYTES = 1_000_000  # the worker's --max-frame-bytes in these tests
START_MS = 1_790_000_000_000


@dataclass(frozen=True)
class Rec:
    """One record for the frames topic. ``reason`` None: it must be labelled; else dead-lettered."""

    name: str
    value: bytes | None
    headers: list[tuple[str, bytes]]
    key: bytes | None
    frame_id: str
    reason: str | None = None
    stage: str | None = None


@dataclass
class Feed:
    """Builds records with unique frame ids and lookout's headers, and lets a case break them."""

    sequence: int = 0
    records: list[Rec] = field(default_factory=list)

    def add(
        self,
        name: str,
        value: bytes | None,
        *,
        content_type: str | None = "image/jpeg",
        reason: str | None = None,
        stage: str | None = None,
        drop: Sequence[str] = (),
        set_headers: Sequence[tuple[str, bytes]] = (),
        key: bytes | None = SOURCE.encode(),
    ) -> Rec:
        """Append one record; ``drop`` removes headers, ``set_headers`` replaces or adds them."""
        self.sequence += 1
        frame_id = f"{name}-{self.sequence}-{uuid.uuid4().hex[:6]}"
        headers = codec.frame_headers(
            SOURCE, "traffic", frame_id, START_MS + self.sequence * 1000, content_type or "image/jpeg"
        )
        if content_type is None:
            drop = (*drop, codec.CONTENT_TYPE)
        replaced = {n for n, _ in set_headers}
        headers = [(n, v) for n, v in headers if n not in drop and n not in replaced]
        headers.extend(set_headers)
        record = Rec(name, value, headers, key, frame_id, reason, stage)
        self.records.append(record)
        return record

    def clone(self, template: Rec) -> Rec:
        """Append a copy of ``template`` under a new frame id."""
        self.sequence += 1
        frame_id = f"{template.name}-{self.sequence}-{uuid.uuid4().hex[:6]}"
        headers = [(n, v) for n, v in template.headers if n != codec.FRAME_ID]
        record = dataclasses.replace(
            template, headers=[*headers, (codec.FRAME_ID, frame_id.encode())], frame_id=frame_id
        )
        self.records.append(record)
        return record

    def good(self, data: bytes) -> Rec:
        """A real street frame."""
        return self.add("street", data)


async def produce(bootstrap: str, topic: str, records: Sequence[Rec]) -> None:
    """Send the records as given: raw values, raw headers, keys or none."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=30_000_000, linger_ms=5)
    await producer.start()
    try:
        sent = [await producer.send(topic, r.value, key=r.key, headers=r.headers) for r in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def rss_bytes() -> int:
    """Resident set size of this process (the worker runs in it), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# --- the images -----------------------------------------------------------------------------


def odd_but_valid(feed: Feed) -> None:
    """Images a camera or a user may really send; each must be labelled."""
    frame = images.bikes_frame(3)
    gray = np.asarray(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), dtype=np.uint8)
    indices = (np.arange(64 * 96).reshape(64, 96) % 4).astype(np.uint8)
    baseline = images.jpeg(frame)
    feed.add("gray-jpeg", images.jpeg(gray))
    feed.add("gray-png", images.png(gray), content_type="image/png")
    feed.add("cmyk-jpeg", images.cmyk_jpeg((200, 120, 40), height=96, width=128))
    feed.add("png-16-bit", images.png(frame.astype(np.uint16) * 257), content_type="image/png")
    feed.add(
        "palette-png",
        images.palette_png(indices, [(200, 30, 30), (30, 200, 30), (30, 30, 200), (240, 240, 240)]),
        content_type="image/png",
    )
    feed.add(
        "alpha-png",
        images.png(np.asarray(cv2.cvtColor(frame, cv2.COLOR_BGR2BGRA), dtype=np.uint8)),
        content_type="image/png",
    )
    feed.add("exif-rotated-jpeg", images.with_exif_orientation(baseline, 6))
    feed.add("progressive-jpeg", images.jpeg(frame, progressive=True))
    feed.add("tiny-1x1-jpeg", images.jpeg(images.solid(1, 1, (10, 120, 200))))
    feed.add("tiny-1x1-png", images.png(images.solid(1, 1, (10, 120, 200))), content_type="image/png")
    wide = np.asarray(cv2.resize(frame, (4000, 8), interpolation=cv2.INTER_AREA), dtype=np.uint8)
    feed.add("aspect-4000x8", images.jpeg(wide))
    feed.add(
        "aspect-8x4000", images.png(np.ascontiguousarray(wide.transpose(1, 0, 2))), content_type="image/png"
    )
    feed.add("jpeg-with-trailer", baseline + b"MotionPhoto" + bytes(4096))
    feed.add("no-content-type-png", images.png(frame), content_type=None)
    feed.add("content-type-alias", baseline, content_type="image/jpg")
    feed.add("content-type-params", baseline, content_type="Image/JPEG; charset=binary")
    feed.add("key-only-source", baseline, drop=[codec.SOURCE_ID])
    feed.add(
        "located",
        baseline,
        set_headers=[(codec.LAT, b"-33.86"), (codec.LON, b"151.21"), (codec.SITE, b"Pier 3")],
    )


def hostile(feed: Feed) -> None:
    """Records that can never be classified, each with the reason it must be dead-lettered for."""
    frame = images.bikes_frame(5)
    baseline = images.jpeg(frame)
    raw_rows = b"".join(b"\x00" + frame[row].tobytes() for row in range(frame.shape[0]))

    def bad(name: str, value: bytes | None, stage: str, reason: str, **kw: object) -> None:
        feed.add(name, value, stage=stage, reason=reason, **kw)  # type: ignore[arg-type]

    bad("empty", b"", "guard", "empty")
    bad("null-value", None, "guard", "empty")
    bad("truncated-jpeg", baseline[: len(baseline) // 2], "decode", "truncated")
    bad("png-declared-jpeg", photo_png("chelsea.png"), "guard", "magic_mismatch")
    bad("text-declared-jpeg", b"<html><body>not a frame</body></html>", "guard", "magic_mismatch")
    bad("gif", b"GIF89a" + bytes(64), "guard", "unsupported_type", content_type="image/gif")
    bad("random-bytes-no-type", bytes(range(256)) * 8, "headers", "missing_content_type", content_type=None)
    bad("jpeg-claims-65535x65535", images.with_sof_size(baseline, 65535, 65535), "guard", "too_many_pixels")
    bad("png-bomb-honest", images.png_bomb_honest(), "guard", "too_many_pixels", content_type="image/png")
    bad(
        "png-bomb-lying-ihdr",
        images.png_bomb_lying(inflated_bytes=256 << 20),
        "decode",
        "decompression_bomb",
        content_type="image/png",
    )
    bad(
        "png-ihdr-claims-more",
        images.png_from_parts(640, 400, zlib.compress(raw_rows)),
        "decode",
        "truncated",
        content_type="image/png",
    )
    bad("animated-png", images.apng(frame), "decode", "animated", content_type="image/png")
    bad("over-size-cap", baseline + bytes(CAP_BYTES), "guard", "too_large")
    bad("no-source-id-no-key", baseline, "headers", "missing_source_id", drop=[codec.SOURCE_ID], key=None)
    bad("bad-source-id", baseline, "headers", "bad_source_id", set_headers=[(codec.SOURCE_ID, b"cam {7}")])
    bad("no-source-kind", baseline, "headers", "missing_source_kind", drop=[codec.SOURCE_KIND])
    bad(
        "bad-source-kind",
        baseline,
        "headers",
        "bad_source_kind",
        set_headers=[(codec.SOURCE_KIND, b"satellite")],
    )
    bad(
        "captured-at-text",
        baseline,
        "headers",
        "bad_captured_at",
        set_headers=[(codec.CAPTURED_AT, b"yesterday")],
    )
    bad(
        "lat-out-of-range",
        baseline,
        "headers",
        "bad_location",
        set_headers=[(codec.LAT, b"123.4"), (codec.LON, b"10.0")],
    )
    bad("lat-without-lon", baseline, "headers", "bad_location", set_headers=[(codec.LAT, b"48.1")])
    bad("site-not-utf8", baseline, "headers", "not_utf8", set_headers=[(codec.SITE, b"caf\xe9 \xff")])
    bad(
        "site-control-chars",
        baseline,
        "headers",
        "control_characters",
        set_headers=[(codec.SITE, b"a\x1b[2Jb")],
    )


# --- the tests ------------------------------------------------------------------------------


async def test_odd_images_are_labelled_and_each_hostile_record_is_dead_lettered_once(
    services: Services, make_topic: TopicFactory, key_prefix: str
) -> None:
    topic = await make_topic("frames", partitions=2)
    street = street_jpegs(60)
    odd, bad = Feed(), Feed()
    odd_but_valid(odd)
    hostile(bad)
    # Each odd or bad record sits between two real frames of the same camera.
    feed = Feed(sequence=1000)
    street_iter = iter(street)
    records: list[Rec] = []
    for case in [*odd.records, *bad.records]:
        records.extend([feed.good(next(street_iter)), case])
    records.append(feed.good(next(street_iter)))
    await produce(services.bootstrap, topic, records)
    expected_labelled = {r.frame_id for r in records if r.reason is None}
    expected_dead = {r.frame_id: r for r in records if r.reason is not None}

    settings = worker_settings(
        services.bootstrap, services.redis_url, topic, key_prefix, max_frame_bytes=CAP_BYTES
    )
    async with running_worker(settings):
        labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(expected_labelled))
        dead = await read_topic(services.bootstrap, f"{topic}.dlq", len(expected_dead), settle_s=2.0)

    label_records = [codec.parse_label_record(r.value) for r in labels]
    labelled = Counter(r["frame_id"] for r in label_records)
    assert set(labelled) == expected_labelled, {
        "not labelled": sorted(expected_labelled - set(labelled)),
        "labelled but bad": sorted(set(labelled) - expected_labelled),
    }
    assert max(labelled.values()) == 1
    for record in label_records:
        assert record["source_id"] == SOURCE and record["labels"], record["frame_id"]

    dead_ids = Counter(dict(r.headers)["frame-id"].decode() for r in dead)
    assert set(dead_ids) == set(expected_dead), {
        "missing": sorted(set(expected_dead) - set(dead_ids)),
        "unexpected": sorted(set(dead_ids) - set(expected_dead)),
    }
    assert max(dead_ids.values()) == 1, [k for k, n in dead_ids.items() if n > 1]
    for record in dead:
        headers = dict(record.headers)
        case = expected_dead[headers["frame-id"].decode()]
        got = (headers["__connect.errors.stage"].decode(), headers[codec.REASON_HEADER].decode())
        assert got == (case.stage, case.reason), case.name
        assert headers["__connect.errors.topic"] == topic.encode()
        assert headers["__connect.errors.exception.message"], case.name
        # The original bytes travel with the dead letter, except past the size cap.
        if case.reason == "too_large":
            assert record.value in (b"", None)
        else:
            assert (record.value or b"") == (case.value or b""), case.name


def _total(counter: PromCounter) -> float:
    """A counter's value summed over all its label values."""
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


async def wait_for_counts(worker: Worker, labelled: int, dead: int, timeout_s: float = 120) -> None:
    """Poll the worker's own counters (reading the topics would grow this process's memory)."""
    async with asyncio.timeout(timeout_s):
        while True:
            if _total(worker.metrics.frames_out) >= labelled and _total(worker.metrics.frames_dead) >= dead:
                return
            await asyncio.sleep(0.2)


def held_memory() -> int:
    """RSS after a full collection and after glibc returned its free heap pages to the system.

    Without the trim, pages that Python and glibc have freed but keep cached would count as
    held by the worker; the question here is what the worker keeps.
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


async def test_a_burst_of_1000_bad_frames_keeps_memory_bounded_and_good_frames_flowing(
    services: Services, make_topic: TopicFactory, key_prefix: str
) -> None:
    topic = await make_topic("frames", partitions=2)
    street = street_jpegs(60)
    settings = worker_settings(
        services.bootstrap, services.redis_url, topic, key_prefix, max_frame_bytes=CAP_BYTES
    )
    # Small bad frames of many kinds, so the burst is about per-frame cost, not payload size.
    templates = Feed()
    hostile(templates)
    small = [t for t in templates.records if len(t.value or b"") < 100_000]
    assert len(small) >= 15  # the burst mixes many kinds of failure, not one

    feed = Feed()
    # Warm-up: real frames and 200 bad ones, so that first-use allocations (engine arenas,
    # decoder tables, the dead-letter producer) are in the baseline.
    warm_up = [feed.good(data) for data in street[:30]] + [
        feed.clone(small[i % len(small)]) for i in range(200)
    ]

    def burst(start: int) -> list[Rec]:
        """1,000 bad frames with a real frame after every 100th."""
        out: list[Rec] = []
        for i in range(1000):
            out.append(feed.clone(small[i % len(small)]))
            if i % 100 == 50:
                out.append(feed.good(street[start + i // 100]))
        return out

    first, second = burst(30), burst(40)
    records = [*warm_up, *first, *second]
    goods = [r for r in records if r.reason is None]
    expected_dead = {r.frame_id: r for r in records if r.reason is not None}

    async with running_worker(settings) as worker:
        await produce(services.bootstrap, topic, warm_up)
        await wait_for_counts(worker, labelled=30, dead=200)
        before = held_memory()
        await produce(services.bootstrap, topic, first)
        await wait_for_counts(worker, labelled=40, dead=1200)
        after_first = held_memory()
        # A second burst of the same size: buffers bounded by configuration (fetch buffers,
        # producer batches) have reached their size by now, so anything held per frame shows.
        await produce(services.bootstrap, topic, second)
        await wait_for_counts(worker, labelled=len(goods), dead=len(expected_dead))
        after_second = held_memory()

    first_mb, second_mb = (after_first - before) / 2**20, (after_second - after_first) / 2**20
    # The engine's sessions allocate their working memory at start-up (Pipeline._warm_up); before,
    # a second session's arena and memory pattern (about 150 MB) landed in the first busy minute.
    assert first_mb < 60, f"the worker held {first_mb:.0f} MB more after a burst of 1,000 bad frames"
    assert second_mb < 30, f"a second burst of 1,000 bad frames grew the worker by {second_mb:.0f} MB"
    labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(goods), settle_s=0)
    labelled = Counter(codec.parse_label_record(r.value)["frame_id"] for r in labels)
    assert set(labelled) == {r.frame_id for r in goods} and max(labelled.values()) == 1
    dead = await read_topic(services.bootstrap, f"{topic}.dlq", len(expected_dead), settle_s=2.0)
    dead_ids = Counter(dict(r.headers)["frame-id"].decode() for r in dead)
    assert set(dead_ids) == set(expected_dead) and max(dead_ids.values()) == 1
    for record in dead:
        headers = dict(record.headers)
        assert headers[codec.REASON_HEADER].decode() == expected_dead[headers["frame-id"].decode()].reason


async def test_frames_larger_than_a_fetch_are_labelled_among_small_ones(
    services: Services, make_topic: TopicFactory, key_prefix: str
) -> None:
    """The consumer fetches 1 MiB per partition by default (cheaper per frame than one huge
    fetch); a frame several times larger must still come (alone, in a fetch of its own) and be
    labelled, and the small frames around it too."""
    topic = await make_topic("frames", partitions=1)
    rng = np.random.default_rng(7)
    big_frames = []
    for side in (1400, 1800):  # noise barely compresses: 5.9 and 9.7 MB PNGs
        noise = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        big_frames.append(cv2.imencode(".png", noise)[1].tobytes())
    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix)
    assert all(len(b) > 4 * settings.kafka.max_partition_fetch_bytes for b in big_frames)
    assert all(len(b) > settings.kafka.fetch_max_bytes for b in big_frames)
    feed = Feed()
    street = street_jpegs(12)
    records = [feed.good(street[i]) for i in range(4)]
    records.append(feed.add("big-png", big_frames[0], content_type="image/png"))
    records += [feed.good(street[i]) for i in range(4, 8)]
    records.append(feed.add("bigger-png", big_frames[1], content_type="image/png"))
    records += [feed.good(street[i]) for i in range(8, 12)]
    await produce(services.bootstrap, topic, records)

    async with running_worker(settings):
        labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(records))
    labelled = Counter(codec.parse_label_record(r.value)["frame_id"] for r in labels)
    assert labelled == Counter(r.frame_id for r in records)
