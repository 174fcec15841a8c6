"""Per-camera drift guard and learning mode of the edge worker.

The published pair's version carries a calibration (`edge_workers.registry.Calibration`): the
edge's fall rate, the switcher's score deciles and the offload share on frames it did not learn
from. The guard keeps each camera's last `drift_window` frames and flags the camera when, over at
least `drift_min_frames` of them, the fall rate or the offload share is off by more than its
tolerance, or the scores' distribution is (the largest gap between the live share of scores
below each calibration decile and that decile's share: a Kolmogorov–Smirnov distance).

The offload share is the switcher's, as the calibration counts it: the frames scored below the
threshold. Exploration and the budget are left out, or a camera's own learning mode would keep it
flagged, and a tight budget would flag every camera.

A flagged camera, and a camera in its first `learning_s` seconds, is in *learning mode*: its
confident frames are explored at `learning_exploration_rate` instead of `edge.exploration_rate`.
Exploration only spends what the offload budget leaves, so the cloud share stays within it.

A flag, its clearing, and learning mode's start and end are log lines and operator events
(`events`, which the worker sends to `operator-events`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from core.operator_events import operator_event
from core.settings import DriftSettings
from edge_workers.registry import Calibration
from schemas import OperatorEvent, OperatorEventKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftCheck:
    camera_id: str
    frames: int
    fall_rate: float
    offload_share: float
    score_distance: float
    reasons: list[str]

    @property
    def drifted(self) -> bool:
        return bool(self.reasons)

    def describe(self) -> str:
        return (
            f"camera {self.camera_id} drifted from the published pair's calibration over {self.frames} frames: "
            + "; ".join(self.reasons)
        )


@dataclass
class CameraWindow:
    first_seen: float
    falls: deque[bool]  # each the camera's last `drift_window` frames
    scores: deque[float]
    doubted: deque[bool]  # scored below the switcher's threshold
    flagged: bool = False
    learning: bool = False


def score_distance(scores: np.ndarray, quantiles: list[float]) -> float:
    """Largest distance of k/10 from the live share of scores below the k-th calibration decile.

    Where scores tie at a decile (a saturated sigmoid, the confidence router's clip), any share from
    those below it to those at or below it is the decile's own, so only a gap outside that counts.
    """
    if not len(quantiles):
        return 0.0
    expected = np.arange(1, len(quantiles) + 1) / (len(quantiles) + 1)
    below = np.array([np.mean(scores < q) for q in quantiles])
    at_or_below = np.array([np.mean(scores <= q) for q in quantiles])
    return float(np.max(np.maximum.reduce([below - expected, expected - at_or_below, np.zeros_like(expected)])))


class DriftGuard:
    def __init__(
        self, settings: DriftSettings, calibration: Calibration | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.calibration = calibration
        self.clock = clock
        self.cameras: dict[str, CameraWindow] = {}
        self.events: list[OperatorEvent] = []  # not sent yet
        self.version: str | None = None  # the version whose calibration is used, for the events

    def use_calibration(self, calibration: Calibration | None, version: str | None = None) -> None:
        """A new pair: its own calibration, and every camera's window starts again."""
        self.calibration = calibration
        self.version = version
        for camera_id, window in self.cameras.items():
            window.falls.clear()
            window.scores.clear()
            window.doubted.clear()
            window.flagged = False
            self.learning(camera_id)

    def forget(self, camera_ids: Iterable[str]) -> None:
        """Cameras another worker answers now (a rebalance): it judges them, this one no longer does."""
        for camera_id in camera_ids:
            self.cameras.pop(camera_id, None)

    def window(self, camera_id: str) -> CameraWindow:
        if camera_id not in self.cameras:
            size = self.settings.drift_window
            self.cameras[camera_id] = CameraWindow(
                self.clock(), deque(maxlen=size), deque(maxlen=size), deque(maxlen=size)
            )
        return self.cameras[camera_id]

    def exploration_rate(self, camera_id: str, base: float) -> float:
        """The camera's exploration share now: higher while it is new or flagged."""
        learning = self.learning(camera_id)
        return max(base, self.settings.learning_exploration_rate) if learning else base

    def learning(self, camera_id: str) -> bool:
        """Whether the camera is in learning mode now; its start and end are events."""
        settings = self.settings
        window = self.window(camera_id)
        learning = window.flagged and settings.raise_cloud_share_on_drift
        learning = learning or self.clock() - window.first_seen < settings.learning_s
        if learning != window.learning:
            window.learning = learning
            why = "flagged" if window.flagged else "new"
            words = f"started ({why})" if learning else "ended"
            kind: OperatorEventKind = "learning_started" if learning else "learning_ended"
            self.events.append(self.event(logging.INFO, kind, f"camera {camera_id}: learning mode {words}", camera_id))
        return learning

    def event(self, level: int, kind: OperatorEventKind, message: str, camera_id: str) -> OperatorEvent:
        return operator_event(log, level, kind, "edge_workers", message, camera_id, self.version)

    def observe(self, camera_id: str, fall: bool, score: float, threshold: float) -> DriftCheck | None:
        """Record one answered frame with the switcher's threshold; returns the camera's check when its flag
        changed."""
        window = self.window(camera_id)
        window.falls.append(fall)
        window.scores.append(score)
        window.doubted.append(score < threshold)
        check = self.check(camera_id)
        if check is None or check.drifted == window.flagged:
            return None
        window.flagged = check.drifted
        if check.drifted:
            self.events.append(self.event(logging.WARNING, "drift_flagged", check.describe(), camera_id))
        else:
            message = f"camera {camera_id} is back within the published pair's calibration"
            self.events.append(self.event(logging.INFO, "drift_cleared", message, camera_id))
        self.learning(camera_id)
        return check

    def check(self, camera_id: str) -> DriftCheck | None:
        """The camera's statistics against the calibration; None without calibration or enough frames."""
        window = self.window(camera_id)
        calibration, settings = self.calibration, self.settings
        if calibration is None or len(window.falls) < settings.drift_min_frames:
            return None
        fall_rate = float(np.mean(window.falls))
        offload_share = float(np.mean(window.doubted))
        distance = score_distance(np.array(window.scores), calibration.score_quantiles)
        reasons = []
        if abs(fall_rate - calibration.fall_rate) > settings.fall_rate_tolerance:
            reasons.append(f"edge fall rate {fall_rate:.0%} against {calibration.fall_rate:.0%}")
        if abs(offload_share - calibration.offload_share) > settings.offload_share_tolerance:
            reasons.append(f"offload share {offload_share:.0%} against {calibration.offload_share:.0%}")
        if distance > settings.score_distance_tolerance:
            reasons.append(f"switcher scores {distance:.2f} away from their calibration (KS distance)")
        return DriftCheck(camera_id, len(window.falls), fall_rate, offload_share, distance, reasons)

    def flagged(self) -> list[str]:
        return sorted(camera for camera, window in self.cameras.items() if window.flagged)
