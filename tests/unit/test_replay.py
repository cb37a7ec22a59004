"""Replay's pure parts: which files a source means, frames out of videos and folders, encoding."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from stream_worker.errors import ConfigError
from stream_worker.replay import check_source, encode_jpeg, footage_path, image_files, iter_images
from tests.support.media import skimage_photo


def test_a_folder_yields_its_images_in_name_order_and_ignores_other_files(tmp_path: Path) -> None:
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(
            skimage_photo("chelsea.png").read_bytes() if name != "notes.txt" else b"x"
        )
    assert [f.name for f in image_files(str(tmp_path))] == ["a.jpg", "b.png"]
    assert [f.name for f in image_files(str(tmp_path / "*.png"))] == ["b.png"]
    frames = list(iter_images(str(tmp_path), loop=False))
    assert len(frames) == 2 and frames[0].shape == (300, 451, 3) and frames[0].dtype == np.uint8


def test_a_video_is_read_frame_by_frame_and_loops_when_asked() -> None:
    once = sum(1 for _ in iter_images(str(footage_path()), loop=False))
    assert once == 250
    looped = list(itertools.islice(iter_images(str(footage_path()), loop=True), 260))
    assert len(looped) == 260 and looped[250].shape == (272, 640, 3)


def test_sources_that_cannot_be_read_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a video, an image, a folder of images or a glob"):
        check_source(str(tmp_path / "missing-*.jpg"))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(ConfigError, match="cannot open video"):
        check_source(str(broken))


def test_frames_are_jpeg_encoded_at_the_asked_size_and_quality() -> None:
    image = cv2.imread(str(skimage_photo("chelsea.png")))
    assert image is not None
    big = encode_jpeg(np.asarray(image, np.uint8), 90, (1280, 720))
    small = encode_jpeg(np.asarray(image, np.uint8), 30, None)
    decoded = cv2.imdecode(np.frombuffer(big, np.uint8), cv2.IMREAD_COLOR)
    assert big[:3] == b"\xff\xd8\xff" and decoded.shape == (720, 1280, 3)
    assert len(small) < len(encode_jpeg(np.asarray(image, np.uint8), 90, None))
