"""lookout: a Kafka-native image classification service."""

import os as _os

__version__ = "0.1.0"

MAX_IMAGE_SIDE = 16384
"""The longest image side lookout decodes (OpenCV's and the header guards' limit)."""


def opencv_environment(max_pixels: int, max_side: int = MAX_IMAGE_SIDE) -> dict[str, str]:
    """The ``OPENCV_IO_*`` variables matching lookout's decode limits.

    OpenCV reads them once, when ``cv2`` is first imported, and otherwise accepts images of up
    to 2**30 pixels. They are a second line behind the header guards in ``decode.probe``, not a
    replacement. This package is imported before any of its modules imports cv2, so the
    defaults are set here; ``stream-worker`` sets the configured ``--max-pixels`` before any
    command imports cv2.
    """
    return {
        "OPENCV_IO_MAX_IMAGE_PIXELS": str(max_pixels),
        "OPENCV_IO_MAX_IMAGE_WIDTH": str(max_side),
        "OPENCV_IO_MAX_IMAGE_HEIGHT": str(max_side),
    }


for _name, _value in opencv_environment(50_000_000).items():
    _os.environ.setdefault(_name, _value)
