"""The one preprocessing function: serving, calibration and evaluation all call it.

A decoded BGR ``uint8`` image goes in; a normalised ``float32`` CHW tensor is written
straight into a slot of a preallocated batch buffer. The parameters come from the model's
own metadata (``PreprocessSpec``), so an engine and its preprocessing can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class PreprocessSpec:
    """How the model expects its input; stored in the ONNX metadata and engine sidecar.

    ``mean`` and ``std`` are per channel, in the model's colour order, on the 0..255 scale.
    ``crop_fraction`` < 1 means: resize so the centre crop of that fraction of the shorter
    side fills the input (the ImageNet evaluation recipe); 1.0 squashes the whole frame.
    """

    height: int = 224
    width: int = 224
    colour_order: str = "RGB"
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    crop_fraction: float = 0.875

    def to_metadata(self) -> dict[str, str]:
        """Flatten to string key/values for ONNX ``metadata_props`` and sidecars."""
        return {
            "input_height": str(self.height),
            "input_width": str(self.width),
            "colour_order": self.colour_order,
            "mean": ",".join(f"{v:g}" for v in self.mean),
            "std": ",".join(f"{v:g}" for v in self.std),
            "crop_fraction": f"{self.crop_fraction:g}",
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> PreprocessSpec:
        """Inverse of :meth:`to_metadata`; missing keys keep their defaults."""
        default = cls()

        def triple(key: str, fallback: tuple[float, float, float]) -> tuple[float, float, float]:
            if key not in meta:
                return fallback
            a, b, c = (float(v) for v in meta[key].split(","))
            return (a, b, c)

        return cls(
            height=int(meta.get("input_height", default.height)),
            width=int(meta.get("input_width", default.width)),
            colour_order=meta.get("colour_order", default.colour_order),
            mean=triple("mean", default.mean),
            std=triple("std", default.std),
            crop_fraction=float(meta.get("crop_fraction", default.crop_fraction)),
        )


def crop_box(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """Return ``(top, left, crop_h, crop_w)`` of the source region that fills the input."""
    if spec.crop_fraction >= 1.0:
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


def preprocess_into(
    image_bgr: npt.NDArray[np.uint8],
    out: npt.NDArray[np.float32],
    spec: PreprocessSpec,
) -> None:
    """Crop, resize and normalise ``image_bgr`` (HxWx3 uint8) into ``out`` (3xHxW float32).

    ``out`` is usually ``batch[i]`` of a preallocated batch buffer; nothing else is allocated
    but the resized image.
    """
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 BGR image, got shape {image_bgr.shape}")
    if out.shape != (3, spec.height, spec.width):
        raise ValueError(f"output slot has shape {out.shape}, expected {(3, spec.height, spec.width)}")
    top, left, ch, cw = crop_box(image_bgr.shape[0], image_bgr.shape[1], spec)
    region = image_bgr[top : top + ch, left : left + cw]
    shrinking = ch > spec.height or cw > spec.width
    resized = cv2.resize(
        region,
        (spec.width, spec.height),
        interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR,
    )
    channel_of = (2, 1, 0) if spec.colour_order == "RGB" else (0, 1, 2)
    for c, src in enumerate(channel_of):
        plane = out[c]
        np.subtract(resized[:, :, src], spec.mean[c], out=plane, dtype=np.float32)
        np.multiply(plane, 1.0 / spec.std[c], out=plane)
