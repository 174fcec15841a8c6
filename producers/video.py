"""Reading a camera or video through OpenCV and sampling it to a target fps."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np


class SourceError(RuntimeError):
    """The source could not be opened or read."""


@dataclass(frozen=True)
class SampledFrame:
    position_s: float  # the frame's timestamp within the stream
    image_bgr: np.ndarray


def open_capture(url: str) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(url)
    if not capture.isOpened():
        raise SourceError(f"cannot open video source {redact(url)}")
    return capture


def sample_frames(url: str, fps: float, pace: bool) -> Iterator[SampledFrame]:
    """Frames of `url` at about `fps`, chosen by their timestamps, not by counting frames.

    Every frame is grabbed (cheap) but only the frames that fall due are decoded.
    With `pace`, a file is played back in real time, like a live camera.
    """
    capture = open_capture(url)
    interval_s = 1.0 / fps
    next_due_s = 0.0
    started = time.monotonic()
    try:
        while capture.grab():
            position_s = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            if position_s + 1e-6 < next_due_s:
                continue
            ok, image = capture.retrieve()
            if not ok:
                raise SourceError(f"cannot decode a frame of {redact(url)}")
            # keep the phase: a late frame does not push every later sample back
            next_due_s += interval_s * max(1, int((position_s - next_due_s) // interval_s) + 1)
            if pace:
                time.sleep(max(0.0, started + position_s - time.monotonic()))
            yield SampledFrame(position_s, image)
    finally:
        capture.release()


def encode_jpeg(image_bgr: np.ndarray, quality: int) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise SourceError("JPEG encoding failed")
    return buffer.tobytes()


def redact(url: str) -> str:
    """Hide credentials in camera URLs (rtsp://user:pass@host/...) before they reach logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
