"""Guards, decoding and preprocessing of untrusted frames (stream_worker.decode)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zlib

import numpy as np
import numpy.typing as npt
import pytest

from stream_worker.decode import (
    DecodeLimits,
    DecodeTarget,
    ImageHeader,
    decode_bgr,
    decode_into,
    decode_target,
    probe,
    reduction_factor,
)
from stream_worker.errors import BadFrame
from stream_worker.preprocess import PreprocessSpec, preprocess_into
from tests.unit import images

LIMITS = DecodeLimits()
SPEC = PreprocessSpec()
BLUE, GREEN, RED = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def slot(spec: PreprocessSpec = SPEC) -> npt.NDArray[np.float32]:
    return np.full((3, spec.height, spec.width), np.nan, np.float32)


def refused(data: bytes, content_type: str, limits: DecodeLimits = LIMITS) -> BadFrame:
    with pytest.raises(BadFrame) as caught:
        decode_into(data, content_type, slot(), SPEC, limits)
    return caught.value


FULL_SIZE = DecodeTarget(100_000)


def decoded(data: bytes, content_type: str, target: DecodeTarget = FULL_SIZE) -> npt.NDArray[np.uint8]:
    return decode_bgr(data, probe(data, content_type, LIMITS), target)


def assert_colour(pixel: npt.NDArray[np.uint8], bgr: tuple[int, int, int], tolerance: int = 6) -> None:
    assert np.abs(pixel.astype(int) - np.array(bgr)).max() <= tolerance, f"{pixel} is not {bgr}"


# --- every reason code ------------------------------------------------------------------

JPEG = images.jpeg(images.bikes_frame())
PNG = images.png(images.bikes_frame())


@pytest.mark.parametrize(
    ("data", "content_type", "stage", "reason"),
    [
        pytest.param(b"", "image/jpeg", "guard", "empty", id="empty"),
        pytest.param(JPEG, "image/gif", "guard", "unsupported_type", id="gif-declared"),
        pytest.param(JPEG, "", "guard", "unsupported_type", id="no-type"),
        pytest.param(JPEG, "application/octet-stream", "guard", "unsupported_type", id="octet-stream"),
        pytest.param(PNG, "image/jpeg", "guard", "magic_mismatch", id="png-declared-jpeg"),
        pytest.param(JPEG, "image/png", "guard", "magic_mismatch", id="jpeg-declared-png"),
        pytest.param(b"hello, I am not an image", "image/jpeg", "guard", "magic_mismatch", id="text"),
        pytest.param(b"GIF89a" + bytes(100), "image/png", "guard", "magic_mismatch", id="gif-bytes"),
        pytest.param(JPEG[:3], "image/jpeg", "guard", "bad_header", id="jpeg-only-magic"),
        pytest.param(JPEG[:40], "image/jpeg", "guard", "bad_header", id="jpeg-cut-before-sof"),
        pytest.param(
            b"\xff\xd8\xff\xe0\x00\x01" + bytes(50), "image/jpeg", "guard", "bad_header", id="jpeg-len-1"
        ),
        pytest.param(b"\xff\xd8\xff\xd9", "image/jpeg", "guard", "bad_header", id="jpeg-soi-eoi"),
        pytest.param(
            b"\xff\xd8\xffA" + bytes(50), "image/jpeg", "guard", "bad_header", id="jpeg-garbage-marker"
        ),
        pytest.param(PNG[:20], "image/png", "guard", "bad_header", id="png-cut-in-ihdr"),
        pytest.param(
            PNG[:29] + b"\x00\x00\x00\x00" + PNG[33:], "image/png", "guard", "bad_header", id="ihdr-crc"
        ),
        pytest.param(
            images.with_sof_size(JPEG, 65535, 65535), "image/jpeg", "guard", "too_many_pixels", id="65535"
        ),
        pytest.param(images.png_bomb_honest(), "image/png", "guard", "too_many_pixels", id="png-bomb"),
        pytest.param(JPEG[: len(JPEG) // 2], "image/jpeg", "decode", "truncated", id="jpeg-half"),
        pytest.param(JPEG[:-2], "image/jpeg", "decode", "truncated", id="jpeg-no-eoi"),
        pytest.param(PNG[: len(PNG) // 2], "image/png", "decode", "truncated", id="png-half"),
        pytest.param(PNG[:-12], "image/png", "decode", "truncated", id="png-no-iend"),
        pytest.param(images.png_bomb_lying(), "image/png", "decode", "decompression_bomb", id="lying-bomb"),
        pytest.param(images.apng(images.bikes_frame()), "image/png", "decode", "animated", id="apng"),
    ],
)
def test_bad_frame_is_refused_with_its_reason(
    data: bytes, content_type: str, stage: str, reason: str
) -> None:
    error = refused(data, content_type)
    assert (error.stage, error.reason) == (stage, reason)
    assert str(error)


def test_oversized_frame_is_refused_before_anything_else() -> None:
    error = refused(JPEG, "image/jpeg", DecodeLimits(max_frame_bytes=len(JPEG) - 1))
    assert (error.stage, error.reason) == ("guard", "too_large")
    assert decode_into(JPEG, "image/jpeg", slot(), SPEC, DecodeLimits(max_frame_bytes=len(JPEG))).width == 640


@pytest.mark.parametrize(("width", "height"), [(16385, 1), (1, 16385), (8000, 7000)])
def test_pixel_and_side_caps_are_read_from_the_header(width: int, height: int) -> None:
    error = refused(images.with_sof_size(JPEG, width, height), "image/jpeg")
    assert (error.stage, error.reason) == ("guard", "too_many_pixels")


def test_sof_with_zero_height_is_a_bad_header() -> None:
    assert refused(images.with_sof_size(JPEG, 640, 0), "image/jpeg").reason == "bad_header"


def test_invalid_png_colour_depth_combination_is_a_bad_header() -> None:
    data = images.png_from_parts(4, 4, zlib.compress(bytes(4 * 13)), colour_type=2, bit_depth=4)
    assert refused(data, "image/png").reason == "bad_header"


def test_png_whose_data_is_shorter_than_its_header_is_truncated() -> None:
    data = images.png_from_parts(64, 64, zlib.compress(bytes(100)))
    assert (refused(data, "image/png").stage, refused(data, "image/png").reason) == ("decode", "truncated")


def test_corrupt_png_data_is_decode_failed() -> None:
    data = images.png_from_parts(8, 8, b"\x78\x9c" + b"\xff" * 40)
    assert (refused(data, "image/png").stage, refused(data, "image/png").reason) == (
        "decode",
        "decode_failed",
    )


def test_progressive_jpeg_with_too_many_scans_is_refused() -> None:
    progressive = images.jpeg(images.bikes_frame(), progressive=True)
    error = refused(progressive, "image/jpeg", DecodeLimits(max_scans=3))
    assert (error.stage, error.reason) == ("guard", "too_many_scans")
    assert decode_into(progressive, "image/jpeg", slot(), SPEC, LIMITS).kind == "jpeg"


def test_lying_png_bomb_is_refused_quickly_and_without_inflating_it() -> None:
    bomb = images.png_bomb_lying(inflated_bytes=1 << 30)
    started = time.perf_counter()
    assert refused(bomb, "image/png").reason == "decompression_bomb"
    # libpng would spend seconds inflating and discarding the gigabyte.
    assert time.perf_counter() - started < 0.5


def test_jpeg_trailer_after_end_of_image_is_accepted() -> None:
    assert decoded(JPEG + b"motion-photo-payload" * 10, "image/jpeg").shape == (272, 640, 3)


def test_content_type_parameters_and_case_are_ignored() -> None:
    assert probe(JPEG, "Image/JPEG; charset=binary", LIMITS).kind == "jpeg"


# --- headers ------------------------------------------------------------------------------


def test_probe_reads_dimensions_channels_and_depth() -> None:
    assert probe(JPEG, "image/jpeg", LIMITS) == ImageHeader("jpeg", 640, 272, 3, 8)
    assert probe(PNG, "image/png", LIMITS) == ImageHeader("png", 640, 272, 3, 8)
    gray16 = images.png(np.zeros((5, 7), np.uint16))
    assert probe(gray16, "image/png", LIMITS) == ImageHeader("png", 7, 5, 1, 16)
    assert probe(images.cmyk_jpeg(RED[::-1]), "image/jpeg", LIMITS).channels == 4


# --- odd but valid images -----------------------------------------------------------------


def test_grayscale_jpeg_becomes_three_equal_channels() -> None:
    gray = np.full((30, 40), 77, np.uint8)
    image = decoded(images.jpeg(gray), "image/jpeg")
    assert image.shape == (30, 40, 3)
    assert_colour(image[15, 20], (77, 77, 77), tolerance=2)


def test_cmyk_jpeg_keeps_its_colours() -> None:
    image = decoded(images.cmyk_jpeg((255, 0, 0)), "image/jpeg")  # pure red, RGB
    assert image.shape == (32, 48, 3)
    assert_colour(image[16, 24], RED)


def test_progressive_jpeg_decodes_like_baseline() -> None:
    frame = images.bikes_frame()
    baseline = decoded(images.jpeg(frame), "image/jpeg").astype(np.int16)
    progressive = decoded(images.jpeg(frame, progressive=True), "image/jpeg").astype(np.int16)
    assert progressive.shape == baseline.shape
    assert np.abs(progressive - baseline).mean() < 1.0


@pytest.mark.parametrize(
    ("orientation", "shape", "top_left", "bottom_left"),
    [
        (1, (64, 128, 3), BLUE, BLUE),  # as stored: blue left half, red right half
        (3, (64, 128, 3), RED, RED),  # rotated 180°
        (6, (128, 64, 3), BLUE, RED),  # rotate 90° clockwise: left half becomes the top
        (8, (128, 64, 3), RED, BLUE),  # rotate 90° counter-clockwise
    ],
)
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_exif_orientation_is_applied_at_full_and_reduced_scale(
    orientation: int,
    shape: tuple[int, int, int],
    top_left: tuple[int, int, int],
    bottom_left: tuple[int, int, int],
    factor: int,
) -> None:
    data = images.with_exif_orientation(images.jpeg(images.halves(64, 128, BLUE, RED)), orientation)
    header = probe(data, "image/jpeg", LIMITS)
    target = DecodeTarget(64 // factor)
    assert reduction_factor(header, target) == factor
    image = decode_bgr(data, header, target)
    assert image.shape == (shape[0] // factor, shape[1] // factor, 3)
    assert_colour(image[1, 1], top_left, tolerance=12)
    assert_colour(image[-2, 1], bottom_left, tolerance=12)


def test_sixteen_bit_png_becomes_eight_bit() -> None:
    deep = np.zeros((6, 8, 3), np.uint16)
    deep[...] = (10 * 257, 200 * 257, 65535)
    image = decoded(images.png(deep), "image/png")
    assert image.dtype == np.uint8
    assert_colour(image[3, 4], (10, 200, 255), tolerance=1)


def test_sixteen_bit_grayscale_png_becomes_eight_bit_gray() -> None:
    image = decoded(images.png(np.full((6, 8), 128 * 257, np.uint16)), "image/png")
    assert image.shape == (6, 8, 3)
    assert_colour(image[0, 0], (128, 128, 128), tolerance=1)


def test_palette_png_colours_are_looked_up() -> None:
    indices = np.zeros((4, 6), np.uint8)
    indices[:, 3:] = 1
    image = decoded(images.palette_png(indices, [(0, 255, 0), (0, 0, 255)]), "image/png")
    assert_colour(image[0, 0], GREEN, tolerance=0)
    assert_colour(image[0, 5], BLUE, tolerance=0)


def test_alpha_is_dropped_not_composited() -> None:
    bgra = np.zeros((5, 5, 4), np.uint8)
    bgra[...] = (0, 0, 200, 0)  # fully transparent red
    assert_colour(decoded(images.png(bgra), "image/png")[2, 2], (0, 0, 200), tolerance=0)


def test_grayscale_png_becomes_three_channels() -> None:
    assert decoded(images.png(np.full((3, 9), 33, np.uint8)), "image/png").shape == (3, 9, 3)


def test_interlaced_png_raw_size_is_computed_per_pass() -> None:
    # 5x7 RGB in seven Adam7 passes: the bomb/truncation check must agree with libpng.
    rows = {
        (0, 0, 8, 8): (1, 1),
        (4, 0, 8, 8): (1, 1),
        (0, 4, 4, 8): (2, 1),
        (2, 0, 4, 4): (1, 2),
        (0, 2, 2, 4): (3, 2),
        (1, 0, 2, 2): (2, 4),
        (0, 1, 1, 2): (5, 3),
    }
    raw = b"".join(b"".join(b"\x00" + bytes(3 * w) for _ in range(h)) for w, h in rows.values())
    data = images.png_from_parts(5, 7, zlib.compress(raw), interlace=1)
    assert decoded(data, "image/png").shape == (7, 5, 3)
    too_long = images.png_from_parts(5, 7, zlib.compress(raw + b"\x00"), interlace=1)
    assert refused(too_long, "image/png").reason == "decompression_bomb"


@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 4000), (4000, 1), (2, 16384)])
def test_tiny_and_extreme_aspect_images_fill_the_slot(height: int, width: int) -> None:
    for data, content_type in [
        (images.jpeg(images.solid(height, width, GREEN)), "image/jpeg"),
        (images.png(images.solid(height, width, GREEN)), "image/png"),
    ]:
        out = slot()
        decode_into(data, content_type, out, SPEC, LIMITS)
        assert np.isfinite(out).all()
        # Green in RGB order: the G plane is high, R and B low, everywhere.
        assert out[1].min() > 1.5 and out[0].max() < -1.5 and out[2].max() < -1.5


# --- reduced decode -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "crop_fraction", "factor"),
    [
        (640, 272, 0.875, 1),  # shorter side 272 >= 256, but 136 is not
        (1280, 720, 0.875, 2),  # 360 >= 256
        (1920, 1080, 0.875, 4),  # 270 >= 256, 135 is not
        (1920, 1080, 1.0, 4),
        (4000, 3000, 0.875, 8),  # 375 >= 256
        (2048, 2048, 0.875, 8),  # exactly 256
        (2040, 2040, 0.875, 4),  # 255 < 256
        (1, 1, 0.875, 1),
    ],
)
def test_reduction_factor_keeps_the_crop_at_least_model_size(
    width: int, height: int, crop_fraction: float, factor: int
) -> None:
    spec = PreprocessSpec(crop_fraction=crop_fraction)
    header = ImageHeader("jpeg", width, height, 3, 8)
    assert reduction_factor(header, decode_target(spec)) == factor


@pytest.mark.parametrize(
    ("width", "height", "mode", "factor"),
    [
        (640, 272, "letterbox", 2),  # longer side 320 >= 224, 160 is not
        (640, 272, "stretch", 1),  # shorter side 272 >= 224, 136 is not
        (640, 272, "crop:1", 1),
        (1920, 1080, "letterbox", 8),  # 240 >= 224
        (1080, 1920, "letterbox", 8),  # portrait: the same
        (1920, 1080, "stretch", 4),  # 270 >= 224, 135 is not
        (1920, 1080, "crop:1", 4),
        (1792, 100, "letterbox", 8),  # exactly 224
        (1784, 100, "letterbox", 4),  # 223 < 224
    ],
)
def test_reduction_factor_of_each_resize_mode(width: int, height: int, mode: str, factor: int) -> None:
    header = ImageHeader("jpeg", width, height, 3, 8)
    assert reduction_factor(header, decode_target(SPEC.with_resize(mode))) == factor


@pytest.mark.parametrize("mode", ["crop:0.875", "crop:1", "letterbox", "stretch"])
@pytest.mark.parametrize(
    ("width", "height"), [(640, 272), (1920, 1080), (1080, 1920), (3000, 500), (500, 500)]
)
def test_reduced_decode_never_makes_preprocessing_enlarge(width: int, height: int, mode: str) -> None:
    from stream_worker.preprocess import content_box, crop_box

    spec = SPEC.with_resize(mode)
    factor = reduction_factor(ImageHeader("jpeg", width, height, 3, 8), decode_target(spec))
    h, w = -(-height // factor), -(-width // factor)
    _, _, crop_h, crop_w = crop_box(h, w, spec)
    _, _, box_h, box_w = content_box(crop_h, crop_w, spec)
    assert crop_h >= box_h and crop_w >= box_w  # the model input is a shrink, never an enlargement
    if factor < 8:  # and the next factor would have enlarged it
        h2, w2 = -(-height // (factor * 2)), -(-width // (factor * 2))
        _, _, crop_h2, crop_w2 = crop_box(h2, w2, spec)
        _, _, box_h2, box_w2 = content_box(crop_h2, crop_w2, spec)
        assert crop_h2 < box_h2 or crop_w2 < box_w2


def test_png_is_never_reduced() -> None:
    assert reduction_factor(ImageHeader("png", 4000, 3000, 3, 8), DecodeTarget(224)) == 1


def test_reduced_decode_of_1080p_keeps_the_crop_above_model_size() -> None:
    data = images.jpeg(images.upscaled_bikes_frame(), quality=85)
    image = decoded(data, "image/jpeg", decode_target(SPEC))
    assert image.shape == (270, 480, 3)
    assert min(image.shape[:2]) * SPEC.crop_fraction >= SPEC.height


def test_reduced_decode_gives_the_same_tensor_as_full_decode() -> None:
    data = images.jpeg(images.upscaled_bikes_frame(), quality=85)
    reduced = slot()
    decode_into(data, "image/jpeg", reduced, SPEC, LIMITS)
    full = slot()
    preprocess_into(decoded(data, "image/jpeg", DecodeTarget(10_000)), full, SPEC)
    # Normalised units (one unit is ~58 grey levels): the model sees the same picture.
    assert np.abs(reduced - full).mean() < 0.05


def test_decode_into_writes_the_normalised_image_into_the_slot() -> None:
    frame = images.bikes_frame()
    out = slot()
    header = decode_into(images.png(frame), "image/png", out, SPEC, LIMITS)
    assert header == ImageHeader("png", 640, 272, 3, 8)
    expected = slot()
    preprocess_into(frame, expected, SPEC)  # lossless PNG: exactly the original pixels
    np.testing.assert_array_equal(out, expected)


def test_a_configured_max_pixels_reaches_opencvs_own_limit() -> None:
    # The command line sets OpenCV's limits from the settings before cv2 is imported; OpenCV
    # then refuses by itself an image above them (a second line behind the header guards).
    code = (
        "import contextlib\n"
        "from stream_worker.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(None):\n"
        "    main(['config', '--max-pixels', '1000'])\n"
        "import cv2, numpy as np\n"
        "for side in (20, 40):\n"
        "    image = cv2.imencode('.png', np.zeros((side, side, 3), np.uint8))[1]\n"
        "    try:\n"
        "        print(cv2.imdecode(image, cv2.IMREAD_COLOR) is not None)\n"
        "    except cv2.error:\n"
        "        print('refused')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_IO_")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.stdout.split() == ["True", "refused"], result.stderr
