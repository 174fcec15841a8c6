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
from producers.decoding import PyAVSource
from producers.masks import PrivacyMasks
from producers.motion import MotionGate, Trigger
from producers.pictures import Picture
from producers.video import OpenCVSource, SourceError, encode_jpeg

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0
BEHIND_WARN_S = 3.0  # behind schedule this long: one warning line
BEHIND_CLEAR_S = 5.0  # no sampling slot missed this long: back on schedule


class RateMeter:
    """Events (with a value each) over the last RATE_WINDOW_S seconds; safe to use from two threads."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, float]] = deque()
        self.lock = threading.Lock()

    def mark(self, value: float = 1.0) -> None:
        with self.lock:
            self.events.append((time.monotonic(), value))
            self._forget_old()

    def rate(self) -> float:
        with self.lock:
            self._forget_old()
            return len(self.events) / RATE_WINDOW_S

    def mean(self) -> float | None:
        with self.lock:
            self._forget_old()
            return sum(value for _, value in self.events) / len(self.events) if self.events else None

    def max(self) -> float | None:
        with self.lock:
            self._forget_old()
            return max((value for _, value in self.events), default=None)

    def _forget_old(self) -> None:
        horizon = time.monotonic() - RATE_WINDOW_S
        while self.events and self.events[0][0] < horizon:
            self.events.popleft()


class Schedule:
    """The camera's sampling slots on the clock: how many passed without a sample (the loop fell behind).

    Slots are centred on the first sample, so a sample up to half an interval early or late is on time.
    """

    def __init__(self, fps: float) -> None:
        self.interval_s = 1.0 / fps
        self.next_slot_s: float | None = None

    def missed(self, now_s: float) -> int:
        """A sample was taken at `now_s`: the slots that passed before it without one."""
        if self.next_slot_s is None:
            self.next_slot_s = now_s - self.interval_s / 2
        passed = max(0, int((now_s - self.next_slot_s) // self.interval_s) + 1)
        self.next_slot_s += passed * self.interval_s
        return max(0, passed - 1)


@dataclass
class CameraStats:
    """A camera's health: written by its capture thread and its publisher, read by metrics and status."""

    state: str = "starting"  # connecting, streaming, waiting (backoff), ended, stopped
    frames_in: int = 0  # frames (packets) read from the source
    decoded: int = 0  # frames decoded; the others were skipped before decoding
    sampled: int = 0
    behind: int = 0  # sampling slots missed because the loop (or the source) was slower than fps
    behind_since: float | None = None  # monotonic time of the first missed slot of the current streak
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
    fps_sampled: RateMeter = field(default_factory=RateMeter)
    fps_out: RateMeter = field(default_factory=RateMeter)
    send_delay_s: RateMeter = field(default_factory=RateMeter)  # capture time to Kafka's ack, per frame

    def last_frame_age_s(self) -> float | None:
        return None if self.last_frame_at is None else max(0.0, time.time() - self.last_frame_at)

    def behind_for_s(self) -> float:
        """How long the camera has been behind schedule (0: on schedule)."""
        return 0.0 if self.behind_since is None else time.monotonic() - self.behind_since


