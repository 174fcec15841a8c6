"""A sampled frame's pixels as its decoder gave them: BGR (OpenCV) or planar YUV 4:2:0 (PyAV).

H.264 and most camera codecs decode to YUV 4:2:0, which is also what a JPEG stores. A YUV frame
is masked, gated, resized and encoded as planes, never converted to BGR and back inside the JPEG
encoder: those two conversions were most of a sampled frame's own cost (`fallwatch bench
producer`). Only full-range BT.601 planes go straight in, as JPEG defines them; limited-range
planes are stretched to full range first, and frames in other formats or matrices are converted
to BGR by FFmpeg as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import av
import cv2
import numpy as np
import simplejpeg

from core import images
from producers.masks import PrivacyMasks

BLACK_CHROMA = 128
# FFmpeg's colorspace numbers whose YUV is JPEG's (BT.601), unspecified included: H.264 says 601 then
JPEG_MATRICES = {2, 5, 6}  # unspecified, BT470BG, SMPTE170M
FULL_RANGE = 2  # AVCOL_RANGE_JPEG
LUMA_TO_FULL = np.clip((np.arange(256) - 16) * 255 / 219, 0, 255).round().astype(np.uint8)
CHROMA_TO_FULL = np.clip((np.arange(256) - 128) * 255 / 224 + 128, 0, 255).round().astype(np.uint8)


class Picture(Protocol):
    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    def bgr(self) -> np.ndarray: ...

    def small_grey(self, width: int) -> np.ndarray:
        """The picture in grey at `width` (or less), aspect kept: what the motion gate compares."""
        ...

    def masked(self, masks: PrivacyMasks) -> Picture:
        """The picture with every mask black (in place)."""
        ...

    def resized(self, size: tuple[int, int] | None) -> Picture: ...

    def jpeg(self, quality: int) -> bytes:
        """JPEG bytes; ValueError when they cannot be encoded."""
        ...


def small_size(width: int, height: int, small_width: int) -> tuple[int, int]:
    small_width = min(small_width, width)
    return small_width, max(1, round(height * small_width / width))


@dataclass
class BgrPicture:
    image: np.ndarray  # HxWx3 BGR, or HxW grey

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    def bgr(self) -> np.ndarray:
        return self.image

    def small_grey(self, width: int) -> np.ndarray:
        small = cv2.resize(self.image, small_size(self.width, self.height, width), interpolation=cv2.INTER_AREA)
        return small if small.ndim == 2 else cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)

    def masked(self, masks: PrivacyMasks) -> BgrPicture:
        masks.fill(self.image, (0, 0, 0))
        return self

    def resized(self, size: tuple[int, int] | None) -> BgrPicture:
        if size is None or (self.width, self.height) == size:
            return self
        return BgrPicture(cv2.resize(self.image, size, interpolation=cv2.INTER_AREA))

    def jpeg(self, quality: int) -> bytes:
        return images.encode_jpeg(self.image, quality)


@dataclass
class YuvPicture:
    """Full-range YUV 4:2:0 planes: Y at full size, U and V at half width and height."""

    y: np.ndarray
    u: np.ndarray
    v: np.ndarray

    @property
    def width(self) -> int:
        return int(self.y.shape[1])

    @property
    def height(self) -> int:
        return int(self.y.shape[0])

    @classmethod
    def of_frame(cls, frame: av.VideoFrame) -> YuvPicture | None:
        """The frame's planes, or None where they are not JPEG's (another format, matrix, or an odd size)."""
        if frame.format.name not in ("yuvj420p", "yuv420p") or frame.width % 2 or frame.height % 2:
            return None
        if frame.colorspace not in JPEG_MATRICES:
            return None
        width, height = frame.width, frame.height
        planes = frame.to_ndarray().reshape(-1)  # Y, then U, then V, each without row padding
        luma, chroma = width * height, width * height // 4
        y = planes[:luma].reshape(height, width)
        u = planes[luma : luma + chroma].reshape(height // 2, width // 2)
        v = planes[luma + chroma :].reshape(height // 2, width // 2)
        if frame.format.name == "yuv420p" and frame.color_range != FULL_RANGE:
            return cls(cv2.LUT(y, LUMA_TO_FULL), cv2.LUT(u, CHROMA_TO_FULL), cv2.LUT(v, CHROMA_TO_FULL))
        return cls(y, u, v)

    def bgr(self) -> np.ndarray:
        size = (self.width, self.height)
        chroma = [cv2.resize(plane, size, interpolation=cv2.INTER_LINEAR) for plane in (self.v, self.u)]
        return cv2.cvtColor(cv2.merge([self.y, *chroma]), cv2.COLOR_YCrCb2BGR)  # OpenCV's YCrCb is JPEG's

    def small_grey(self, width: int) -> np.ndarray:
        # full-range BT.601 luma is the grey OpenCV computes from BGR
        return cv2.resize(self.y, small_size(self.width, self.height, width), interpolation=cv2.INTER_AREA)

    def masked(self, masks: PrivacyMasks) -> YuvPicture:
        masks.fill(self.y, 0)
        masks.fill_half(self.u, BLACK_CHROMA)
        masks.fill_half(self.v, BLACK_CHROMA)
        return self

    def resized(self, size: tuple[int, int] | None) -> Picture:
        if size is None or (self.width, self.height) == size:
            return self
        width, height = size
        if width % 2 or height % 2:  # 4:2:0 needs even sides
            return BgrPicture(self.bgr()).resized(size)
        half = (width // 2, height // 2)
        return YuvPicture(
            cv2.resize(self.y, size, interpolation=cv2.INTER_AREA),
            cv2.resize(self.u, half, interpolation=cv2.INTER_AREA),
            cv2.resize(self.v, half, interpolation=cv2.INTER_AREA),
        )

    def jpeg(self, quality: int) -> bytes:
        try:
            return simplejpeg.encode_jpeg_yuv_planes(self.y, self.u, self.v, quality=quality)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"JPEG encoding failed: {exc}") from None
