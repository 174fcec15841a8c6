"""Each camera's recent frames, for the clip of a frame: the edge worker's offloads and the DMD replay."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas import Frame


@dataclass(frozen=True)
class BufferedFrame:
    frame_id: str
    captured_at: datetime
    jpeg: bytes


class ClipBuffers:
    """A ring buffer of each camera's recent frames, for the clip of an offloaded frame."""

    def __init__(self, clip_frames: int, clip_seconds: float) -> None:
        self.clip_frames = clip_frames
        self.clip_span = timedelta(seconds=clip_seconds)
        self.by_camera: dict[str, deque[BufferedFrame]] = {}

    def add(self, frame: Frame) -> None:
        buffer = self.by_camera.setdefault(frame.camera_id, deque(maxlen=self.clip_frames))
        buffer.append(BufferedFrame(frame.frame_id, frame.captured_at, frame.jpeg))

    def forget(self, camera_id: str) -> None:
        """A camera another worker answers now: its frames would stay here for good."""
        self.by_camera.pop(camera_id, None)

    def clip_ending_at(self, frame: Frame) -> list[BufferedFrame]:
        """The buffered frames of the camera up to and including `frame`, within the clip span."""
        clip: list[BufferedFrame] = []
        for buffered in self.by_camera.get(frame.camera_id, ()):
            if frame.captured_at - self.clip_span <= buffered.captured_at <= frame.captured_at:
                clip.append(buffered)
            if buffered.frame_id == frame.frame_id:
                break
        return clip
