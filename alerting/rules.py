"""The alert rule of one camera, pure: no Kafka, no Redis, no clock of its own.

A camera's fall is confirmed when at least k of its last n *final* verdicts
(ordered by capture time, none older than `window_s` before the newest) are
falls, or at once by a final cloud verdict with P(fall) ≥
`cloud_confirm_probability`. The edge's provisional verdict of an offloaded
frame waits at most `cloud_wait_s` for the final one; then the edge's answer is
used as an `edge-fallback` final verdict (`due_fallbacks`).

Lifecycle: `open` → `acknowledged` → `resolved`, or `false_alarm`. A camera has
at most one alert that is not closed; an acknowledged alert resolves once no
fall was seen for `resolve_after_s` (a person still lying keeps it open); no
new alert opens within `cooldown_s` of the last one closing; an alert nobody
acknowledged within `escalate_after_s` is due for escalation.

Rule times are capture times, so replaying the same verdicts reproduces the
same alerts with the same ids; only the two deadlines (cloud wait and
escalation) are wall-clock times, passed in as `now`.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from statistics import fmean

from pydantic import BaseModel, ConfigDict, Field

from fallwatch.settings import AlertRule
from schemas import FallEvent, Verdict, VerdictSource

# fixed namespace of alert ids: uuid5(namespace, camera + first confirming frame) is deterministic
ALERT_ID_NAMESPACE = uuid.UUID("6f0f3c1e-2a7b-4d52-9a51-4c1f0e7d2b90")


def alert_id_for(camera_id: str, first_frame_id: str) -> str:
    return str(uuid.uuid5(ALERT_ID_NAMESPACE, f"{camera_id}/{first_frame_id}"))


def rule_name(rule: AlertRule) -> str:
    return f"{rule.k} of {rule.n}"


def cloud_rule_name(rule: AlertRule) -> str:
    return f"cloud p>={rule.cloud_confirm_probability:.2f} + a fall within {rule.confirm_within_s:g} s"


class WindowEntry(BaseModel):
    """What the window keeps of one final verdict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    frame_id: str
    captured_at: datetime
    fall: bool
    fall_probability: float
    source: VerdictSource


