"""The resize modes of the one preprocessing function: what part of a frame the model sees."""

from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from stream_worker.preprocess import PreprocessSpec, content_box, crop_box, parse_resize, preprocess_into

SPEC = PreprocessSpec(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))
GREEN, RED = (0, 255, 0), (0, 0, 255)  # BGR


def banded(height: int, width: int, band: int) -> npt.NDArray[np.uint8]:
    """A green frame with red bands ``band`` pixels wide at its left and right edges."""
    image = np.empty((height, width, 3), np.uint8)
    image[...] = GREEN
    image[:, :band] = RED
    image[:, width - band :] = RED
    return image


def run(image: npt.NDArray[np.uint8], mode: str) -> npt.NDArray[np.float32]:
    out = np.full((3, 224, 224), np.nan, np.float32)  # a reused slot: stale values must not survive
    preprocess_into(image, out, SPEC.with_resize(mode))
    return out


def red_columns(out: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """Columns of the input (RGB order) where the middle row is red."""
    row = out[:, 112, :]
    return (row[0] > 0.5) & (row[1] < -0.5)


def test_crop_of_a_wide_frame_sees_only_its_centre() -> None:
    # 640x272 like bikes.mp4; red bands of 150 px at each side are outside the central square.
    frame = banded(272, 640, 150)
    assert crop_box(272, 640, SPEC.with_resize("crop:0.875")) == (17, 201, 238, 238)
    assert crop_box(272, 640, SPEC.with_resize("crop:1")) == (0, 184, 272, 272)
    for mode in ("crop:0.875", "crop:1"):
        assert not red_columns(run(frame, mode)).any(), mode


@pytest.mark.parametrize("mode", ["letterbox", "stretch"])
def test_letterbox_and_stretch_see_the_whole_frame(mode: str) -> None:
    frame = banded(272, 640, 150)
    red = red_columns(run(frame, mode))
    # 150 of 640 px is 52 of 224 columns on each side, in both modes (the scale is by width).
    assert 50 <= red[:112].sum() <= 54 and 50 <= red[112:].sum() <= 54


def test_letterbox_geometry_and_pad_value_of_a_wide_frame() -> None:
    frame = banded(272, 640, 150)
    spec = SPEC.with_resize("letterbox")
    # 272 * 224 / 640 = 95.2 rows of image, centred: 64 rows of pad above, 65 below.
    assert content_box(272, 640, spec) == (64, 0, 95, 224)
    out = run(frame, "letterbox")
    assert np.isfinite(out).all()
    # The pad is the normalised zero: exactly what a pixel of the mean colour (127) becomes.
    grey = np.full((4, 4, 3), 127, np.uint8)
    grey_out = np.empty((3, 224, 224), np.float32)
    preprocess_into(grey, grey_out, spec)
    assert np.all(grey_out == 0.0)
    assert np.all(out[:, :64] == 0.0) and np.all(out[:, 64 + 95 :] == 0.0)
    assert np.all(out[1, 64 : 64 + 95, 100:124] > 0.9)  # green content fills its rows edge to edge


def test_letterbox_of_a_portrait_frame_pads_left_and_right() -> None:
    spec = SPEC.with_resize("letterbox")
    assert content_box(640, 272, spec) == (0, 64, 224, 95)
    out = np.full((3, 224, 224), np.nan, np.float32)
    preprocess_into(np.full((640, 272, 3), 255, np.uint8), out, spec)
    assert np.all(out[:, :, :64] == 0.0) and np.all(out[:, :, 64 + 95 :] == 0.0)
    assert np.all(out[:, :, 64 : 64 + 95] > 0.99)


def test_letterbox_of_an_extreme_frame_keeps_at_least_one_row() -> None:
    spec = SPEC.with_resize("letterbox")
    assert content_box(1, 4000, spec) == (111, 0, 1, 224)
    out = np.full((3, 224, 224), np.nan, np.float32)
    preprocess_into(np.full((1, 4000, 3), 255, np.uint8), out, spec)
    assert np.isfinite(out).all() and np.all(out[:, 111] > 0.99) and np.all(out[:, 112:] == 0.0)


def test_stretch_maps_frame_corners_to_input_corners() -> None:
    frame = np.zeros((272, 640, 3), np.uint8)
    frame[:68, :160] = (0, 0, 255)  # the top-left quarter by quarter is red
    out = run(frame, "stretch")
    assert out[0, :50, :50].min() > 0.99  # red in the input's top-left corner
    assert out[0, 60:, 60:].max() < -0.99


def test_letterbox_allocates_no_full_size_array() -> None:
    frame = banded(272, 640, 150)
    out = np.empty((3, 224, 224), np.float32)
    spec = SPEC.with_resize("letterbox")
    preprocess_into(frame, out, spec)  # warm up OpenCV's and numpy's own caches
    tracemalloc.start()
    try:
        preprocess_into(frame, out, spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The resized image (95 x 224 x 3 bytes, 64 KB) is the only array; a full float slot is 602 KB.
    assert peak < 3 * 224 * 224 * 4 // 4


@pytest.mark.parametrize(
    ("meta", "resize", "fraction"),
    [
        ({"crop_fraction": "0.875"}, "crop", 0.875),
        ({"crop_fraction": "1"}, "stretch", 1.0),  # written before `resize`: 1.0 squashed the frame
        ({}, "crop", 0.875),
        ({"crop_fraction": "1", "resize": "crop"}, "crop", 1.0),
        ({"crop_fraction": "1", "resize": "letterbox"}, "letterbox", 1.0),
        ({"crop_fraction": "1", "resize": "stretch"}, "stretch", 1.0),
    ],
)
def test_metadata_without_or_with_a_resize_mode(meta: dict[str, str], resize: str, fraction: float) -> None:
    spec = PreprocessSpec.from_metadata(meta)
    assert (spec.resize, spec.crop_fraction) == (resize, fraction)
    assert PreprocessSpec.from_metadata(spec.to_metadata()) == spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("crop:0.875", ("crop", 0.875)),
        ("crop", ("crop", 0.875)),
        ("crop:1", ("crop", 1.0)),
        ("letterbox", ("letterbox", 1.0)),
        ("stretch", ("stretch", 1.0)),
    ],
)
def test_preprocess_values_are_read(text: str, expected: tuple[str, float]) -> None:
    assert parse_resize(text) == expected


