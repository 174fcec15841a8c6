"""JPEG decoding shared by the services that read frames (edge, cloud, offline replay)."""

import cv2
import numpy as np


def decode_jpeg_rgb(jpeg: bytes) -> np.ndarray | None:
    """An HxWx3 uint8 RGB array, or None when the bytes are not a decodable image."""
    image = cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
