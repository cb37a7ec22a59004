"""lookout: a Kafka-native image classification service."""

import os as _os

# OpenCV reads its decoder limits once, when cv2 is first imported, and this package is imported
# before any of its modules imports cv2. The header guards in decode.py enforce the configured
# caps first; these are OpenCV's own second line (its default allows 2**30 pixels).
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "50000000")
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_WIDTH", "16384")
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_HEIGHT", "16384")

__version__ = "0.1.0"
