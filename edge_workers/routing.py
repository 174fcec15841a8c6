"""Which frames of a batch go to the cloud: switcher threshold, offload budget, exploration.

Pure logic with an injectable clock and random source, so the policy is tested
exactly and the worker stays a thin shell around it.

- A frame whose agreement probability is below the threshold asks to be offloaded.
- The offload budget caps what goes to the cloud over a sliding window: at most a
  share of the frames seen in the window and/or a number of frames per second. When a
  batch asks for more than is left, the frames with the lowest agreement win the slots;
  the others keep their edge answer as final and are marked `over_budget`.
- Exploration sends a random share of the confident frames to the cloud as well (reason
  `exploration`), so logged traffic also holds cloud answers for frames the switcher
  trusts and retraining data stays unbiased. Exploration uses only budget the switcher
  left over: the budget is a cost cap, and the frames the switcher doubts matter more.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from core.settings import EdgeSettings
from schemas import OffloadReason, Routing

# 0.1 * 30 is 3.0000000000000004 or 2.9999999999999996 in floats: round such products fairly.
EPSILON = 1e-9


def served_threshold(edge: EdgeSettings, switcher_threshold: float) -> float:
    """The threshold a worker routes by: the switcher's own unless the settings override it."""
    return switcher_threshold if edge.switcher_threshold is None else edge.switcher_threshold


@dataclass(frozen=True)
class RoutingPolicy:
    threshold: float
    max_offload_ratio: float | None
    max_offload_fps: float | None
    window_s: float
    exploration_rate: float

    @classmethod
    def from_settings(cls, edge: EdgeSettings, switcher_threshold: float) -> RoutingPolicy:
        """The configured policy; the threshold is the switcher's own unless the settings override it."""
        return cls(
            threshold=served_threshold(edge, switcher_threshold),
            max_offload_ratio=edge.max_offload_ratio,
            max_offload_fps=edge.max_offload_fps,
            window_s=edge.offload_window_s,
            exploration_rate=edge.exploration_rate,
        )

    def record(self, over_budget: bool) -> Routing:
        """The policy as it is written into a verdict."""
        return Routing(
            threshold=self.threshold,
            max_offload_ratio=self.max_offload_ratio,
            max_offload_fps=self.max_offload_fps,
            window_s=self.window_s,
            exploration_rate=self.exploration_rate,
            over_budget=over_budget,
        )


@dataclass(frozen=True)
class RouteDecision:
    """One frame's route: `offload` is None when the edge answer is final."""

    offload: OffloadReason | None
    over_budget: bool


class OffloadBudget:
    """Frames seen and frames offloaded per batch over the last `window_s` seconds."""

    def __init__(self, policy: RoutingPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.batches: deque[tuple[float, int, int]] = deque()  # (time, frames, offloaded)

    def slots(self, frames: int) -> int:
        """How many of the next `frames` frames may go to the cloud now."""
        now = self.clock()
        while self.batches and self.batches[0][0] <= now - self.policy.window_s:
            self.batches.popleft()
        seen = sum(batch[1] for batch in self.batches) + frames
        offloaded = sum(batch[2] for batch in self.batches)
        allowed = frames
        if self.policy.max_offload_ratio is not None:
            allowed = min(allowed, math.floor(self.policy.max_offload_ratio * seen + EPSILON) - offloaded)
        if self.policy.max_offload_fps is not None:
            allowed = min(allowed, math.floor(self.policy.max_offload_fps * self.policy.window_s + EPSILON) - offloaded)
        return max(0, allowed)

    def spend(self, frames: int, offloaded: int) -> None:
        self.batches.append((self.clock(), frames, offloaded))

    def offload_ratio(self) -> float:
        """Share of the frames in the window that went to the cloud (0 when the window is empty)."""
        seen = sum(batch[1] for batch in self.batches)
        return sum(batch[2] for batch in self.batches) / seen if seen else 0.0


class Router:
    def __init__(
        self,
        policy: RoutingPolicy,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.budget = OffloadBudget(policy, clock)
        self.rng = rng or random.Random()

    def set_threshold(self, threshold: float) -> None:
        """A new switcher brings its own threshold; the budget's window carries over."""
        self.policy = replace(self.policy, threshold=threshold)
        self.budget.policy = self.policy

    def route(
        self,
        scores: Sequence[float],
        exploration_rates: Sequence[float] | None = None,
        shared_slots: int | None = None,
    ) -> list[RouteDecision]:
        """Decide every frame of a batch from its agreement probability.

        `exploration_rates` (one per frame) replaces the policy's exploration rate, e.g. for a camera
        in learning mode; the budget still caps what goes to the cloud. `shared_slots`: what a budget
        shared with other workers (`edge_workers.shared_budget`) leaves this batch, as a further cap.
        """
        rates = exploration_rates if exploration_rates is not None else [self.policy.exploration_rate] * len(scores)
        slots = self.budget.slots(len(scores))
        if shared_slots is not None:
            slots = min(slots, shared_slots)
        doubtful = sorted((i for i, s in enumerate(scores) if s < self.policy.threshold), key=lambda i: scores[i])
        switcher = set(doubtful[:slots])
        over_budget = set(doubtful[slots:])
        slots -= len(switcher)
        # One draw per confident frame whether or not a slot is left, so the share explored does not
        # depend on the budget's state; too few slots go to drawn frames picked at random, not to the
        # cameras that come first in a batch.
        drawn = [i for i, s in enumerate(scores) if s >= self.policy.threshold and self.rng.random() < rates[i]]
        explore = set(drawn if len(drawn) <= slots else self.rng.sample(drawn, max(0, slots)))
        self.budget.spend(len(scores), len(switcher) + len(explore))
        decisions = []
        for index in range(len(scores)):
            reason: OffloadReason | None = (
                "switcher" if index in switcher else "exploration" if index in explore else None
            )
            decisions.append(RouteDecision(offload=reason, over_budget=index in over_budget))
        return decisions
