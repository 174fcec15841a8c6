"""The fall-confirmation rule of one camera, pure: no Kafka, no Redis, no clock.

A camera's fall is confirmed when at least k of its last n *final* verdicts
(ordered by capture time, none older than `window_s` before the newest) are
falls. A camera has at most one open alert, and no new alert opens within
`cooldown_s` of its last one. Every time is a capture time, so replaying the
same verdicts reproduces the same alerts with the same ids.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from statistics import fmean

from pydantic import BaseModel, ConfigDict, Field

from fallwatch.settings import AlertingSettings
from schemas import FallEvent, Verdict

# fixed namespace of alert ids: uuid5(namespace, camera + first confirming frame) is deterministic
ALERT_ID_NAMESPACE = uuid.UUID("6f0f3c1e-2a7b-4d52-9a51-4c1f0e7d2b90")


def alert_id_for(camera_id: str, first_frame_id: str) -> str:
    return str(uuid.uuid5(ALERT_ID_NAMESPACE, f"{camera_id}/{first_frame_id}"))


def rule_name(rule: AlertingSettings) -> str:
    return f"{rule.k} of {rule.n}"


class WindowEntry(BaseModel):
    """What the window keeps of one final verdict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    frame_id: str
    captured_at: datetime
    fall: bool
    fall_probability: float


class CameraState(BaseModel):
    """Everything alerting remembers about one camera; `model_dump(mode="json")` is what the table stores.

    `rule` is configuration, not state: it is excluded from the dump and passed
    again on restore (`CameraState(rule=rule, **stored)`).
    """

    rule: AlertingSettings = Field(exclude=True)
    camera_id: str
    window: list[WindowEntry] = Field(default_factory=list, description="oldest first, at most n")
    seen_frames: dict[str, datetime] = Field(
        default_factory=dict, description="final frames still inside the window of time (dedupe)"
    )
    newest_at: datetime | None = None
    open_alert_id: str | None = None
    last_alert_at: datetime | None = None

    def observe(self, verdict: Verdict) -> FallEvent | None:
        """Take one verdict of this camera; returns the alert it opens, if any."""
        if not verdict.final:
            return None  # the edge's provisional answer; the final one for this frame follows
        if self.newest_at is not None and verdict.captured_at < self.newest_at - self._window_span:
            return None  # too late to count (and a redelivery this old is no longer in `seen_frames`)
        if verdict.frame_id in self.seen_frames:
            return None  # at-least-once delivery: the same verdict again
        self._remember(verdict)
        if self.open_alert_id is not None or self._cooling_down():
            return None
        falls = [entry for entry in self.window if entry.fall]
        if len(falls) < self.rule.k:
            return None
        return self._open_alert(verdict, falls)

    def close_alert(self, alert_id: str) -> None:
        """The open alert was acknowledged, resolved or dismissed; the cooldown still applies."""
        if self.open_alert_id == alert_id:
            self.open_alert_id = None

    @property
    def _window_span(self) -> timedelta:
        return timedelta(seconds=self.rule.window_s)

    def _remember(self, verdict: Verdict) -> None:
        if self.newest_at is None or verdict.captured_at > self.newest_at:
            self.newest_at = verdict.captured_at
        horizon = self.newest_at - self._window_span
        self.seen_frames[verdict.frame_id] = verdict.captured_at
        self.seen_frames = {frame: at for frame, at in self.seen_frames.items() if at >= horizon}
        entry = WindowEntry(
            frame_id=verdict.frame_id,
            captured_at=verdict.captured_at,
            fall=verdict.decision,
            fall_probability=verdict.fall_probability,
        )
        # cloud verdicts arrive late, so keep the window sorted by capture time, not arrival
        entries = sorted([*self.window, entry], key=lambda e: e.captured_at)
        self.window = [e for e in entries if e.captured_at >= horizon][-self.rule.n :]

    def _cooling_down(self) -> bool:
        if self.last_alert_at is None or self.newest_at is None:
            return False
        return self.newest_at - self.last_alert_at < timedelta(seconds=self.rule.cooldown_s)

    def _open_alert(self, verdict: Verdict, falls: list[WindowEntry]) -> FallEvent:
        assert self.newest_at is not None
        first = falls[0]
        alert = FallEvent(
            alert_id=alert_id_for(self.camera_id, first.frame_id),
            camera_id=self.camera_id,
            room=verdict.room,
            state="open",
            # the capture time at which the rule fired, so a replay reproduces the alert exactly;
            # `updated_at` says when this message was made
            opened_at=self.newest_at,
            first_fall_at=first.captured_at,
            confidence=fmean(entry.fall_probability for entry in falls),
            evidence_frame_ids=[entry.frame_id for entry in falls],
            rule=rule_name(self.rule),
        )
        self.open_alert_id = alert.alert_id
        self.last_alert_at = self.newest_at
        # the evidence is used up: a later alert needs k new falls
        self.window = []
        return alert
