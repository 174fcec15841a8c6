"""Each clip's frames through a routing policy and the alerting service's own rule, on a simulated clock.

A clip is one camera. Its published frames reach the edge `eval.edge_latency_s` after capture;
`edge_workers.routing.Router` (the edge worker's own policy and offload budget, its clock the
simulated one) decides each frame; an offloaded frame's provisional edge verdict is followed by the
cloud's verdict `eval.cloud_latency_s` later (or the cloud worker's edge-fallback when that is past
`edge.cloud_deadline_s`). The verdicts go, in arrival order, into `alerting.rules.CameraState`
exactly as the alerting service feeds them, with the simulated wall clock as `now`; alerting's
cloud-wait deadline is checked when it falls due, and its edge-fallback verdicts come back
through the stream as they do live.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from alerting.rules import CameraState
from core.settings import Settings
from dmd_offline.clip_outputs import ClipOutputs
from edge_workers.routing import Router, RoutingPolicy
from edge_workers.switcher import Switcher, history_by_camera
from schemas import FallEvent, PersonDown, Verdict

EDGE_ONLY, CLOUD_ONLY = "edge-only", "cloud-only"
DEFERRAL_FAMILIES = ("DMD", "uncertainty", "random")


@dataclass(frozen=True)
class Policy:
    """A routing policy: a score per frame (low: send to the cloud) and the threshold below which it offloads."""

    name: str
    family: str  # edge-only, cloud-only, DMD, uncertainty, random
    threshold: float
    target_share: float | None  # the cloud share it was set to (None: edge-only, cloud-only, the switcher's own)
    budget: bool  # the configured offload budget and exploration apply (not to edge-only and cloud-only)

    def routing(self, settings: Settings) -> RoutingPolicy:
        edge = settings.edge
        return RoutingPolicy(
            threshold=self.threshold,
            max_offload_ratio=edge.max_offload_ratio if self.budget else None,
            max_offload_fps=edge.max_offload_fps if self.budget else None,
            window_s=edge.offload_window_s,
            exploration_rate=edge.exploration_rate if self.budget else 0.0,
        )


def clip_scores(switcher: Switcher, clip: ClipOutputs) -> np.ndarray:
    """The switcher's score of each frame of a clip (one camera, in frame order)."""
    history = history_by_camera(clip.edge_p, [clip.camera_id] * clip.frames, np.arange(clip.frames), switcher.history)
    return switcher.agreement_probability(clip.hidden, clip.edge_p, history).astype(np.float64)


@dataclass(frozen=True)
class Scores:
    """Every policy family's score of every frame, per clip (the order of the clips)."""

    by_family: dict[str, list[np.ndarray]]

    @classmethod
    def of(cls, outputs: list[ClipOutputs], switcher: Switcher, seed: int) -> Scores:
        rng = np.random.default_rng(seed)
        return cls(
            {
                EDGE_ONLY: [np.ones(clip.frames) for clip in outputs],
                CLOUD_ONLY: [np.zeros(clip.frames) for clip in outputs],
                # the switcher's predicted agreement: the edge worker offloads below its threshold
                "DMD": [clip_scores(switcher, clip) for clip in outputs],
                # Narayan et al. 2022: the edge's confidence |p − 0.5|, least confident first
                "uncertainty": [2 * np.abs(clip.edge_p.astype(np.float64) - 0.5) for clip in outputs],
                "random": [rng.random(clip.frames) for clip in outputs],
            }
        )

    def threshold_for_share(self, family: str, share: float) -> float:
        """The threshold below which `share` of all frames of the folder score (ties may offload fewer)."""
        ranked = np.sort(np.concatenate(self.by_family[family]))
        count = round(share * len(ranked))
        return float(ranked[count]) if count < len(ranked) else float(np.nextafter(ranked[-1], np.inf))

    def share_below(self, family: str, threshold: float) -> float:
        scores = np.concatenate(self.by_family[family])
        return float(np.mean(scores < threshold)) if len(scores) else 0.0


def policies(scores: Scores, switcher_threshold: float, shares: list[float]) -> list[Policy]:
    """Edge-only, cloud-only, DMD at its own threshold, and each deferral family at DMD's share and each share."""
    published_share = scores.share_below("DMD", switcher_threshold)
    result = [
        Policy(EDGE_ONLY, EDGE_ONLY, 0.0, None, budget=False),
        Policy(CLOUD_ONLY, CLOUD_ONLY, 1.0, None, budget=False),
        Policy(f"DMD at its threshold {switcher_threshold:.3f}", "DMD", switcher_threshold, None, budget=True),
    ]
    for family in ("uncertainty", "random"):
        threshold = scores.threshold_for_share(family, published_share)
        result.append(Policy(f"{family} at DMD's {published_share:.0%}", family, threshold, published_share, True))
    for share in shares:
        for family in DEFERRAL_FAMILIES:
            threshold = scores.threshold_for_share(family, share)
            result.append(Policy(f"{family} {share:.0%}", family, threshold, share, budget=True))
    return result


