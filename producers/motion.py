"""Motion gating: skip sampled frames in which nothing moved, but send a heartbeat every K seconds.

Cheap on purpose (it runs on every sampled frame of every camera): a downscaled, blurred grey
frame is compared with the previous sampled one; a pixel whose grey level changed by more than
`threshold` counts as changed, and the frame passes when at least `min_area` of the pixels
changed. The heartbeat keeps a person lying still after a fall in view of the models.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from core.settings import MotionSettings
from producers.pictures import Picture

Trigger = Literal["motion", "heartbeat", "always"]


class MotionGate:
    def __init__(self, settings: MotionSettings) -> None:
        self.settings = settings
        self.previous: np.ndarray | None = None
        self.last_passed_s: float | None = None

    def reset(self) -> None:
        """Start afresh after a reconnect or a loop: the first frame then passes as a heartbeat."""
        self.previous = None
        self.last_passed_s = None

    def changed_share(self, picture: Picture) -> float | None:
        """Share of pixels that changed since the previous call (None for the first frame)."""
        grey = cv2.GaussianBlur(picture.small_grey(self.settings.width), (5, 5), 0)
        previous, self.previous = self.previous, grey
        if previous is None or previous.shape != grey.shape:
            return None
        changed = cv2.absdiff(grey, previous) > self.settings.threshold
        return float(np.count_nonzero(changed)) / changed.size

    def check(self, picture: Picture, t_s: float) -> Trigger | None:
        """Why the frame sampled at `t_s` should be published, or None to skip it."""
        if not self.settings.enabled:
            return "always"
        share = self.changed_share(picture)
        if share is not None and share >= self.settings.min_area:
            self.last_passed_s = t_s
            return "motion"
        if self.last_passed_s is None or t_s - self.last_passed_s >= self.settings.heartbeat_s - 1e-6:
            self.last_passed_s = t_s
            return "heartbeat"
        return None