@dataclass(frozen=True)
class CapturedFrame:
    captured_at: datetime
    width: int
    height: int
    jpeg: bytes
    trigger: Trigger


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff with jitter: cameras that dropped together do not all retry in step."""
    # the exponent capped: 2.0 ** 1024 overflows, after a camera failed that often (a weekend offline)
    ceiling = min(max_s, initial_s * 2.0 ** min(attempt, 64))
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
        self.kind = source_kind(camera.sampled_url)
        self.gate = MotionGate(camera.motion)
        self.masks = PrivacyMasks(camera.masks)
        self.warned_behind = False
        self.last_missed_at = 0.0
        self.sampled = 0  # frames sampled on the current connection, also known after it failed

    def run(self) -> None:
        """Read until the file ends (not looping) or `stop`; a live source is reconnected forever."""
        failures = 0
        while not self.stop.is_set():
            self.stats.state = "connecting"
            self.sampled = 0
            try:
                self.stream_once()
            except SourceError as exc:
                self.stats.last_error = str(exc)
            except Exception as exc:  # a bug or an OpenCV surprise must not end this camera, nor others
                self.stats.last_error = f"{type(exc).__name__}: {redact(str(exc))}"
                # no traceback: OpenCV's messages may quote the URL, credentials and all
                log.error("camera %s: capture failed: %s", self.camera.id, self.stats.last_error)
            frames = self.sampled
            if self.stop.is_set():
                break
            if self.kind == "file" and frames > 0 and not self.camera.loop:
                # failed part-way, it ends there: read again from the start, its frames would come again as
                # new frames (new capture times, new ids), and every fall in it twice
                if self.stats.last_error is not None:
                    log.warning("camera %s: %s; the file ends there", self.camera.id, self.stats.last_error)
                self.stats.state = "ended"
                return
            if self.kind == "file" and frames > 0 and self.stats.last_error is None:
                continue
            failures = 0 if frames > 0 else failures + 1
            delay = backoff_delay(failures, self.settings.reconnect_initial_s, self.settings.reconnect_max_s)
            log.warning(
                "camera %s: %s; reconnecting in %.1f s",
                self.camera.id,
                self.stats.last_error or f"{redact(self.camera.sampled_url)} ended",
                delay,
            )
            self.stats.state = "waiting"
            self.stats.reconnects += 1
            self.stop.wait(delay)
        self.stats.state = "stopped"

    def stream_once(self) -> None:
        """One connection: frames until the source ends, stalls or fails (`sampled` counts them)."""
        source = open_source(self.camera, self.settings)
        self.stats.last_error = None
        self.stats.state = "streaming"
        self.gate.reset()
        # a file read as fast as it decodes has no schedule to fall behind
        schedule = Schedule(self.camera.fps) if self.kind != "file" or self.camera.realtime else None
        pace_from = time.monotonic()
        wall_start = datetime.now(UTC)
        if self.kind == "file" and not self.camera.realtime:
            # read faster than it plays: its frames end about now, not up to its length ahead of the clock
            # (frames captured in the future are refused downstream)
            wall_start -= timedelta(seconds=source.end_s() or 0.0)
        try:
            for frame in source.frames(self.on_grab, self.on_decode):
                if self.stop.is_set():
                    break
                self.sampled += 1
                if self.kind == "file":
                    if self.camera.realtime and self.stop.wait(pace_from + frame.position_s - time.monotonic()):
                        break
                    captured_at = wall_start + timedelta(seconds=frame.position_s)
                else:
                    captured_at = datetime.now(UTC)
                self.on_sample(schedule)
                self.publish(frame.picture, frame.position_s, captured_at)
        finally:
            source.close()
        if self.kind != "file" and not self.stop.is_set():
            age = self.stats.last_frame_age_s()
            stalled = age is not None and age >= 0.9 * self.settings.stall_timeout_s
            self.stats.stalls += stalled
            self.stats.last_error = f"{redact(self.camera.sampled_url)} {'stalled' if stalled else 'ended'}"

    def publish(self, picture: Picture, position_s: float, captured_at: datetime) -> None:
        """Mask a sampled frame and gate it on motion; resize, encode and hand over the ones that pass."""
        picture = picture.masked(self.masks)
        trigger = self.gate.check(picture, position_s)
        if trigger is None:
            self.stats.skipped_motion += 1
            return
        if trigger == "heartbeat":
            self.stats.heartbeats += 1
        picture = picture.resized(self.camera.resize)
        jpeg = encode_jpeg(picture, self.camera.jpeg_quality)
        self.emit(CapturedFrame(captured_at, picture.width, picture.height, jpeg, trigger))

    def on_sample(self, schedule: Schedule | None) -> None:
        """Count the sample, and the slots missed before it; warn once a camera stays behind."""
        self.stats.sampled += 1
        self.stats.fps_sampled.mark()
        if schedule is None:
            return
        now = time.monotonic()
        missed = schedule.missed(now)
        stats = self.stats
        if missed:
            stats.behind += missed
            self.last_missed_at = now
            stats.behind_since = now if stats.behind_since is None else stats.behind_since
            if not self.warned_behind and stats.behind_for_s() >= BEHIND_WARN_S:
                self.warned_behind = True
                log.warning(
                    "camera %s: behind schedule for %.0f s: sampling %.2f of %g fps (%d slots missed so far)",
                    self.camera.id,
                    stats.behind_for_s(),
                    stats.fps_sampled.rate(),
                    self.camera.fps,
                    stats.behind,
                )
        elif stats.behind_since is not None and now - self.last_missed_at >= BEHIND_CLEAR_S:
            stats.behind_since = None
            if self.warned_behind:
                log.info("camera %s: back on schedule at %g fps", self.camera.id, self.camera.fps)
            self.warned_behind = False

    def on_grab(self) -> None:
        self.stats.frames_in += 1
        self.stats.last_frame_at = time.time()
        self.stats.fps_in.mark()

    def on_decode(self) -> None:
        self.stats.decoded += 1


def open_source(camera: CameraSettings, settings: ProducerSettings) -> OpenCVSource | PyAVSource:
    """A connection to the camera's sampled stream, decoded the camera's way (devices: through OpenCV)."""
    timeouts_s = (settings.open_timeout_s, settings.stall_timeout_s)
    if camera.decode == "all" or source_kind(camera.sampled_url) == "device":
        return OpenCVSource(camera.source_url, camera.sampled_url, camera.fps, timeouts_s)
    return PyAVSource(
        camera.source_url,
        camera.sampled_url,
        camera.decode,
        camera.fps,
        camera.resize,
        timeouts_s,
        camera.hardware_decode,
    )
