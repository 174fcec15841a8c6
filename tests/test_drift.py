"""The drift guard and learning mode (pure logic), and exploration rates per frame within the budget."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pydantic import ValidationError

from core.settings import DriftSettings
from edge_workers.drift import DriftGuard, score_distance
from edge_workers.registry import Calibration
from edge_workers.routing import Router, RoutingPolicy

CALIBRATION = Calibration(frames=200, fall_rate=0.1, offload_share=0.2, score_quantiles=[q / 10 for q in range(1, 10)])
THRESHOLD = 0.2  # the switcher's: the calibration's offload share is the share of scores below it
SETTINGS = DriftSettings(drift_window=50, drift_min_frames=20, learning_exploration_rate=0.4)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed(guard: DriftGuard, camera: str, frames: int, fall_every: int, seed: int = 0) -> list:
    """Frames whose scores follow the calibration (uniform, a fifth below the threshold); every `fall_every`-th
    one a fall."""
    rng = np.random.default_rng(seed)
    changes = []
    for index in range(frames):
        check = guard.observe(camera, index % fall_every == 0, float(rng.random()), THRESHOLD)
        if check is not None:
            changes.append((index, check))
    return changes


def test_a_camera_off_its_calibration_is_flagged_once_and_explores_more() -> None:
    guard = DriftGuard(SETTINGS, CALIBRATION)
    assert feed(guard, "cam-a", 100, fall_every=10) == []  # as calibrated: 10 % falls
    changes = feed(guard, "cam-b", 100, fall_every=1)  # the edge calls every frame a fall
    assert len(changes) == 1, "flagged once, not on every frame"
    index, check = changes[0]
    assert index == SETTINGS.drift_min_frames - 1  # as soon as there are enough frames to judge
    assert check.drifted and check.reasons == ["edge fall rate 100% against 10%"]
    assert "camera cam-b drifted" in check.describe()
    assert guard.flagged() == ["cam-b"]
    assert guard.exploration_rate("cam-b", 0.02) == 0.4 and guard.exploration_rate("cam-a", 0.02) == 0.02


def test_score_distribution_and_offload_share_count_as_drift_too() -> None:
    guard = DriftGuard(SETTINGS, CALIBRATION)
    for _ in range(30):  # every score low: the switcher doubts everything here
        guard.observe("cam-c", False, 0.01, THRESHOLD)
    check = guard.check("cam-c")
    assert check is not None and len(check.reasons) == 2
    assert check.reasons[0] == "offload share 100% against 20%"
    assert check.reasons[1].startswith("switcher scores 0.90 away")
    assert score_distance(np.linspace(0, 1, 1001), CALIBRATION.score_quantiles) < 0.01


def test_tied_scores_as_calibrated_are_no_drift() -> None:
    """Half the scores saturated at exactly 1.0 (a sigmoid's float32 ceiling): the upper deciles are all 1.0,
    and live scores drawn the same way must sit within them."""
    rng = np.random.default_rng(0)
    saturated = np.where(rng.random(4000) < 0.5, 1.0, rng.random(4000) * 0.99)
    quantiles = [float(q) for q in np.quantile(saturated[:2000], np.arange(1, 10) / 10)]
    assert quantiles[5:] == [1.0] * 4
    assert score_distance(saturated[2000:], quantiles) < 0.05
    assert score_distance(np.full(100, 0.995), quantiles) > 0.35, "all between the 5th decile and the tie: drift"


def test_the_offload_share_is_the_switchers_not_what_exploration_added() -> None:
    """Every frame of a camera in learning mode explored, its scores as calibrated: no drift, because the
    calibration counts only the frames the switcher doubts."""
    guard = DriftGuard(SETTINGS.model_copy(update={"learning_s": 3600.0}), CALIBRATION)
    router = Router(
        RoutingPolicy(threshold=THRESHOLD, max_offload_ratio=None, max_offload_fps=None, window_s=60,
                      exploration_rate=0.0),
        clock=lambda: 0.0, rng=random.Random(0),
    )  # fmt: skip
    rng = np.random.default_rng(1)
    routed = 0
    for index in range(100):
        score = float(rng.random())
        [route] = router.route([score], [guard.exploration_rate("cam-new", 1.0)])
        routed += route.offload is not None
        assert guard.observe("cam-new", index % 10 == 0, score, THRESHOLD) is None
    check = guard.check("cam-new")
    assert routed == 100 and check is not None and not check.drifted
    assert abs(check.offload_share - CALIBRATION.offload_share) < 0.1


def test_a_new_pair_resets_the_flags_and_without_a_calibration_nothing_is_judged() -> None:
    guard = DriftGuard(SETTINGS, CALIBRATION)
    feed(guard, "cam-b", 40, fall_every=1)
    assert guard.flagged() == ["cam-b"]
    guard.use_calibration(CALIBRATION.model_copy(update={"fall_rate": 0.95}))
    assert guard.flagged() == [] and feed(guard, "cam-b", 40, fall_every=1) == []
    guard.use_calibration(None)
    assert guard.check("cam-b") is None and feed(guard, "cam-b", 40, fall_every=1) == []


def test_the_return_within_calibration_is_reported_and_learning_mode_ends() -> None:
    guard = DriftGuard(SETTINGS, CALIBRATION)
    feed(guard, "cam-b", 30, fall_every=1)
    changes = feed(guard, "cam-b", 100, fall_every=10)
    assert len(changes) == 1 and not changes[0][1].drifted
    assert guard.exploration_rate("cam-b", 0.02) == 0.02
    assert [(e.kind, e.camera_id) for e in guard.events] == [
        ("drift_flagged", "cam-b"), ("learning_started", "cam-b"),
        ("drift_cleared", "cam-b"), ("learning_ended", "cam-b"),
    ]  # fmt: skip
    assert guard.events[2].message == "camera cam-b is back within the published pair's calibration"


def test_a_new_camera_is_in_learning_mode_for_learning_s() -> None:
    clock = Clock()
    guard = DriftGuard(SETTINGS.model_copy(update={"learning_s": 600.0}), None, clock)
    assert guard.exploration_rate("cam-new", 0.0) == 0.4
    clock.now = 599.0
    assert guard.exploration_rate("cam-new", 0.0) == 0.4
    clock.now = 601.0
    assert guard.exploration_rate("cam-new", 0.0) == 0.0
    assert guard.exploration_rate("cam-later", 0.0) == 0.4  # its own first sighting counts
    assert [(e.kind, e.camera_id, e.message) for e in guard.events] == [
        ("learning_started", "cam-new", "camera cam-new: learning mode started (new)"),
        ("learning_ended", "cam-new", "camera cam-new: learning mode ended"),
        ("learning_started", "cam-later", "camera cam-later: learning mode started (new)"),
    ]


def test_raised_exploration_stays_within_the_offload_budget() -> None:
    policy = RoutingPolicy(threshold=0.5, max_offload_ratio=0.25, max_offload_fps=None, window_s=60, exploration_rate=0)
    router = Router(policy, clock=lambda: 0.0, rng=random.Random(0))
    learning, steady = [1.0] * 8, [0.0] * 8
    routes = [route for _ in range(10) for route in router.route([0.9] * 16, learning + steady)]
    explored = [index % 16 for index, route in enumerate(routes) if route.offload == "exploration"]
    assert len(explored) == 40 == 0.25 * len(routes)  # the budget, not the 50 % asked
    assert set(explored) <= set(range(8)), "only the frames of the camera in learning mode"


def test_a_minimum_no_window_can_hold_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"drift_min_frames \(50\) must not exceed drift_window \(40\)"):
        DriftSettings(drift_window=40, drift_min_frames=50)
