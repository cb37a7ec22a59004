"""The one preprocessing function: serving, calibration and evaluation all call it.

A decoded BGR ``uint8`` image goes in; a normalised ``float32`` CHW tensor is written
straight into a slot of a preallocated batch buffer. The parameters come from the model's
own metadata (``PreprocessSpec``), so an engine and its preprocessing can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

import cv2
import numpy as np
import numpy.typing as npt

ResizeMode = Literal["crop", "letterbox", "stretch"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)


@dataclass(frozen=True, slots=True)
class PreprocessSpec:
    """How the model expects its input; stored in the ONNX metadata and engine sidecar.

    ``mean`` and ``std`` are per channel, in the model's colour order, on the 0..255 scale.
    ``resize`` says how a frame of any shape becomes the input:

    * ``crop``: the centred region at the input's aspect ratio covering ``crop_fraction`` of
      the frame's shorter side is resized to fill the input (0.875 is the ImageNet evaluation
      recipe; 1.0 keeps the whole shorter side). The rest of the frame is not seen.
    * ``letterbox``: the whole frame, its longer side scaled to the input, the rest padded
      symmetrically with the normalised zero (the mean colour, see :func:`preprocess_into`).
    * ``stretch``: the whole frame resized to the input, aspect ratio ignored.

    ``crop_fraction`` only applies to ``crop``; the other modes store 1.0.
    """

    height: int = 224
    width: int = 224
    colour_order: str = "RGB"
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    crop_fraction: float = 0.875
    resize: ResizeMode = "crop"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize mode {self.resize!r} is not one of {', '.join(RESIZE_MODES)}")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction:g}")
        if self.resize != "crop" and self.crop_fraction != 1.0:
            raise ValueError(f"crop_fraction {self.crop_fraction:g} only applies to resize mode crop")

    def describe(self) -> str:
        """The mode as ``--preprocess`` spells it: ``crop:0.875``, ``letterbox``, ``stretch``."""
        return f"crop:{self.crop_fraction:g}" if self.resize == "crop" else self.resize

    def to_metadata(self) -> dict[str, str]:
        """Flatten to string key/values for ONNX ``metadata_props`` and sidecars."""
        return {
            "input_height": str(self.height),
            "input_width": str(self.width),
            "colour_order": self.colour_order,
            "mean": ",".join(f"{v:g}" for v in self.mean),
            "std": ",".join(f"{v:g}" for v in self.std),
            "crop_fraction": f"{self.crop_fraction:g}",
            "resize": self.resize,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> PreprocessSpec:
        """Inverse of :meth:`to_metadata`; missing keys keep their defaults.

        Metadata written before ``resize`` existed has no such key: it meant ``crop``, except
        that a ``crop_fraction`` of 1 squashed the whole frame, which is ``stretch`` now.
        """
        default = cls()

        def triple(key: str, fallback: tuple[float, float, float]) -> tuple[float, float, float]:
            if key not in meta:
                return fallback
            a, b, c = (float(v) for v in meta[key].split(","))
            return (a, b, c)

        crop_fraction = float(meta.get("crop_fraction", default.crop_fraction))
        resize = meta.get("resize")
        if resize is None:
            resize = "stretch" if crop_fraction >= 1.0 else "crop"
        if resize != "crop":
            crop_fraction = 1.0
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize mode {resize!r} is not one of {', '.join(RESIZE_MODES)}")
        return cls(
            height=int(meta.get("input_height", default.height)),
            width=int(meta.get("input_width", default.width)),
            colour_order=meta.get("colour_order", default.colour_order),
            mean=triple("mean", default.mean),
            std=triple("std", default.std),
            crop_fraction=crop_fraction,
            resize=resize,  # type: ignore[arg-type]  # checked against RESIZE_MODES above
        )

    def with_resize(self, text: str) -> PreprocessSpec:
        """This spec with the resize mode of a ``--preprocess`` value (see :func:`parse_resize`)."""
        resize, fraction = parse_resize(text)
        return replace(self, resize=resize, crop_fraction=fraction)


def parse_resize(text: str) -> tuple[ResizeMode, float]:
    """Read ``crop:FRACTION`` (``crop`` alone is ``crop:0.875``), ``letterbox`` or ``stretch``.

    Raises ``ValueError`` with a one-line message naming the accepted forms.
    """
    forms = "expected crop:FRACTION (0 < FRACTION <= 1, e.g. crop:0.875), letterbox or stretch"
    mode, _, argument = text.strip().partition(":")
    if mode == "crop":
        try:
            fraction = float(argument) if argument else 0.875
        except ValueError:
            raise ValueError(f"preprocessing {text!r}: {forms}") from None
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"preprocessing {text!r}: {forms}")
        return "crop", fraction
    if mode in ("letterbox", "stretch") and not argument:
        return mode, 1.0  # type: ignore[return-value]  # one of the two literals
    raise ValueError(f"preprocessing {text!r}: {forms}")


def crop_box(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """Return ``(top, left, crop_h, crop_w)`` of the source region that the input shows.

    ``crop``: the centred region at the input's aspect ratio; ``letterbox`` and ``stretch``:
    the whole frame.
    """
    if spec.resize != "crop":
        return 0, 0, height, width
    target_aspect = spec.width / spec.height
    # The region covers crop_fraction of the shorter side, at the input's aspect ratio.
    crop_h = height * spec.crop_fraction
    crop_w = crop_h * target_aspect
    if crop_w > width * spec.crop_fraction:
        crop_w = width * spec.crop_fraction
        crop_h = crop_w / target_aspect
    ch, cw = max(1, round(crop_h)), max(1, round(crop_w))
    return (height - ch) // 2, (width - cw) // 2, ch, cw


def content_box(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """Return ``(top, left, box_h, box_w)``: where the frame lands in the model input.

    The whole input, except for ``letterbox``: the frame scaled so that its longer side (relative
    to the input's aspect) fills the input, centred, at least one pixel each way.
    """
    if spec.resize != "letterbox":
        return 0, 0, spec.height, spec.width
    scale = min(spec.height / height, spec.width / width)
    box_h = min(spec.height, max(1, round(height * scale)))
    box_w = min(spec.width, max(1, round(width * scale)))
    return (spec.height - box_h) // 2, (spec.width - box_w) // 2, box_h, box_w


def _area_in_float(height: int, width: int, box_h: int, box_w: int) -> bool:
    """Whether to shrink a ``height x width`` region to ``box_h x box_w`` in float32, not uint8.

    Only where both sides shrink by a factor that is not a whole number: there OpenCV's area
    filter has no fast path, and on float32 it is cheaper than on uint8, conversion and rounding
    included (0.90 against 1.12 ms for the 360x360 crop of a 720p frame decoded at half scale,
    the default input of a 224x224 model). Rounded to whole values it gives the very pixels the
    uint8 filter gives (every one of 75 million checked on the benchmark's frames), so no label
    moves. (Unrounded, the input moves by at most 0.5/128, and that alone changed 1.5 % of
    FP32's and 3 % of INT8's published labels on the held-out clip frames: the model has
    near-ties there.) With one side growing OpenCV's "area" is its bilinear code, fixed-point on
    uint8 and float on float32, and the two differ. The float copy of the region is only made
    while it stays small: at most 4x the input's pixels (a factor under 2 each way), 2.4 MB at
    224x224.
    """
    both_shrink = height >= box_h and width >= box_w
    whole = height % box_h == 0 and width % box_w == 0
    return both_shrink and not whole and height * width <= 4 * box_h * box_w


def preprocess_into(
    image_bgr: npt.NDArray[np.uint8],
    out: npt.NDArray[np.float32],
    spec: PreprocessSpec,
) -> None:
    """Crop, resize and normalise ``image_bgr`` (HxWx3 uint8) into ``out`` (3xHxW float32).

    ``out`` is usually ``batch[i]`` of a preallocated batch buffer; nothing else is allocated
    but the resized image (for ``letterbox``, only the frame's part of the input).

    ``letterbox`` pads with 0.0 *after* normalisation, i.e. with the mean colour. Zero is what
    the network's own convolutions pad with at every border, so the padded band reads as "no
    signal" rather than as an edge: black (pixel 0) would be about -1 in normalised units, a
    strong dark border that the model never saw around ImageNet photos.
    """
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 BGR image, got shape {image_bgr.shape}")
    if out.shape != (3, spec.height, spec.width):
        raise ValueError(f"output slot has shape {out.shape}, expected {(3, spec.height, spec.width)}")
    top, left, ch, cw = crop_box(image_bgr.shape[0], image_bgr.shape[1], spec)
    region = image_bgr[top : top + ch, left : left + cw]
    y0, x0, box_h, box_w = content_box(ch, cw, spec)
    shrinking = ch > box_h or cw > box_w
    if _area_in_float(ch, cw, box_h, box_w):  # implies shrinking
        shrunk = cv2.resize(region.astype(np.float32), (box_w, box_h), interpolation=cv2.INTER_AREA)
        resized: npt.NDArray[np.generic] = np.rint(shrunk, out=shrunk)
    else:
        resized = cv2.resize(
            region,
            (box_w, box_h),
            interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR,
        )
    if (box_h, box_w) != (spec.height, spec.width):
        # Only the pad bands are written: above/below, then left/right of the frame.
        out[:, :y0, :] = 0.0
        out[:, y0 + box_h :, :] = 0.0
        out[:, y0 : y0 + box_h, :x0] = 0.0
        out[:, y0 : y0 + box_h, x0 + box_w :] = 0.0
    channel_of = (2, 1, 0) if spec.colour_order == "RGB" else (0, 1, 2)
    for c, src in enumerate(channel_of):
        plane = out[c, y0 : y0 + box_h, x0 : x0 + box_w]
        np.subtract(resized[:, :, src], spec.mean[c], out=plane, dtype=np.float32)
        np.multiply(plane, 1.0 / spec.std[c], out=plane)
