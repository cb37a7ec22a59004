"""Guards, decode and preprocess: untrusted bytes in, a normalised tensor slot out.

Order matters. Every check that can be made without decoding a pixel runs first
(:func:`probe`): size cap, declared type, magic bytes, and the image dimensions parsed by
hand from the JPEG ``SOFn`` segment or the PNG ``IHDR`` chunk. Only then does OpenCV see
the bytes, and because the magic was checked, only its JPEG or PNG decoder can be chosen.

Decisions worth knowing (each one is a test in ``tests/unit/test_decode.py``):

* A JPEG must carry an end-of-image marker (``FFD9``) after its first scan. libjpeg
  returns a grey-filled image for a truncated file with only a warning (OpenCV 5 returns
  nothing, older builds a half-grey frame); either way the frame is refused as
  ``decode/truncated`` so that a grey image is never labelled. Trailing bytes after the
  marker (camera trailers, motion-photo payloads) are accepted.
* JPEG marker segments before the first scan must follow each other without stray bytes
  (libjpeg would skip them with a warning); at most ``_MAX_JPEG_SEGMENTS`` of them.
* A PNG's compressed image data is inflated once, bounded, before OpenCV sees it: data that
  inflates to more bytes than ``IHDR`` promises is a decompression bomb (libpng would inflate
  and discard all of it, seconds of CPU per frame), data that inflates to fewer is truncated.
  This costs about half a PNG decode; camera feeds are JPEG, so it is rarely paid.
* Animated PNG (an ``acTL`` chunk) is refused: a frame is one image.
* Alpha is dropped, not composited (OpenCV's ``IMREAD_COLOR``); 16-bit samples are scaled
  to 8 bits; grayscale and palette images become three equal or looked-up channels; CMYK
  JPEG is converted by libjpeg; EXIF orientation is applied, at full and reduced scale.

OpenCV has its own size limits that must be set in the environment *before* ``cv2`` is
imported (``OPENCV_IO_MAX_IMAGE_PIXELS``, ``OPENCV_IO_MAX_IMAGE_WIDTH``,
``OPENCV_IO_MAX_IMAGE_HEIGHT``): ``stream_worker.opencv_environment`` returns the values that
match the settings, and ``stream-worker`` sets them before any command imports ``cv2``.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
import numpy.typing as npt

from stream_worker import MAX_IMAGE_SIDE
from stream_worker.errors import BadFrame
from stream_worker.preprocess import PreprocessSpec, preprocess_into

if TYPE_CHECKING:
    from stream_worker.settings import BatchSettings

ImageKind = Literal["jpeg", "png"]

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONTENT_TYPES: dict[str, ImageKind] = {"image/jpeg": "jpeg", "image/png": "png"}

# Real JPEGs have a few dozen segments before the first scan (APPn, DQT, SOF, DHT, DRI);
# the cap keeps a file of millions of empty segments from costing seconds of Python.
_MAX_JPEG_SEGMENTS = 1000
# libpng writes 8 KiB IDAT chunks, so a 20 MB PNG has a few thousand chunks.
_MAX_PNG_CHUNKS = 50_000
# Start-of-frame markers: every SOFn except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Progressive SOFs: only these may have many scans (sequential JPEG has one per component).
_PROGRESSIVE_SOF_MARKERS = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Markers without a length field: TEM and RST0..RST7.
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_SOS, _EOI, _SOI = 0xDA, 0xD9, 0xD8
_FILL_BYTES = re.compile(rb"\xff+")
_EOI_BYTES = b"\xff\xd9"
_SOS_BYTES = b"\xff\xda"

_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel, by colour type
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # colour channels after palette look-up
_PNG_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_STEP = 1 << 20

_REDUCED_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What a frame may cost before it is refused; checked before any pixel is decoded.

    ``max_scans`` bounds the scans of a (progressive) JPEG: each scan is another pass over
    the whole image, so thousands of tiny scans make a small file expensive. TurboJPEG
    suggests the same limit.
    """

    max_frame_bytes: int = 20_000_000
    max_pixels: int = 50_000_000
    max_side: int = MAX_IMAGE_SIDE
    max_scans: int = 500

    @classmethod
    def of(cls, batch: BatchSettings) -> DecodeLimits:
        """The limits the worker's settings set (``--max-frame-bytes``, ``--max-pixels``)."""
        return cls(max_frame_bytes=batch.max_frame_bytes, max_pixels=batch.max_pixels)


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What the file header says, before decoding: kind, stored size, channels, bits per sample.

    ``width`` and ``height`` are as stored, before any EXIF rotation. ``channels`` counts
    colour channels as stored (JPEG components; PNG: palette counts as 3, alpha included).
    """

    kind: ImageKind
    width: int
    height: int
    channels: int
    bit_depth: int


def normalise_content_type(content_type: str) -> str:
    """Lower-case a MIME type and drop its parameters: ``"Image/JPEG; q=1"`` → ``"image/jpeg"``."""
    return content_type.split(";", 1)[0].strip().lower()


def sniff_content_type(data: bytes) -> str | None:
    """``image/jpeg`` or ``image/png`` by the bytes' magic; ``None`` for anything else (never a guess)."""
    if data.startswith(JPEG_MAGIC):
        return "image/jpeg"
    if data.startswith(PNG_MAGIC):
        return "image/png"
    return None


