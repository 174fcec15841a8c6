"""One camera: a capture thread that reads, samples, gates and encodes, reconnecting when the source fails.

OpenCV blocks, so each camera gets its own thread (the number of cameras per process is bounded
by `producers.max_cameras`); the thread hands encoded frames to the event loop, where the camera's
publisher sends them to Kafka (see producers.service).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from core.settings import CameraSettings, ProducerSettings
from core.urls import redact, source_kind
from producers.motion import MotionGate, Trigger
from producers.video import SourceError, encode_jpeg, open_capture, resize, sample_capture

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0


class RateMeter:
    """Events per second over the last RATE_WINDOW_S seconds; safe to use from two threads."""

    def __init__(self) -> None:
        self.times: deque[float] = deque()
        self.lock = threading.Lock()

    def mark(self) -> None:
        with self.lock:
            self.times.append(time.monotonic())
            self._forget_old()

    def rate(self) -> float:
        with self.lock:
            self._forget_old()
            return len(self.times) / RATE_WINDOW_S

    def _forget_old(self) -> None:
        horizon = time.monotonic() - RATE_WINDOW_S
        while self.times and self.times[0] < horizon:
            self.times.popleft()


@dataclass
class CameraStats:
    """A camera's health: written by its capture thread and its publisher, read by metrics and status."""

    state: str = "starting"  # connecting, streaming, waiting (backoff), ended, stopped
    frames_in: int = 0  # frames read from the source
    sampled: int = 0
    skipped_motion: int = 0
    heartbeats: int = 0
    queued: int = 0
    dropped: int = 0  # oldest frames dropped because Kafka was slower than the camera
    published: int = 0  # acked by Kafka
    failed: int = 0  # Kafka refused or timed out; counted, not retried (live video: the newest matters)
    reconnects: int = 0
    stalls: int = 0  # connections that delivered no frame for stall_timeout_s
    last_frame_at: float | None = None  # wall-clock time of the last frame read
    last_error: str | None = None  # redacted
    fps_in: RateMeter = field(default_factory=RateMeter)
    fps_out: RateMeter = field(default_factory=RateMeter)

    def last_frame_age_s(self) -> float | None:
        return None if self.last_frame_at is None else max(0.0, time.time() - self.last_frame_at)


@dataclass(frozen=True)
class CapturedFrame:
    captured_at: datetime
    width: int
    height: int
    jpeg: bytes
    trigger: Trigger


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff with jitter: cameras that dropped together do not all retry in step."""
    ceiling = min(max_s, initial_s * 2**attempt)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class CameraCapture:
    """The capture loop of one camera, run in its own thread; `emit` hands each frame to the publisher."""

    def __init__(
        self,
        camera: CameraSettings,
        settings: ProducerSettings,
        stats: CameraStats,
        emit: Callable[[CapturedFrame], None],
        stop: threading.Event,
    ) -> None:
        self.camera = camera
        self.settings = settings
        self.stats = stats
        self.emit = emit
        self.stop = stop
        self.kind = source_kind(camera.url)
        self.gate = MotionGate(camera.motion)

    def run(self) -> None:
        """Read until the file ends (not looping) or `stop`; a live source is reconnected forever."""
        failures = 0
        while not self.stop.is_set():
            self.stats.state = "connecting"
            try:
                frames = self.stream_once()
            except SourceError as exc:
                frames = 0
                self.stats.last_error = str(exc)
            except Exception as exc:  # a bug or an OpenCV surprise must not end this camera, nor others
                frames = 0
                self.stats.last_error = f"{type(exc).__name__}: {redact(str(exc))}"
                # no traceback: OpenCV's messages may quote the URL, credentials and all
                log.error("camera %s: capture failed: %s", self.camera.id, self.stats.last_error)
            if self.stop.is_set():
                break
            if self.kind == "file" and frames > 0 and self.stats.last_error is None:
                if not self.camera.loop:
                    self.stats.state = "ended"
                    return
                continue
            failures = 0 if frames > 0 else failures + 1
            delay = backoff_delay(failures, self.settings.reconnect_initial_s, self.settings.reconnect_max_s)
            log.warning(
                "camera %s: %s; reconnecting in %.1f s",
                self.camera.id,
                self.stats.last_error or f"{redact(self.camera.url)} ended",
                delay,
            )
            self.stats.state = "waiting"
            self.stats.reconnects += 1
            self.stop.wait(delay)
        self.stats.state = "stopped"

    def stream_once(self) -> int:
        """One connection: frames until the source ends, stalls or fails; returns how many were sampled."""
        capture = open_capture(self.camera.url, self.settings.open_timeout_s, self.settings.stall_timeout_s)
        self.stats.last_error = None
        self.stats.state = "streaming"
        self.gate.reset()
        pace_from = time.monotonic()
        wall_start = datetime.now(UTC)
        sampled = 0
        try:
            for frame in sample_capture(capture, self.camera.url, self.camera.fps, on_grab=self.on_grab):
                if self.stop.is_set():
                    break
                sampled += 1
                self.stats.sampled += 1
                if self.kind == "file":
                    if self.camera.realtime and self.stop.wait(pace_from + frame.position_s - time.monotonic()):
                        break
                    captured_at = wall_start + timedelta(seconds=frame.position_s)
                else:
                    captured_at = datetime.now(UTC)
                trigger = self.gate.check(frame.image_bgr, frame.position_s)
                if trigger is None:
                    self.stats.skipped_motion += 1
                    continue
                if trigger == "heartbeat":
                    self.stats.heartbeats += 1
                image = resize(frame.image_bgr, self.camera.resize)
                height, width = image.shape[:2]
                jpeg = encode_jpeg(image, self.camera.jpeg_quality)
                self.emit(CapturedFrame(captured_at, width, height, jpeg, trigger))
        finally:
            capture.release()
        if self.kind != "file" and not self.stop.is_set():
            age = self.stats.last_frame_age_s()
            stalled = age is not None and age >= 0.9 * self.settings.stall_timeout_s
            self.stats.stalls += stalled
            self.stats.last_error = f"{redact(self.camera.url)} {'stalled' if stalled else 'ended'}"
        return sampled

    def on_grab(self) -> None:
        self.stats.frames_in += 1
        self.stats.last_frame_at = time.time()
        self.stats.fps_in.mark()
