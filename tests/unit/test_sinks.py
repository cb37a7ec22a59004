"""The sinks on their own, with a list-backed producer and counts writer (the real ones are tested
against the real broker and Redis in tests/integration and tests/faults)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import pytest

from stream_worker.codec import parse_label_record
from stream_worker.counting import CountedFrame, WindowCounts
from stream_worker.decode import DecodeLimits
from stream_worker.errors import BadFrame, ServiceUnavailable
from stream_worker.frames import ClassScore, Frame, FrameLabels, LabelScore, Prediction, SourceKind
from stream_worker.observability import Metrics
from stream_worker.pipeline import Batch, DeadFrame
from stream_worker.settings import CountSettings, Settings, TopicSettings
from stream_worker.sinks.counts import ApplyResult, CountsSink
from stream_worker.sinks.live import ThumbnailBudget, thumbnail
from stream_worker.sinks.topics import FrameTopicsSink, WindowCountsSink
from tests.support.pipeline import MODEL
from tests.unit import images


class ListProducer:
    """Keeps what was sent; every send is acknowledged at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]] | None]] = []

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None, headers: Any
    ) -> asyncio.Future[None]:
        self.sent.append((topic, key, value, headers))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def prediction(offset: int, source: str, label: str, score: float) -> Prediction:
    frame = Frame(
        "cams", 0, offset, source, SourceKind.TRAFFIC, f"{source}/{offset}", 1_000, "image/jpeg", b"jpeg"
    )
    labels = FrameLabels((LabelScore(label, score, (label,)),), (ClassScore(1, "x", score),), score)
    return Prediction(frame, labels, 2_000, 1_000.0)


def settings(**counts: Any) -> Settings:
    return dataclasses.replace(
        Settings(),
        topics=TopicSettings.named_after("cams"),
        counts=dataclasses.replace(CountSettings(), **counts),
    )


async def test_labels_review_samples_and_dead_letters_go_to_their_topics() -> None:
    producer = ListProducer()
    made: list[set[str]] = []

    async def ensure(topics: set[str]) -> None:
        made.append(topics)

    sink = FrameTopicsSink(
        producer,  # type: ignore[arg-type]
        settings(review_threshold=0.5, review_sample_rate=1.0),
        model=lambda: MODEL,
        metrics=Metrics(),
        ensure_topics=ensure,
    )
    batch = Batch(opened_at=0.0)
    batch.predictions = [prediction(0, "cam-1", "car", 0.9), prediction(1, "cam-1", "unknown", 0.2)]
    error = BadFrame("guard", "not_an_image", "no image magic")
    batch.dead = [DeadFrame("cams", 0, 2, b"cam-1", b"junk", (("source-id", b"cam-1"),), error)]
    await sink.write(batch)

    topics = [topic for topic, *_ in producer.sent]
    assert topics == ["cams.labels", "cams.labels", "cams.review", "cams.dlq"]
    assert made == [{"cams.dlq"}]  # the dead-letter topic is made sure of before writing to it
    first = parse_label_record(producer.sent[0][2])
    assert (first["frame_id"], first["labels"][0]["label"]) == ("cam-1/0", "car")
    _, key, value, headers = producer.sent[3]
    assert (key, value) == (b"cam-1", b"junk")
    assert dict(headers or [])["lookout.errors.reason"] == b"not_an_image"


class ListCountsWriter:
    """Applies each offset once, like the Lua script; remembers the windows not yet published."""

    def __init__(self) -> None:
        self.watermark: dict[tuple[str, int], int] = {}
        self.dirty_windows: dict[tuple[str, int], list[WindowCounts]] = {}
        self.published: list[str] = []

    async def apply(self, topic: str, partition: int, frames: Sequence[CountedFrame]) -> ApplyResult:
        wm = self.watermark.get((topic, partition), -1)
        new = [f for f in frames if f.offset > wm]
        if new:
            self.watermark[(topic, partition)] = new[-1].offset
        windows = tuple(WindowCounts(f.source_id, "1m", 0, 1, key=f"k{f.offset}") for f in new)
        self.dirty_windows.setdefault((topic, partition), []).extend(windows)
        return ApplyResult(applied=len(new), windows=windows)

    async def dirty(self, topic: str, partition: int) -> list[WindowCounts]:
        return list(self.dirty_windows.get((topic, partition), []))

    async def mark_published(self, windows: Mapping[tuple[str, int], Sequence[WindowCounts]]) -> None:
        for (topic, partition), group in windows.items():
            self.published += [w.key for w in group]
            keys = {w.key for w in group}
            self.dirty_windows[(topic, partition)] = [
                w for w in self.dirty_windows.get((topic, partition), []) if w.key not in keys
            ]


def counted_batch(*offsets: int) -> Batch:
    batch = Batch(opened_at=0.0)
    batch.counted = {("cams", 0): [CountedFrame(o, "cam-1", 1_000, ("car",), None) for o in offsets]}
    return batch


async def test_a_counts_write_run_twice_counts_once_and_still_hands_on_its_windows() -> None:
    writer, skipped = ListCountsWriter(), []
    sink = CountsSink(writer, skipped=skipped.append)  # type: ignore[arg-type]
    batch = counted_batch(0, 1)
    await sink.write(batch)
    first = batch.windows[("cams", 0)]
    # A retry (or a replay after a crash) applies nothing, but the windows are not lost: the
    # ones not yet on the counts topic are taken from the dirty set.
    await sink.write(batch)
    assert skipped == [2]
    assert batch.windows[("cams", 0)] == first
    assert writer.watermark[("cams", 0)] == 1


