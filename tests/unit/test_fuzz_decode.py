"""Fuzzing the guards and decoders: hostile bytes only ever raise BadFrame, and quickly."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_worker.decode import DecodeLimits, decode_into
from stream_worker.errors import BadFrame
from stream_worker.preprocess import PreprocessSpec
from tests.unit import images

SPEC = PreprocessSpec(height=32, width=32)
LIMITS = DecodeLimits(max_frame_bytes=2_000_000, max_pixels=4_000_000, max_side=4096)
# Each example must finish well inside this; a hang or a quadratic path fails the test.
FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

_FRAME = images.bikes_frame(5)[::4, ::4].copy()  # 160x68: small, so examples are fast
SEEDS: dict[str, tuple[bytes, str]] = {
    "baseline": (images.jpeg(_FRAME), "image/jpeg"),
    "progressive": (images.jpeg(_FRAME, progressive=True), "image/jpeg"),
    "exif": (images.with_exif_orientation(images.jpeg(_FRAME), 6), "image/jpeg"),
    "gray-jpeg": (images.jpeg(_FRAME[:, :, 1].copy()), "image/jpeg"),
    "png": (images.png(_FRAME), "image/png"),
    "png16": (images.png(_FRAME.astype(np.uint16) * 257), "image/png"),
    "palette": (
        images.palette_png(_FRAME[:, :, 0] // 64, [(0, 0, 0), (80, 80, 80), (160, 0, 0), (0, 0, 250)]),
        "image/png",
    ),
}


def slot() -> npt.NDArray[np.float32]:
    return np.empty((3, SPEC.height, SPEC.width), np.float32)


def decode_or_refuse(data: bytes, content_type: str) -> None:
    """The property: a header comes back and the slot is finite, or BadFrame says why."""
    out = slot()
    try:
        header = decode_into(data, content_type, out, SPEC, LIMITS)
    except BadFrame as error:
        assert error.stage in {"guard", "decode"}
        assert error.reason and str(error)
        return
    assert header.width * header.height <= LIMITS.max_pixels
    assert np.isfinite(out).all()


def test_seeds_decode() -> None:
    for data, content_type in SEEDS.values():
        decode_into(data, content_type, slot(), SPEC, LIMITS)


@FUZZ
@given(
    data=st.binary(max_size=4096), content_type=st.sampled_from(["image/jpeg", "image/png", "image/gif", ""])
)
def test_random_bytes(data: bytes, content_type: str) -> None:
    decode_or_refuse(data, content_type)


@FUZZ
@given(body=st.binary(max_size=4096), kind=st.sampled_from(["image/jpeg", "image/png"]))
def test_random_bytes_behind_valid_magic(body: bytes, kind: str) -> None:
    magic = b"\xff\xd8\xff" if kind == "image/jpeg" else b"\x89PNG\r\n\x1a\n"
    decode_or_refuse(magic + body, kind)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, str]:
    data, content_type = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        operation = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate"]))
        if not buffer:
            break
        at = draw(st.integers(0, len(buffer) - 1))
        if operation == "flip":
            buffer[at] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set":
            buffer[at] = draw(st.sampled_from([0x00, 0xFF, 0xD8, 0xD9, 0xDA, 0xC0, 0x7F, 0x80]))
        elif operation == "truncate":
            del buffer[at:]
        elif operation == "insert":
            buffer[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif operation == "delete":
            del buffer[at : at + draw(st.integers(1, 64))]
        else:
            end = min(len(buffer), at + draw(st.integers(1, 256)))
            buffer[at:at] = buffer[at:end]
    return bytes(buffer), content_type


@FUZZ
@given(case=mutated())
def test_mutated_real_images(case: tuple[bytes, str]) -> None:
    decode_or_refuse(*case)


@settings(max_examples=200, deadline=2000)
@given(
    width=st.integers(0, 70_000),
    height=st.integers(0, 70_000),
    seed=st.sampled_from(["baseline", "progressive", "png"]),
)
def test_header_size_lies(width: int, height: int, seed: str) -> None:
    data, content_type = SEEDS[seed]
    if content_type == "image/jpeg":
        lied = images.with_sof_size(data, min(width, 65535), min(height, 65535))
    else:
        lied = images.png_from_parts(width, height, images.png_idat(data))
    decode_or_refuse(lied, content_type)