def probe(data: bytes, content_type: str, limits: DecodeLimits) -> ImageHeader:
    """Check a frame's size, declared type, magic bytes and header dimensions; decode nothing.

    Raises :class:`BadFrame` with stage ``guard`` and reason ``empty``, ``too_large``,
    ``unsupported_type``, ``magic_mismatch``, ``bad_header``, ``too_many_pixels`` or
    ``too_many_scans``.
    """
    if not data:
        raise BadFrame("guard", "empty", "the frame has no bytes")
    if len(data) > limits.max_frame_bytes:
        raise BadFrame(
            "guard", "too_large", f"the frame has {len(data)} bytes, over the cap of {limits.max_frame_bytes}"
        )
    kind = CONTENT_TYPES.get(normalise_content_type(content_type))
    if kind is None:
        raise BadFrame(
            "guard", "unsupported_type", f"content type {content_type!r} is neither image/jpeg nor image/png"
        )
    magic = JPEG_MAGIC if kind == "jpeg" else PNG_MAGIC
    if not data.startswith(magic):
        raise BadFrame("guard", "magic_mismatch", f"declared {kind} but the bytes do not start like one")
    if kind == "jpeg":
        layout = _jpeg_layout(data)
        header = ImageHeader("jpeg", layout.width, layout.height, layout.components, layout.precision)
    else:
        ihdr = _png_ihdr(data)
        header = ImageHeader("png", ihdr.width, ihdr.height, _PNG_CHANNELS[ihdr.colour_type], ihdr.bit_depth)
    if max(header.width, header.height) > limits.max_side or header.width * header.height > limits.max_pixels:
        raise BadFrame(
            "guard",
            "too_many_pixels",
            f"the header says {header.width}x{header.height}, over the cap of {limits.max_pixels} pixels "
            f"or {limits.max_side} per side",
        )
    if kind == "jpeg" and layout.progressive and layout.scan_offset >= 0:
        # In entropy-coded data 0xFF is always followed by 0x00 or RSTn, so every FFDA after
        # the first scan starts another scan.
        scans = 1 + data.count(_SOS_BYTES, layout.scan_offset)
        if scans > limits.max_scans:
            raise BadFrame("guard", "too_many_scans", f"the JPEG has {scans} scans, over {limits.max_scans}")
    return header


@dataclass(frozen=True, slots=True)
class DecodeTarget:
    """How small a reduced decode may be: ``pixels`` on the image's ``side`` (shorter or longer).

    Orientation-proof on purpose: EXIF rotation is applied by the decoder, so the target never
    relies on which side ends up horizontal.
    """

    pixels: int
    side: Literal["shorter", "longer"] = "shorter"


def decode_target(spec: PreprocessSpec) -> DecodeTarget:
    """The least resolution a decoded frame needs so that preprocessing never enlarges it.

    ``crop`` (and ``stretch``, which is ``crop`` of the whole frame): the shorter side must be at
    least the larger input side divided by ``crop_fraction``, so the crop still covers the input.
    ``letterbox``: the frame is scaled by its longer side, so only the longer side must reach the
    larger input side.
    """
    needed = max(spec.height, spec.width)
    if spec.resize == "letterbox":
        return DecodeTarget(needed, "longer")
    return DecodeTarget(math.ceil(needed / spec.crop_fraction), "shorter")


def reduction_factor(header: ImageHeader, target: DecodeTarget) -> int:
    """The largest JPEG DCT scale factor (1, 2, 4 or 8) that keeps the image at least ``target``.

    PNG has no scaled decode: always 1.
    """
    if header.kind != "jpeg":
        return 1
    pick = min if target.side == "shorter" else max
    for factor in (8, 4, 2):
        if pick(_ceil_div(header.width, factor), _ceil_div(header.height, factor)) >= target.pixels:
            return factor
    return 1