@dataclass
class ClipRun:
    """What one policy made of one clip."""

    outputs: ClipOutputs
    alerts: list[FallEvent] = field(default_factory=list)  # alert events in the order alerting sent them
    person_down: list[PersonDown] = field(default_factory=list)  # person-down changes, in order
    final_fall: dict[int, bool] = field(default_factory=dict)  # frame index → the final verdict alerting counted
    offloaded: int = 0
    cloud_frames: set[int] = field(default_factory=set)  # offloaded frames the cloud model answered (its cost)
    fallbacks: int = 0  # final verdicts on the edge's answer (cloud too late for alerting or for its deadline)

    @property
    def first_alert(self) -> FallEvent | None:
        return next((alert for alert in self.alerts if alert.state == "open"), None)

    def final_decisions(self) -> np.ndarray:
        return np.array([self.final_fall[index] for index in range(self.outputs.frames)], dtype=bool)


class SimulatedClock:
    """The simulated wall clock, in seconds, for the router's offload budget."""

    def __init__(self) -> None:
        self.now: datetime | None = None

    def seconds(self) -> float:
        assert self.now is not None
        return self.now.timestamp()


# (arrival at alerting, tie-break, verdict or None for a deadline check of alerting's timer)
Arrival = tuple[datetime, int, Verdict | None]


def replay_clip(outputs: ClipOutputs, scores: np.ndarray, policy: Policy, settings: Settings) -> ClipRun:
    rule = settings.alerting.rule_for(outputs.room)
    run = ClipRun(outputs)
    order = itertools.count()
    arrivals = verdict_arrivals(outputs, scores, policy, settings, rule.cloud_wait_s, run, order)
    state = CameraState(rule=rule, camera_id=outputs.camera_id, room=outputs.room)
    feed_alerting(state, arrivals, run, order)
    return run


def verdict_arrivals(
    outputs: ClipOutputs,
    scores: np.ndarray,
    policy: Policy,
    settings: Settings,
    cloud_wait_s: float,
    run: ClipRun,
    order: Iterator[int],
) -> list[Arrival]:
    """Route each frame as the edge worker would; the verdicts (and cloud answers) as alerting receives them."""
    edge, ev = settings.edge, settings.eval
    clock = SimulatedClock()
    router = Router(policy.routing(settings), clock=clock.seconds, rng=random.Random(edge.exploration_seed))
    arrivals: list[Arrival] = []
    edge_latency = timedelta(seconds=ev.edge_latency_s)
    cloud_latency = timedelta(seconds=ev.cloud_latency_s)
    for index in range(outputs.frames):
        captured_at = outputs.captured_at(index)
        at_edge = captured_at + edge_latency
        clock.now = at_edge
        route = router.route([float(scores[index])])[0]
        probability = float(outputs.edge_p[index])
        verdict = Verdict(
            frame_id=outputs.frame_id(index),
            camera_id=outputs.camera_id,
            room=outputs.room,
            captured_at=captured_at,
            source="edge",
            final=route.offload is None,
            fall_probability=probability,
            decision=probability >= edge.decision_threshold,
            switcher_score=float(scores[index]) if policy.family == "DMD" else None,
            offload_reason=route.offload,
            edge_model=edge.model,
            produced_at=at_edge,
        )
        heapq.heappush(arrivals, (at_edge, next(order), verdict))
        if route.offload is None:
            continue
        run.offloaded += 1
        heapq.heappush(arrivals, (at_edge + timedelta(seconds=cloud_wait_s), next(order), None))
        answered_at = at_edge + cloud_latency
        if ev.cloud_latency_s < edge.cloud_deadline_s:
            run.cloud_frames.add(index)
            cloud_p = float(outputs.cloud_p[index])
            answer = verdict.model_copy(
                update={
                    "source": "cloud",
                    "final": True,
                    "fall_probability": cloud_p,
                    "decision": cloud_p >= settings.cloud.decision_threshold,
                    "cloud_model": settings.cloud.model,
                    "produced_at": answered_at,
                }
            )
        else:  # the cloud worker finds the request past its deadline and answers with the edge's verdict
            answer = verdict.model_copy(update={"source": "edge-fallback", "final": True, "produced_at": answered_at})
        heapq.heappush(arrivals, (answered_at, next(order), answer))
    return arrivals


def feed_alerting(state: CameraState, arrivals: list[Arrival], run: ClipRun, order: Iterator[int]) -> None:
    """Alerting's rule over the arrivals in time order (its timer's edge fallbacks included), into `run`."""
    index_of = {run.outputs.frame_id(index): index for index in range(run.outputs.frames)}
    fallbacks_sent: set[str] = set()
    while arrivals:
        now, _, arrival = heapq.heappop(arrivals)
        if arrival is None:  # alerting's timer: overdue cloud verdicts become edge-fallback verdicts
            for fallback in state.due_fallbacks(now):
                if fallback.frame_id not in fallbacks_sent:
                    fallbacks_sent.add(fallback.frame_id)
                    heapq.heappush(arrivals, (now, next(order), fallback))
            continue
        index = index_of[arrival.frame_id]
        for output in state.observe(arrival, now):
            if isinstance(output, PersonDown):
                run.person_down.append(output)
            else:
                run.alerts.append(output)
        if arrival.final and index not in run.final_fall:
            run.final_fall[index] = arrival.decision
            run.fallbacks += arrival.source == "edge-fallback"


def replay(outputs: list[ClipOutputs], scores: Scores, policy: Policy, settings: Settings) -> list[ClipRun]:
    return [
        replay_clip(clip, clip_scores, policy, settings)
        for clip, clip_scores in zip(outputs, scores.by_family[policy.family], strict=True)
    ]