class PendingFrame(BaseModel):
    """An offloaded frame's provisional edge verdict, waiting for its final verdict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    verdict: Verdict
    fallback_at: datetime = Field(description="wall clock: use the edge's answer if nothing final came by then")


class CameraState(BaseModel):
    """Everything alerting remembers about one camera; `model_dump(mode="json")` is what the table stores.

    `rule` is configuration, not state: it is excluded from the dump and passed
    again on restore (`CameraState(rule=rule, **stored)`).
    """

    rule: AlertRule = Field(exclude=True)
    camera_id: str
    room: str = Field(description="the camera's room, which picks its rule")
    partition: int | None = Field(None, description="the `verdicts` partition of this camera")
    window: list[WindowEntry] = Field(default_factory=list, description="oldest first, at most n")
    seen_frames: dict[str, datetime] = Field(
        default_factory=dict, description="final frames still inside the window of time (dedupe)"
    )
    pending: dict[str, PendingFrame] = Field(default_factory=dict, description="offloaded frames, by frame id")
    newest_at: datetime | None = None
    last_fall_at: datetime | None = None
    open_alert: FallEvent | None = Field(None, description="the camera's alert that is not closed yet")
    opened_wall_at: datetime | None = Field(None, description="wall clock when it opened (escalation deadline)")
    last_closed_at: datetime | None = Field(None, description="capture time of the newest verdict at closing")

    @property
    def open_alert_id(self) -> str | None:
        return self.open_alert.alert_id if self.open_alert is not None else None

    def observe(self, verdict: Verdict, now: datetime) -> FallEvent | None:
        """Take one verdict of this camera; returns the alert event it causes (opened or resolved), if any."""
        if self.newest_at is not None and verdict.captured_at < self.newest_at - self._window_span:
            return None  # too late to count (and a redelivery this old is no longer in `seen_frames`)
        if verdict.frame_id in self.seen_frames:
            return None  # at-least-once delivery: a final verdict for this frame was counted already
        if not verdict.final:
            # the edge's provisional answer; a redelivery keeps the first deadline
            self.pending.setdefault(
                verdict.frame_id,
                PendingFrame(verdict=verdict, fallback_at=now + timedelta(seconds=self.rule.cloud_wait_s)),
            )
            return None
        self.pending.pop(verdict.frame_id, None)
        self._remember(verdict)
        if self.open_alert is not None:
            return self._resolve_if_up(verdict, now)
        if self._cooling_down():
            return None
        falls = [entry for entry in self.window if entry.fall]
        if (
            verdict.source == "cloud"
            and verdict.decision
            and verdict.fall_probability >= self.rule.cloud_confirm_probability
        ):
            # one frame, however sure, is not enough: a second fall verdict close to it confirms it
            within = timedelta(seconds=self.rule.confirm_within_s)
            pair = [entry for entry in falls if abs(entry.captured_at - verdict.captured_at) <= within]
            if len(pair) >= 2:
                return self._open_alert(verdict, pair, cloud_rule_name(self.rule), now)
        if len(falls) >= self.rule.k:
            return self._open_alert(verdict, falls, rule_name(self.rule), now)
        return None

    def apply(self, event: FallEvent) -> None:
        """A state change of this camera's alert from `fall-events` (a caregiver's answer, or our own)."""
        if self.open_alert is None or event.alert_id != self.open_alert.alert_id or event.state == "open":
            return
        if event.state == "acknowledged":
            self.open_alert = self.open_alert.model_copy(update={"state": "acknowledged"})
        else:
            self._close()

    def due_fallbacks(self, now: datetime) -> list[Verdict]:
        """`edge-fallback` final verdicts for the offloaded frames whose cloud verdict is overdue."""
        return [
            pending.verdict.model_copy(update={"source": "edge-fallback", "final": True, "produced_at": now})
            for pending in self.pending.values()
            if pending.fallback_at <= now
        ]

    def escalation_due(self, now: datetime) -> FallEvent | None:
        """The open alert, when nobody acknowledged it within `escalate_after_s`."""
        if self.open_alert is None or self.open_alert.state != "open" or self.opened_wall_at is None:
            return None
        if now - self.opened_wall_at < timedelta(seconds=self.rule.escalate_after_s):
            return None
        return self.open_alert

    @property
    def _window_span(self) -> timedelta:
        return timedelta(seconds=self.rule.window_s)

    def _remember(self, verdict: Verdict) -> None:
        if self.newest_at is None or verdict.captured_at > self.newest_at:
            self.newest_at = verdict.captured_at
        if verdict.decision and (self.last_fall_at is None or verdict.captured_at > self.last_fall_at):
            self.last_fall_at = verdict.captured_at
        horizon = self.newest_at - self._window_span
        self.seen_frames[verdict.frame_id] = verdict.captured_at
        self.seen_frames = {frame: at for frame, at in self.seen_frames.items() if at >= horizon}
        self.pending = {frame: p for frame, p in self.pending.items() if p.verdict.captured_at >= horizon}
        entry = WindowEntry(
            frame_id=verdict.frame_id,
            captured_at=verdict.captured_at,
            fall=verdict.decision,
            fall_probability=verdict.fall_probability,
            source=verdict.source,
        )
        # cloud verdicts arrive late, so keep the window sorted by capture time, not arrival
        entries = sorted([*self.window, entry], key=lambda e: e.captured_at)
        self.window = [e for e in entries if e.captured_at >= horizon][-self.rule.n :]

    def _cooling_down(self) -> bool:
        if self.last_closed_at is None or self.newest_at is None:
            return False
        return self.newest_at - self.last_closed_at < timedelta(seconds=self.rule.cooldown_s)

    def _resolve_if_up(self, verdict: Verdict, now: datetime) -> FallEvent | None:
        """An acknowledged alert resolves once the camera saw no fall for `resolve_after_s`."""
        assert self.open_alert is not None and self.newest_at is not None
        if self.open_alert.state != "acknowledged" or verdict.decision or self.last_fall_at is None:
            return None
        if self.newest_at - self.last_fall_at < timedelta(seconds=self.rule.resolve_after_s):
            return None
        resolved = self.open_alert.model_copy(update={"state": "resolved", "updated_at": now})
        self._close()
        return resolved

    def _close(self) -> None:
        self.open_alert = None
        self.opened_wall_at = None
        self.last_closed_at = self.newest_at

    def _open_alert(self, verdict: Verdict, falls: list[WindowEntry], rule: str, now: datetime) -> FallEvent:
        assert self.newest_at is not None and falls
        first = falls[0]
        if any(entry.source == "edge-fallback" for entry in falls):
            rule += " (edge-fallback)"  # the cloud never answered for part of the evidence
        alert = FallEvent(
            alert_id=alert_id_for(self.camera_id, first.frame_id),
            camera_id=self.camera_id,
            room=verdict.room,
            state="open",
            # the capture time at which the rule fired, so a replay reproduces the alert exactly;
            # `updated_at` says when this message was made
            opened_at=self.newest_at,
            updated_at=now,
            first_fall_at=first.captured_at,
            confidence=fmean(entry.fall_probability for entry in falls),
            evidence_frame_ids=[entry.frame_id for entry in falls],
            rule=rule,
        )
        self.open_alert = alert
        self.opened_wall_at = now
        # the evidence is used up: a later alert needs k new falls
        self.window = []
        return alert