def decode_bgr(data: bytes, header: ImageHeader, target: DecodeTarget) -> npt.NDArray[np.uint8]:
    """Decode a probed frame to an HxWx3 BGR ``uint8`` image, at reduced scale where ``target`` allows.

    ``header`` must come from :func:`probe` on the same bytes. Raises :class:`BadFrame` with
    stage ``decode`` and reason ``truncated``, ``decompression_bomb``, ``animated``,
    ``decode_failed``, ``unsupported_depth`` or ``header_mismatch``.
    """
    if header.kind == "jpeg":
        layout = _jpeg_layout(data)
        # The end-of-image marker is nearly always the last two bytes; search only otherwise.
        has_eoi = data.endswith(_EOI_BYTES) or data.find(_EOI_BYTES, max(layout.scan_offset, 0)) >= 0
        if layout.scan_offset < 0 or not has_eoi:
            raise BadFrame("decode", "truncated", "the JPEG has no end-of-image marker after its image data")
        factor = reduction_factor(header, target)
    else:
        _check_png_stream(data)
        factor = 1
    try:
        image: npt.NDArray[np.generic] | None = cv2.imdecode(
            np.frombuffer(data, dtype=np.uint8), _REDUCED_FLAGS[factor]
        )
    except cv2.error as exc:
        raise BadFrame("decode", "decode_failed", f"OpenCV refused the image: {exc}") from exc
    if image is None:
        raise BadFrame("decode", "decode_failed", f"the {header.kind} decoder could not read the image")
    if image.dtype != np.uint8:
        raise BadFrame("decode", "unsupported_depth", f"decoded to {image.dtype}, expected 8-bit samples")
    if image.ndim != 3 or image.shape[2] != 3:
        raise BadFrame("decode", "decode_failed", f"decoded to shape {image.shape}, expected HxWx3")
    expected = (_ceil_div(header.height, factor), _ceil_div(header.width, factor))
    if image.shape[:2] not in (expected, expected[::-1]):
        raise BadFrame(
            "decode",
            "header_mismatch",
            f"decoded {image.shape[1]}x{image.shape[0]}, the header promised {expected[1]}x{expected[0]}",
        )
    return image.view(np.uint8)  # dtype checked above; the view only informs the type checker


def decode_into(
    data: bytes,
    content_type: str,
    out: npt.NDArray[np.float32],
    spec: PreprocessSpec,
    limits: DecodeLimits,
) -> ImageHeader:
    """Guard, decode and preprocess one frame into ``out`` (a 3xHxW slot of the batch buffer).

    Raises :class:`BadFrame` (stage ``guard`` or ``decode``) for anything that cannot be
    classified; ``out`` is then left in an unspecified state.
    """
    header = probe(data, content_type, limits)
    image = decode_bgr(data, header, decode_target(spec))
    preprocess_into(image, out, spec)
    return header


# --- JPEG --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _JpegLayout:
    precision: int
    height: int
    width: int
    components: int
    progressive: bool
    scan_offset: int  # first byte of the first scan's entropy-coded data; -1 when absent


def _jpeg_layout(data: bytes) -> _JpegLayout:
    """Walk the marker segments from SOI to the first SOS, reading the SOFn segment."""
    size = len(data)
    pos = 2
    sof: tuple[int, int, int, int, bool] | None = None
    for _ in range(_MAX_JPEG_SEGMENTS):
        if pos >= size:
            break
        if data[pos] != 0xFF:
            raise BadFrame("guard", "bad_header", f"JPEG: expected a marker at byte {pos}")
        fill = _FILL_BYTES.match(data, pos)
        pos = fill.end() if fill is not None else pos + 1
        if pos >= size:
            break
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker in (_SOI, _EOI):
            raise BadFrame(
                "guard", "bad_header", f"JPEG: unexpected marker {marker:#04x} before the image data"
            )
        if pos + 2 > size:
            break
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise BadFrame("guard", "bad_header", f"JPEG: segment {marker:#04x} has length {length}")
        segment_end = pos + length
        if marker in _SOF_MARKERS:
            if sof is not None:
                raise BadFrame("guard", "bad_header", "JPEG: more than one start-of-frame segment")
            if length < 8 or segment_end > size:
                raise BadFrame("guard", "bad_header", "JPEG: start-of-frame segment is truncated")
            precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 2)
            if height == 0 or width == 0 or components not in (1, 3, 4):
                raise BadFrame(
                    "guard",
                    "bad_header",
                    f"JPEG: start of frame says {width}x{height} with {components} components",
                )
            sof = (precision, height, width, components, marker in _PROGRESSIVE_SOF_MARKERS)
        elif marker == _SOS:
            if sof is None:
                raise BadFrame("guard", "bad_header", "JPEG: image data before any start-of-frame segment")
            return _JpegLayout(*sof, scan_offset=min(segment_end, size))
        pos = segment_end
    else:
        raise BadFrame(
            "guard", "bad_header", f"JPEG: more than {_MAX_JPEG_SEGMENTS} segments before the image"
        )
    if sof is None:
        raise BadFrame("guard", "bad_header", "JPEG: the data ends before a start-of-frame segment")
    return _JpegLayout(*sof, scan_offset=-1)


