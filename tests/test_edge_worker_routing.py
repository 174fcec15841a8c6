"""The routing policy (threshold, offload budget, exploration) and the registry's refusals, without Kafka."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from core.settings import ConfigError, EdgeSettings
from edge_workers.registry import SwitcherRegistry
from edge_workers.routing import Router, RoutingPolicy
from edge_workers.switcher import create_untrained_switcher


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(**overrides: object) -> RoutingPolicy:
    values: dict[str, object] = {
        "threshold": 0.5,
        "max_offload_ratio": None,
        "max_offload_fps": None,
        "window_s": 10.0,
        "exploration_rate": 0.0,
    }
    values.update(overrides)
    return RoutingPolicy(**values)  # type: ignore[arg-type]


def test_threshold_alone_offloads_every_doubtful_frame() -> None:
    router = Router(policy(threshold=0.5))

    routes = router.route([0.1, 0.5, 0.49, 0.9])

    assert [route.offload for route in routes] == ["switcher", None, "switcher", None]
    assert not any(route.over_budget for route in routes)


def test_ratio_budget_gives_its_slots_to_the_lowest_agreement_frames() -> None:
    clock = ManualClock()
    router = Router(policy(threshold=0.9, max_offload_ratio=0.25), clock=clock)

    routes = router.route([0.3, 0.1, 0.8, 0.2, 0.95, 0.5, 0.4, 0.6])  # 7 doubtful, 2 slots (25 % of 8)

    offloaded = [i for i, route in enumerate(routes) if route.offload == "switcher"]
    assert offloaded == [1, 3], "the two lowest scores win"
    assert [i for i, route in enumerate(routes) if route.over_budget] == [0, 2, 5, 6, 7]
    assert routes[4].offload is None and not routes[4].over_budget, "a confident frame is not over budget"


def test_ratio_budget_holds_over_the_window_and_frees_up_after_it() -> None:
    clock = ManualClock()
    router = Router(policy(threshold=1.0, max_offload_ratio=0.2, window_s=10.0), clock=clock)
    offloaded = 0
    for step in range(25):  # a burst: every frame doubtful, 25 batches of 4 within 5 s
        clock.now += 0.2
        offloaded += sum(route.offload is not None for route in router.route([0.5] * 4))
        assert offloaded <= 0.2 * 4 * (step + 1), "never above the share, at any moment"
    assert offloaded == 20
    assert router.budget.offload_ratio() == pytest.approx(0.2)

    clock.now += 10.0  # the window has passed: the budget is fresh
    assert router.budget.slots(10) == 2


def test_frames_per_second_budget() -> None:
    clock = ManualClock()
    router = Router(policy(threshold=1.0, max_offload_fps=0.5, window_s=10.0), clock=clock)

    first = router.route([0.5] * 8)
    clock.now += 1.0
    second = router.route([0.5] * 8)

    assert sum(route.offload is not None for route in first) == 5, "0.5 frames/s over 10 s"
    assert sum(route.offload is not None for route in second) == 0
    assert sum(route.over_budget for route in second) == 8


def test_exploration_share_is_within_tolerance_and_only_takes_confident_frames() -> None:
    router = Router(policy(threshold=0.5, exploration_rate=0.05), rng=random.Random(7))
    scores = [0.9] * 9000 + [0.1] * 1000

    routes = router.route(scores)

    explored = [i for i, route in enumerate(routes) if route.offload == "exploration"]
    assert all(scores[i] >= 0.5 for i in explored)
    # binomial(9000, 0.05): mean 450, sd 20.7; 4 sd either side
    assert 367 <= len(explored) <= 533, len(explored)
    assert sum(route.offload == "switcher" for route in routes) == 1000


def test_exploration_uses_only_budget_the_switcher_left() -> None:
    router = Router(policy(threshold=0.5, exploration_rate=1.0, max_offload_ratio=0.5), rng=random.Random(0))

    routes = router.route([0.1, 0.2, 0.9, 0.9, 0.9, 0.9])

    assert [route.offload for route in routes[:2]] == ["switcher", "switcher"]
    assert sorted(route.offload or "" for route in routes[2:]) == ["", "", "", "exploration"]


def test_exploration_slots_left_go_to_any_camera_of_the_batch() -> None:
    rng = random.Random(3)
    explored: list[int] = []
    for _ in range(200):
        # a batch of ten cameras' frames, every one drawn for exploration, one slot left in the budget
        router = Router(policy(threshold=0.5, exploration_rate=1.0, max_offload_ratio=0.1), rng=rng)
        routes = router.route([0.9] * 10)
        (index,) = [i for i, route in enumerate(routes) if route.offload == "exploration"]
        explored.append(index)
    # not the first camera of every batch: each is explored, about 20 times in 200
    counts = [explored.count(i) for i in range(10)]
    assert min(counts) >= 5, counts


def test_policy_from_settings_and_its_record() -> None:
    edge = EdgeSettings(max_offload_ratio=0.6, offload_window_s=30, exploration_rate=0.02)
    own = RoutingPolicy.from_settings(edge, switcher_threshold=0.7)
    overridden = RoutingPolicy.from_settings(edge.model_copy(update={"switcher_threshold": 0.4}), 0.7)

    assert own.threshold == 0.7 and overridden.threshold == 0.4
    record = own.record(over_budget=True)
    assert (record.threshold, record.max_offload_ratio, record.window_s, record.exploration_rate) == (
        0.7,
        0.6,
        30,
        0.02,
    )
    assert record.over_budget and record.max_offload_fps is None


def test_start_up_refuses_a_missing_or_mismatched_switcher_in_one_line(tmp_path: Path) -> None:
    registry = tmp_path / "switchers"
    with pytest.raises(ConfigError, match="no switcher in"):
        SwitcherRegistry(registry, "tiny", 16, poll_s=5, announce_key=None).load_newest()

    create_untrained_switcher(registry, input_dim=16, edge_model="another/model")
    with pytest.raises(ConfigError) as refused:
        SwitcherRegistry(registry, "tiny", 16, poll_s=5, announce_key=None).load_newest()
    message = str(refused.value)
    assert "\n" not in message and "another/model" in message and "not 'tiny'" in message

    create_untrained_switcher(registry, input_dim=8, edge_model="tiny")
    with pytest.raises(ConfigError, match="8-d hidden vectors but the edge model gives 16-d"):
        SwitcherRegistry(registry, "tiny", 16, poll_s=5, announce_key=None).load_newest()
