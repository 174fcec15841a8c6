"""Reading a camera or video through OpenCV and sampling it to a target fps by timestamps."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2

from core.urls import redact, source_kind
from producers.pictures import BgrPicture, Picture

# RTSP over TCP: no lost UDP packets (smeared frames) behind NAT or on a busy Wi-Fi; set before the
# first capture opens, because OpenCV reads it per open and offers no per-capture option for it
os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
# FFmpeg's and OpenCV's own messages repeat on every reconnect and may quote camera addresses; the
# producer logs each failure itself, once, with credentials redacted
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


class SourceError(RuntimeError):
    """The source could not be opened or read."""


@dataclass(frozen=True)
class SampledFrame:
    position_s: float  # the frame's timestamp: within the file, or the monotonic clock for live sources
    picture: Picture


def open_capture(url: str, open_timeout_s: float = 30.0, read_timeout_s: float = 30.0) -> cv2.VideoCapture:
    """Open a source; for streams the timeouts bound connecting and each read (a stalled stream)."""
    kind = source_kind(url)
    if kind == "device":
        capture = cv2.VideoCapture(url, cv2.CAP_V4L2)
    elif kind == "stream":
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(read_timeout_s * 1000),
        ]
        capture = cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
    else:
        capture = cv2.VideoCapture(url.removeprefix("file://"), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise SourceError(f"cannot open video source {redact(url)}")
    return capture


class RateSampler:
    """Chooses frames at `fps` by their timestamps, not by counting frames (sources drop and vary)."""

    def __init__(self, fps: float, early_s: float = 1e-6) -> None:
        self.interval_s = 1.0 / fps
        self.early_s = early_s  # a frame this much before its due time still counts as due
        self.next_due_s: float | None = None

    def due(self, t_s: float) -> bool:
        if self.next_due_s is None:
            self.next_due_s = t_s
        if t_s + self.early_s < self.next_due_s:
            return False
        # keep the phase: a late frame does not push every later sample back
        self.next_due_s += self.interval_s * max(1, int((t_s - self.next_due_s) // self.interval_s) + 1)
        return True


def sample_capture(
    capture: cv2.VideoCapture, url: str, fps: float, on_grab: Callable[[], None] | None = None
) -> Iterator[SampledFrame]:
    """Frames of an open capture at about `fps`, until the source ends or a read fails (or times out).

    Every frame is grabbed (cheap, and it keeps a live source's buffer from going stale) but only
    the frames that fall due are decoded. Files are timed by their own timestamps, live sources by
    the monotonic clock at grab time (an MJPEG stream's timestamps assume 25 fps whatever it sends).
    """
    sampler = RateSampler(fps)
    live = source_kind(url) != "file"
    while capture.grab():
        if on_grab is not None:
            on_grab()
        t_s = time.monotonic() if live else capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
        if not sampler.due(t_s):
            continue
        ok, image = capture.retrieve()
        if not ok:
            raise SourceError(f"cannot decode a frame of {redact(url)}")
        yield SampledFrame(t_s, BgrPicture(image))


class OpenCVSource:
    """Decode mode `all`: one open OpenCV capture that decodes every frame (and V4L2 devices)."""

    def __init__(self, url: str, shown_url: str, fps: float, timeouts_s: tuple[float, float]) -> None:
        self.capture = open_capture(url, *timeouts_s)
        self.shown_url = shown_url
        self.fps = fps

    def close(self) -> None:
        self.capture.release()

    def end_s(self) -> float | None:
        """Where the file's video ends; None when unknown (a live stream or a device)."""
        frames, fps = self.capture.get(cv2.CAP_PROP_FRAME_COUNT), self.capture.get(cv2.CAP_PROP_FPS)
        return frames / fps if frames > 0 and fps > 0 else None

    def frames(self, on_grab: Callable[[], None], on_decode: Callable[[], None]) -> Iterator[SampledFrame]:
        def grabbed() -> None:  # OpenCV's grab() decodes the frame; retrieve() only converts it
            on_grab()
            on_decode()

        yield from sample_capture(self.capture, self.shown_url, self.fps, on_grab=grabbed)


def encode_jpeg(picture: Picture, quality: int) -> bytes:
    """The picture's JPEG, failing as a source does (a camera records the error and reconnects)."""
    try:
        return picture.jpeg(quality)
    except ValueError as exc:
        raise SourceError(str(exc)) from None