# --- PNG ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ihdr:
    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlaced: bool


def _png_ihdr(data: bytes) -> _Ihdr:
    """Read and validate the IHDR chunk, which the PNG spec requires to come first."""
    if len(data) < 33:
        raise BadFrame("guard", "bad_header", "PNG: the data ends inside the IHDR chunk")
    length, chunk_type = struct.unpack_from(">I4s", data, 8)
    if chunk_type != b"IHDR" or length != 13:
        raise BadFrame("guard", "bad_header", "PNG: the first chunk is not a 13-byte IHDR")
    (crc,) = struct.unpack_from(">I", data, 29)
    if zlib.crc32(data[12:29]) != crc:
        raise BadFrame("guard", "bad_header", "PNG: IHDR checksum mismatch")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise BadFrame("guard", "bad_header", f"PNG: IHDR says {width}x{height}")
    if depth not in _PNG_DEPTHS.get(colour, ()) or compression or filtering or interlace > 1:
        raise BadFrame(
            "guard",
            "bad_header",
            f"PNG: invalid IHDR (colour type {colour}, bit depth {depth}, interlace {interlace})",
        )
    return _Ihdr(width, height, depth, colour, bool(interlace))


def _png_raw_size(ihdr: _Ihdr) -> int:
    """Bytes the inflated image data must have: filter byte plus packed samples per row."""
    bits = ihdr.bit_depth * _PNG_SAMPLES[ihdr.colour_type]

    def rows(width: int, height: int) -> int:
        return height * (1 + (width * bits + 7) // 8) if width and height else 0

    if not ihdr.interlaced:
        return rows(ihdr.width, ihdr.height)
    return sum(
        rows(_ceil_div(max(ihdr.width - x0, 0), dx), _ceil_div(max(ihdr.height - y0, 0), dy))
        for x0, y0, dx, dy in _ADAM7
    )


def _check_png_stream(data: bytes) -> None:
    """Walk the chunks and inflate the image data, bounded by what IHDR promises."""
    ihdr = _png_ihdr(data)
    expected = _png_raw_size(ihdr)
    inflater = zlib.decompressobj()
    produced = 0
    view = memoryview(data)
    size = len(data)
    pos = 8
    for _ in range(_MAX_PNG_CHUNKS):
        if pos + 12 > size:
            raise BadFrame("decode", "truncated", "PNG: the data ends before the IEND chunk")
        length, chunk_type = struct.unpack_from(">I4s", data, pos)
        start, end = pos + 8, pos + 8 + length
        if end + 4 > size:
            raise BadFrame("decode", "truncated", f"PNG: chunk {chunk_type!r} runs past the end of the data")
        if chunk_type == b"IEND":
            break
        if chunk_type == b"acTL":
            raise BadFrame("decode", "animated", "PNG: animated PNG is not a single frame")
        if chunk_type == b"IDAT" and not inflater.eof:
            produced = _inflate_bounded(inflater, view[start:end], produced, expected)
        pos = end + 4
    else:
        raise BadFrame("decode", "bad_header", f"PNG: more than {_MAX_PNG_CHUNKS} chunks")
    if produced < expected:
        raise BadFrame(
            "decode",
            "truncated",
            f"PNG: image data inflates to {produced} bytes, the header needs {expected}",
        )


def _inflate_bounded(
    inflater: zlib._Decompress, chunk: memoryview | bytes, produced: int, expected: int
) -> int:
    """Feed one IDAT chunk; raise as soon as the output exceeds ``expected``. Returns bytes so far."""
    pending: memoryview | bytes = chunk
    try:
        while pending and not inflater.eof:
            # One byte past `expected` is enough to prove the stream carries more than the image.
            out = inflater.decompress(pending, min(_INFLATE_STEP, expected + 1 - produced))
            produced += len(out)
            if produced > expected:
                raise BadFrame(
                    "decode",
                    "decompression_bomb",
                    f"PNG: image data inflates past the {expected} bytes the header allows",
                )
            if not out and len(inflater.unconsumed_tail) == len(pending):
                break  # zlib wants no more input and produced nothing: the stream is stuck
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise BadFrame("decode", "decode_failed", f"PNG: corrupt compressed data: {exc}") from exc
    return produced


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