@pytest.mark.parametrize("text", ["crop:0", "crop:1.5", "crop:abc", "letterbox:2", "squash", ""])
def test_bad_preprocess_values_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="expected crop:FRACTION") as caught:
        parse_resize(text)
    assert "\n" not in str(caught.value)


def test_describe_spells_the_mode_as_the_flag_does() -> None:
    assert [SPEC.with_resize(t).describe() for t in ("crop:0.875", "crop:1", "letterbox", "stretch")] == [
        "crop:0.875",
        "crop:1",
        "letterbox",
        "stretch",
    ]


@pytest.mark.parametrize(
    ("mode", "height", "width"),
    [
        ("crop:1", 270, 480),  # 1080p at 1/4 scale
        ("crop:1", 360, 640),  # 720p at 1/2 scale: the default
        ("crop:1", 300, 301),
        ("crop:1", 448, 700),  # a whole factor: OpenCV's own fast path
        ("stretch", 300, 100),  # one side shrinks, the other grows
        ("stretch", 400, 150),
        ("stretch", 250, 500),
    ],
)
def test_shrinking_gives_the_pixels_of_opencvs_uint8_area_filter(mode: str, height: int, width: int) -> None:
    # The float path is only faster: a frame must be labelled exactly as before it.
    rng = np.random.default_rng(height)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (3, 3), 0)
    spec = SPEC.with_resize(mode)
    out = np.empty((3, 224, 224), np.float32)
    preprocess_into(frame, out, spec)
    top, left, ch, cw = crop_box(height, width, spec)
    shrunk = cv2.resize(frame[top : top + ch, left : left + cw], (224, 224), interpolation=cv2.INTER_AREA)
    for c, src in enumerate((2, 1, 0)):  # RGB input from BGR pixels
        expected = (shrunk[:, :, src].astype(np.float32) - SPEC.mean[c]) / SPEC.std[c]
        np.testing.assert_array_equal(out[c], expected)
