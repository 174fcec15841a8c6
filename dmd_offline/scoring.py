"""Scoring alerts as caregivers live them: per clip, then per policy with bootstrap intervals by clip.

`score_clip` is the one per-clip judgement, used by `fallwatch eval` and by the demo's summary:
- a fall clip is *detected* when its first alert opened after the annotated fall start; an
  alert that opened before it (or at the very instant it began, which no frame of the fall
  can have shown) is a *false alarm*: the rule fired on what came before the fall, and the
  fall counts as missed;
- a clip without a fall that raised an alert is a false alarm;
- an alert *opens* at the capture time of the verdict that confirmed it (`FallEvent.opened_at`);
  the caregiver hears of it when alerting sends it (`updated_at`): time to alert is that
  moment minus the fall start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np

from dmd_offline.metrics import classification_scores
from schemas import FallEvent

Outcome = Literal["detected", "missed", "false alarm", "no alert"]
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class ClipScore:
    is_fall: bool
    outcome: Outcome
    fall_start_s: float | None
    opened_s: float | None  # the first alert's opening (capture time) after the clip's start
    sent_s: float | None  # when alerting sent it, after the clip's start
    first_fall_s: float | None  # capture time of the alert's first evidence frame, after the clip's start
    early: bool  # a fall clip whose first alert opened before the fall started

    @property
    def evidence_before_onset(self) -> bool:
        """A detected fall whose alert rests partly on frames from before the fall (a model seeing a fall
        in what came before it, e.g. someone lying in bed before rolling out)."""
        return (
            self.detected
            and self.first_fall_s is not None
            and self.fall_start_s is not None
            and self.first_fall_s < self.fall_start_s
        )

    @property
    def detected(self) -> bool:
        return self.outcome == "detected"

    @property
    def false_alarm(self) -> bool:
        return self.outcome == "false alarm"

    @property
    def time_to_alert_s(self) -> float | None:
        """Fall start → the caregiver is alerted, for a detected fall."""
        if not self.detected or self.sent_s is None or self.fall_start_s is None:
            return None
        return self.sent_s - self.fall_start_s

    def describe(self) -> str:
        if self.opened_s is None:
            return "MISSED fall" if self.is_fall else "no alert (right)"
        assert self.sent_s is not None
        if not self.is_fall:
            return f"FALSE ALARM (opened at {self.opened_s:.1f} s)"
        assert self.fall_start_s is not None
        after = self.opened_s - self.fall_start_s
        if self.early:
            return f"FALSE ALARM: opened {abs(after):.1f} s before the fall started"
        earlier = " (first evidence before it)" if self.evidence_before_onset else ""
        return f"alert {after:+.1f} s after the fall start{earlier}, sent {self.sent_s - self.fall_start_s:+.1f} s"


def score_clip(
    is_fall: bool, fall_start_s: float | None, clip_start: datetime | None, first_alert: FallEvent | None
) -> ClipScore:
    """Judge a clip's first alert against its annotation (see the module docstring); `clip_start` is the
    capture time of the clip's start (needed when there is an alert)."""
    if first_alert is None:
        return ClipScore(is_fall, "missed" if is_fall else "no alert", fall_start_s, None, None, None, early=False)
    if clip_start is None:
        raise ValueError("an alert is judged against the capture time of its clip's start")
    opened_s = (first_alert.opened_at - clip_start).total_seconds()
    sent_s = (first_alert.updated_at - clip_start).total_seconds()
    first_fall_s = (first_alert.first_fall_at - clip_start).total_seconds()
    if not is_fall:
        return ClipScore(is_fall, "false alarm", fall_start_s, opened_s, sent_s, first_fall_s, early=False)
    if fall_start_s is None:
        raise ValueError("a fall clip needs its fall start to be scored")
    early = opened_s <= fall_start_s
    outcome: Outcome = "false alarm" if early else "detected"
    return ClipScore(is_fall, outcome, fall_start_s, opened_s, sent_s, first_fall_s, early)


@dataclass(frozen=True)
class ClipFacts:
    """What the policy aggregates need of one clip under one policy."""

    score: ClipScore
    no_fall_s: float  # seconds of the clip without a fall (all of it, or the part before the fall start)
    truth: np.ndarray  # per frame: a fall under way or over (annotation)
    predicted: np.ndarray  # per frame: the final verdict alerting counted
    offloaded: int
    edge_s: float
    cloud_s: float
    edge_j: float  # NaN when not measured
    cloud_j: float


@dataclass(frozen=True)
class Interval:
    value: float | None
    low: float | None
    high: float | None