async def test_window_counts_are_published_then_marked_clean() -> None:
    producer, writer = ListProducer(), ListCountsWriter()
    counts = CountsSink(writer)  # type: ignore[arg-type]
    windows = WindowCountsSink(producer, "cams.counts", writer)  # type: ignore[arg-type]
    batch = counted_batch(0)
    await counts.write(batch)
    await windows.write(batch)
    assert [topic for topic, *_ in producer.sent] == ["cams.counts"]
    assert writer.published == ["k0"] and writer.dirty_windows[("cams", 0)] == []


async def test_the_partitions_of_a_delivery_are_counted_side_by_side() -> None:
    # One after the other, a delivery of four partitions waited for eight Redis round trips in
    # a row. Here partition 0's call waits until partition 1's has started: in order, it never ends.
    started: dict[int, asyncio.Event] = {0: asyncio.Event(), 1: asyncio.Event()}

    class SlowWriter(ListCountsWriter):
        async def apply(self, topic: str, partition: int, frames: Sequence[CountedFrame]) -> ApplyResult:
            started[partition].set()
            await started[1 - partition].wait()
            return await super().apply(topic, partition, frames)

    writer = SlowWriter()
    batch = Batch(opened_at=0.0)
    frames = {p: [CountedFrame(10 * p + o, "cam-1", 1_000, ("car",), None) for o in range(2)] for p in (0, 1)}
    batch.counted = {("cams", p): counted for p, counted in frames.items()}
    await asyncio.wait_for(CountsSink(writer).write(batch), 5)  # type: ignore[arg-type]
    assert writer.watermark == {("cams", 0): 1, ("cams", 1): 11}
    assert list(batch.windows) == [("cams", 0), ("cams", 1)]  # in the batch's order, whatever ended first


async def test_a_partition_that_fails_fails_the_write_after_the_others_are_counted() -> None:
    class HalfDown(ListCountsWriter):
        async def apply(self, topic: str, partition: int, frames: Sequence[CountedFrame]) -> ApplyResult:
            if partition == 0:
                raise ServiceUnavailable("redis is down")
            return await super().apply(topic, partition, frames)

    writer = HalfDown()
    batch = Batch(opened_at=0.0)
    batch.counted = {("cams", p): [CountedFrame(p, "cam-1", 1_000, ("car",), None)] for p in (0, 1)}
    with pytest.raises(ServiceUnavailable, match="redis is down"):
        await CountsSink(writer).write(batch)  # type: ignore[arg-type]
    # The retry will find partition 1 applied (its watermark moved) and count it once.
    assert writer.watermark == {("cams", 1): 1}


def _sharp_portrait() -> Any:
    return np.ascontiguousarray(np.rot90(images.bikes_frame()))  # 272 x 640, at its own resolution


@pytest.mark.parametrize(
    ("make", "encode"),
    [
        (lambda: images.upscaled_bikes_frame(1280, 720), images.jpeg),
        (lambda: images.upscaled_bikes_frame(1920, 1080), images.jpeg),
        (lambda: images.upscaled_bikes_frame(1080, 1920), images.jpeg),
        (_sharp_portrait, images.jpeg),
        (
            lambda: images.upscaled_bikes_frame(1280, 720),
            lambda f: images.with_exif_orientation(images.jpeg(f), 6),
        ),
        (lambda: images.upscaled_bikes_frame(1280, 720), images.png),
    ],
    ids=["720p", "1080p", "portrait-1080p", "portrait-sharp", "exif-turned", "png"],
)
def test_a_thumbnail_is_the_frame_240_wide_with_its_detail(make: Any, encode: Any) -> None:
    data = encode(make())
    # The picture a person would see: the frame as displayed (EXIF turned), shrunk the careful way.
    frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    thumb = thumbnail(data, "image/png" if encode is images.png else "image/jpeg", DecodeLimits())
    assert thumb is not None and thumb.startswith(b"\xff\xd8")
    shown = cv2.imdecode(np.frombuffer(thumb, np.uint8), cv2.IMREAD_COLOR)
    height, width = frame.shape[:2]
    assert shown.shape == (round(height * 240 / width), 240, 3)
    expected = cv2.resize(frame, (240, shown.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(shown.astype(np.int16) - expected).mean() < 4
    # Not blown up from a decode narrower than 240 (a portrait frame scaled by its longer side
    # kept 0.30-0.47 of the detail; shrunk from a wide enough decode, 0.65-1.07).
    assert _detail(shown) > 0.55 * _detail(expected)


def _detail(image: Any) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.CV_32F).var())


def test_a_frame_that_cannot_be_decoded_has_no_thumbnail() -> None:
    assert thumbnail(b"\xff\xd8\xff\xe0 not a jpeg", "image/jpeg", DecodeLimits()) is None


def test_the_thumbnail_budget_grants_at_most_its_rate_and_one_second_of_burst() -> None:
    budget = ThumbnailBudget(4, now_ms=0)
    assert budget.available(0) == 4
    budget.spend(4)
    assert budget.available(500) == 2
    budget.spend(2)
    assert budget.available(60_000) == 4  # an idle minute saves up no more than a second's worth
    slow = ThumbnailBudget(0.5, now_ms=0)
    granted = []
    for t in (0, 1000, 2000, 3000, 4000):
        granted.append(slow.available(t))
        slow.spend(granted[-1])
    assert granted == [1, 0, 1, 0, 1]
