"""The fault tier's feed: a seeded mix of real frames from street cameras and camera traps.

The same seed gives the same frames, sources, timestamps and order, so a failing fault test can
be rerun on exactly the feed it failed on.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from stream_worker import codec
from stream_worker.frames import SourceKind
from tests.support.media import photo_jpeg, street_jpegs

START_MS = 1_790_000_000_000
TRAFFIC = tuple(f"cam-{i}" for i in range(6))
WILDLIFE = tuple(f"trap-{i}" for i in range(3))

# CI runs the tier at scale 1 (hundreds of frames per test, to fit its time budget);
# LOOKOUT_FAULT_SCALE=4 runs the same faults over thousands of frames.
FAULT_SCALE = float(os.environ.get("LOOKOUT_FAULT_SCALE", "1"))


@dataclass(frozen=True, slots=True)
class FeedFrame:
    """One frame of the seeded feed, with the headers it is produced with."""

    source_id: str
    kind: SourceKind
    frame_id: str
    captured_at_ms: int
    data: bytes


def scaled(frames: int) -> int:
    """A test's frame count at the configured scale."""
    return max(1, round(frames * FAULT_SCALE))


def mixed_feed(count: int, seed: int) -> list[FeedFrame]:
    """``count`` real frames from 6 street cameras and 3 camera traps, in a seeded order.

    Street cameras show bikes.mp4; camera traps mostly the same street (nothing to count as
    an event) with the cat photo now and then, at uneven intervals around the sequence gap,
    so that camera-trap events open, grow and close.
    """
    rng = random.Random(seed)
    street = street_jpegs(250)
    cat = photo_jpeg("chelsea.png", quality=80)
    clock = dict.fromkeys((*TRAFFIC, *WILDLIFE), START_MS)
    out: list[FeedFrame] = []
    for i in range(count):
        if rng.random() < 0.75:
            source, kind = rng.choice(TRAFFIC), SourceKind.TRAFFIC
            clock[source] += rng.randint(1_000, 9_000)
            data = street[i % len(street)]
        else:
            source, kind = rng.choice(WILDLIFE), SourceKind.WILDLIFE
            clock[source] += rng.choice((2_000, 5_000, 20_000, 45_000, 120_000))
            data = cat if rng.random() < 0.4 else street[i % len(street)]
        out.append(FeedFrame(source, kind, f"{source}/{i}-{seed}", clock[source], data))
    return out


async def produce_feed(
    bootstrap: str, topic: str, feed: Sequence[FeedFrame], *, chunk: int = 50, pause_s: float = 0.0
) -> None:
    """Produce the feed keyed by source (one source, one partition) with an idempotent producer.

    With ``pause_s`` it is produced in chunks, so that it keeps flowing while a fault is injected.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5, max_request_size=30_000_000
    )
    await producer.start()
    try:
        for start in range(0, len(feed), chunk):
            futures = []
            for f in feed[start : start + chunk]:
                headers = codec.frame_headers(f.source_id, f.kind, f.frame_id, f.captured_at_ms, "image/jpeg")
                futures.append(await producer.send(topic, f.data, key=f.source_id.encode(), headers=headers))
            await asyncio.gather(*futures)
            if pause_s:
                await asyncio.sleep(pause_s)
    finally:
        await producer.stop()