@dataclass(frozen=True)
class PolicyScores:
    fall_clips: int
    detected: int
    detected_on_earlier_evidence: int  # detected falls whose first evidence frame came before the fall
    no_fall_clips: int
    false_alarms: int  # clips: no-fall clips with an alert plus fall clips alerted before the fall
    early_alarms: int  # of which on fall clips, before the fall started
    detection: Interval  # share of fall clips detected
    false_alarms_per_clip: Interval
    false_alarms_per_hour: Interval  # per hour of video without a fall
    no_fall_hours: float
    time_to_alert_median_s: float | None
    time_to_alert_max_s: float | None
    cloud_share: float
    edge_s: float
    cloud_s: float
    edge_j: float | None
    cloud_j: float | None
    frame_f1: Interval
    frame_precision: float
    frame_recall: float


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise numerator / denominator, NaN where the denominator is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def f1_of(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Fall-class F1; NaN (left out of the intervals) for a resample without a single fall frame."""
    return np.where(tp + fn > 0, np.nan_to_num(ratio(2 * tp, 2 * tp + fp + fn), nan=0.0), np.nan)


def interval(value: float | None, samples: np.ndarray, confidence: float) -> Interval:
    finite = samples[np.isfinite(samples)]
    if value is None or not len(finite):
        return Interval(value, None, None)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(value, float(low), float(high))


def total_or_none(values: Sequence[float]) -> float | None:
    array = np.asarray(values, dtype=float)
    return None if np.isnan(array).any() else float(array.sum())


def aggregate(facts: list[ClipFacts], resamples: int, confidence: float, seed: int) -> PolicyScores:
    """A policy's event and frame scores over its clips; intervals from `resamples` bootstrap draws of clips."""
    is_fall = np.array([f.score.is_fall for f in facts])
    detected = np.array([f.score.detected for f in facts], dtype=float)
    false_alarm = np.array([f.score.false_alarm for f in facts], dtype=float)
    no_fall_s = np.array([f.no_fall_s for f in facts])
    tp = np.array([np.sum(f.truth & f.predicted) for f in facts], dtype=float)
    fp = np.array([np.sum(~f.truth & f.predicted) for f in facts], dtype=float)
    fn = np.array([np.sum(f.truth & ~f.predicted) for f in facts], dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(facts), size=(resamples, len(facts)))

    def statistic(compute: Callable[[np.ndarray], np.ndarray]) -> Interval:
        """`compute` maps rows of clip indices to one value per row: on all clips, and on each draw."""
        value = float(compute(np.arange(len(facts))[None, :])[0])
        return interval(None if np.isnan(value) else value, compute(draws), confidence)

    def detection(rows: np.ndarray) -> np.ndarray:
        return ratio(detected[rows].sum(axis=1), is_fall[rows].sum(axis=1).astype(float))

    def per_clip(rows: np.ndarray) -> np.ndarray:
        return false_alarm[rows].sum(axis=1) / rows.shape[1]

    def per_hour(rows: np.ndarray) -> np.ndarray:
        return ratio(false_alarm[rows].sum(axis=1), no_fall_s[rows].sum(axis=1) / SECONDS_PER_HOUR)

    def frame_f1(rows: np.ndarray) -> np.ndarray:
        return f1_of(tp[rows].sum(axis=1), fp[rows].sum(axis=1), fn[rows].sum(axis=1))

    delays = [f.score.time_to_alert_s for f in facts if f.score.time_to_alert_s is not None]
    frames = sum(len(f.truth) for f in facts)
    whole = classification_scores(
        np.concatenate([f.truth for f in facts]), np.concatenate([f.predicted for f in facts])
    )
    return PolicyScores(
        fall_clips=int(is_fall.sum()),
        detected=int(detected.sum()),
        detected_on_earlier_evidence=sum(f.score.evidence_before_onset for f in facts),
        no_fall_clips=int((~is_fall).sum()),
        false_alarms=int(false_alarm.sum()),
        early_alarms=sum(f.score.early for f in facts),
        detection=statistic(detection),
        false_alarms_per_clip=statistic(per_clip),
        false_alarms_per_hour=statistic(per_hour),
        no_fall_hours=float(no_fall_s.sum() / SECONDS_PER_HOUR),
        time_to_alert_median_s=float(np.median(delays)) if delays else None,
        time_to_alert_max_s=float(np.max(delays)) if delays else None,
        cloud_share=sum(f.offloaded for f in facts) / frames if frames else 0.0,
        edge_s=sum(f.edge_s for f in facts),
        cloud_s=sum(f.cloud_s for f in facts),
        edge_j=total_or_none([f.edge_j for f in facts]),
        cloud_j=total_or_none([f.cloud_j for f in facts]),
        frame_f1=statistic(frame_f1),
        frame_precision=whole.precision,
        frame_recall=whole.recall,
    )
