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
        self.points: dict[tuple[int, int], list[np.ndarray]] = {}  # the polygons in pixels, per image size
        self.half_covers: dict[tuple[int, int], np.ndarray] = {}

    def fill(self, image: np.ndarray, value: int | tuple[int, int, int]) -> None:
        """Every mask's pixels of `image` set to `value`, in place."""
        if self.polygons:
            cv2.fillPoly(image, self.pixel_points(image.shape[1], image.shape[0]), value)

    def fill_half(self, plane: np.ndarray, value: int) -> None:
        """The same for a plane at half the frame's width and height (4:2:0 chroma): each of its pixels that
        covers any masked pixel of the frame, so no colour of what is masked survives at the mask's edge."""
        if not self.polygons:
            return
        size = (plane.shape[1] * 2, plane.shape[0] * 2)
        cover = self.half_covers.get(size)
        if cover is None:
            full = np.zeros((size[1], size[0]), dtype=np.uint8)
            cv2.fillPoly(full, self.pixel_points(*size), 1)
            cover = self.half_covers[size] = full.reshape(size[1] // 2, 2, size[0] // 2, 2).max(axis=(1, 3)) > 0
        plane[cover] = value

    def pixel_points(self, width: int, height: int) -> list[np.ndarray]:
        points = self.points.get((width, height))
        if points is None:
            scale = np.array([width, height], dtype=np.float64)
            points = self.points[(width, height)] = [
                np.round(polygon * scale).astype(np.int32) for polygon in self.polygons
            ]
        return points
