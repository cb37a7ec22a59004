"""What the live view's thumbnails cost the decode pool, per thumbnail and with many cameras.

    .venv/bin/python -m bench.thumbnails [--cameras 4,50,200,1000] [--seconds 10] [--out DIR]

1. Per thumbnail: the benchmark's 720p and 1080p frames through ``sinks.live.thumbnail`` (the
   JPEG decoded at the smallest DCT scale that still covers the width) and through the method
   it replaced (decoded at half scale, then shrunk), thread CPU-ms each, best of 5 passes.
2. With many cameras: N cameras at one 720p frame a second each, 16 frames to a delivery, through
   the real ``LiveViewSink`` (a Redis stand-in that accepts every command, a simulated clock)
   for ``--seconds``; the decode pool's CPU per second, with the default ``--thumbnail-rate``
   and with no budget (every camera once a second, as before the budget).

Writes ``<date>-<host>-thumbnails.json`` into ``--out`` when given, with the CPU model.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.frames import encoded_frames
from bench.host import cache_dir, cpu_model
from bench.sources import MODEL, NullRedis
from stream_worker.counting import DriftSnapshot
from stream_worker.decode import DecodeLimits
from stream_worker.frames import ClassScore, Frame, FrameLabels, LabelScore, Prediction, SourceKind
from stream_worker.pipeline import Batch
from stream_worker.settings import Settings
from stream_worker.sinks.live import THUMBNAIL_WIDTH, LiveViewSink, thumbnail

DELIVERY = 16


def half_scale_thumbnail(data: bytes) -> bytes:
    """The method before 2026-12-03: decode at half scale, area-shrink to the width, encode."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
    assert image is not None, "the benchmark's frames are valid JPEG"
    height = max(1, round(image.shape[0] * THUMBNAIL_WIDTH / image.shape[1]))
    small = cv2.resize(image, (THUMBNAIL_WIDTH, height), interpolation=cv2.INTER_AREA)
    return bytes(cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 75])[1])


def per_thumbnail_ms(frames: list[bytes], makers: dict[str, Callable[[bytes], object]]) -> dict[str, float]:
    """Thread CPU-ms per frame of each maker, best of 5 passes, the makers taking turns (this
    kind of machine changes speed by 15-30 % within seconds)."""
    best = dict.fromkeys(makers, float("inf"))
    for _ in range(5):
        for name, make in makers.items():
            started = time.thread_time()
            for data in frames:
                make(data)
            best[name] = min(best[name], (time.thread_time() - started) * 1000 / len(frames))
    return {name: round(ms, 3) for name, ms in best.items()}


class TimedPool(ThreadPoolExecutor):
    """A one-thread pool that adds up the thread CPU time of what it runs."""

    def __init__(self) -> None:
        super().__init__(1)
        self.cpu_s = 0.0
        self.made = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def timed() -> Any:
            started = time.thread_time()
            try:
                result = fn(*args, **kwargs)
            finally:
                self.cpu_s += time.thread_time() - started
            self.made += len(result)  # thumbnails by source
            return result

        return super().submit(timed)


async def cameras_cost(
    frames: list[bytes], cameras: int, seconds: int, thumbnail_rate: float
) -> dict[str, float]:
    """Decode-pool CPU-ms and thumbnails per second of ``cameras`` at one frame a second each
    through the live view."""
    settings = Settings()
    settings = dataclasses.replace(
        settings, counts=dataclasses.replace(settings.counts, thumbnail_rate=thumbnail_rate)
    )
    clock = [0.0]
    labels = FrameLabels((LabelScore("car", 0.8, ("car",)),), (ClassScore(0, "car", 0.8),), 0.8)
    with TimedPool() as pool:
        sink = LiveViewSink(
            NullRedis(),  # type: ignore[arg-type]
            settings,
            model=lambda: MODEL,
            executor=pool,
            clock_ms=lambda: clock[0],
        )
        offset = 0
        for second in range(seconds):
            for first in range(0, cameras, DELIVERY):
                # The deliveries of one second are spread over it.
                clock[0] = second * 1000 + first * 1000 // cameras
                batch = Batch(opened_at=0.0)
                for cam in range(first, min(cameras, first + DELIVERY)):
                    source = f"cam-{cam:05d}"
                    data = frames[offset % len(frames)]
                    frame = Frame(
                        "frames", 0, offset, source, SourceKind.TRAFFIC, f"f-{offset}", 0, "image/jpeg", data
                    )
                    batch.predictions.append(Prediction(frame, labels, 0, 1.0))
                    batch.drift[source] = DriftSnapshot(1, 0.0, {"car": 1.0})
                    offset += 1
                await sink.write(batch)
        return {
            "cpu_ms_per_s": round(pool.cpu_s * 1000 / seconds, 1),
            "thumbnails_per_s": pool.made / seconds,
        }


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.thumbnails", description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", default="4,50,200,1000", help="camera counts, comma separated")
    parser.add_argument("--seconds", type=int, default=10, help="simulated seconds per camera count")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = parser.parse_args()
    cv2.setNumThreads(1)  # as the worker runs it
    per_size: dict[str, Any] = {}
    limits = DecodeLimits()
    for size in ("720p", "1080p"):
        frames = encoded_frames(size, 32, cache_dir())
        per_size[size] = per_thumbnail_ms(
            frames,
            {
                "thumbnail_cpu_ms": lambda d: thumbnail(d, "image/jpeg", limits),
                "half_scale_cpu_ms": half_scale_thumbnail,
            },
        )
        now, before = per_size[size]["thumbnail_cpu_ms"], per_size[size]["half_scale_cpu_ms"]
        print(f"{size}: {now} CPU-ms a thumbnail (half scale: {before})")
    frames = encoded_frames("720p", 32, cache_dir())
    budget = Settings().counts.thumbnail_rate
    by_cameras = []
    for cameras in (int(c) for c in args.cameras.split(",")):
        row: dict[str, Any] = {
            "cameras": cameras,
            "budget": asyncio.run(cameras_cost(frames, cameras, args.seconds, budget)),
            "unbounded": asyncio.run(cameras_cost(frames, cameras, args.seconds, 1e9)),
        }
        by_cameras.append(row)
        print(
            f"{cameras} cameras at 1 frame/s (720p): decode pool {row['budget']['cpu_ms_per_s']} CPU-ms/s "
            f"with {budget:g} thumbnails/s, {row['unbounded']['cpu_ms_per_s']} with no budget"
        )
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "thumbnail_rate": budget,
        "per_thumbnail": per_size,
        "cameras_at_1_fps": by_cameras,
    }
    if args.json:
        print(json.dumps(result))
    if args.out is not None:
        stem = f"{datetime.now(UTC):%Y-%m-%d}-{platform.node() or 'machine'}-thumbnails"
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
