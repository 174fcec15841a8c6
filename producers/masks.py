"""Privacy masks: a camera's polygons (in the frame's normalised coordinates) blacked out in the producer.

Applied to each sampled frame before the motion gate and the JPEG encoder, so nothing behind a mask
reaches Kafka, the models, the clips or the snapshots, and motion behind it wakes nothing.
"""

from __future__ import annotations

import cv2
import numpy as np


class PrivacyMasks:
    def __init__(self, polygons: list[list[tuple[float, float]]]) -> None:
        self.polygons = [np.array(polygon, dtype=np.float64) for polygon in polygons]
        self.size: tuple[int, int] | None = None
        self.points: list[np.ndarray] = []  # the polygons in pixels of frames of `size`

    def apply(self, image_bgr: np.ndarray) -> np.ndarray:
        """The frame with every mask's pixels set to zero (in place)."""
        if not self.polygons:
            return image_bgr
        height, width = image_bgr.shape[:2]
        if self.size != (width, height):
            self.size = (width, height)
            scale = np.array([width, height], dtype=np.float64)
            self.points = [np.round(polygon * scale).astype(np.int32) for polygon in self.polygons]
        cv2.fillPoly(image_bgr, self.points, (0, 0, 0))
        return image_bgr
