"""The alert rule of one camera, pure: no Kafka, no Redis, no clock of its own.

Final verdicts are taken in capture order. The edge publishes a camera's verdicts in capture order
(final, or provisional for an offloaded frame); a final verdict captured after a frame still waiting
for its cloud verdict is held until that frame is decided, by the cloud or, after `cloud_wait_s`, by
the edge's answer (`due_fallbacks`: an `edge-fallback` final verdict). So the rule sees the same
sequence live and in a replay, whatever the cloud's latency; the latency only delays it.

**Person down.** A camera's person is *down* when
- k of its last n final verdicts (none captured more than `window_s` before the newest) are falls,
  and the falls have lasted `down_for_s` (from the first fall verdict of the episode to the newest:
  a person bending over is up again sooner than one who fell), or
- a final cloud fall verdict with P(fall) ≥ `cloud_confirm_probability` and another fall verdict
  lie within `confirm_within_s` of each other (one frame, however sure, is never enough).
An episode starts at a fall verdict. Until the person counts as down, two non-fall verdicts in a
row end it (one wrong frame does not); once down, the person is *up* again after n − k + 1 non-fall
verdicts in a row (then k of n cannot hold) spanning at least `up_after_s`. A single wrong verdict
never flips the state either way. Each change is a `PersonDown`
record (topic `person-down`).

**No-alert zones.** A final fall verdict whose person the edge located inside one of the camera's
`alerts: false` zones (a bed) is taken as no fall: lying there is not a fall, and the person is not
down. A fall verdict whose person was not located (no zones, BlazePose found nobody) counts: missing a
fall costs more than a false alarm.

**Alerts.** A down episode opens one alert (at the verdict that confirmed it, or once a cooldown
ends while the person is still down); a camera has at most one alert that is not closed. Lifecycle:
`open` → `acknowledged` → `resolved`, or `false_alarm`. An acknowledged alert resolves once no fall
was seen for `resolve_after_s` (a person still lying keeps it open), or at once when the person, seen
up since, is down again: that new episode opens a new alert (a caregiver who answered the first fall
may have left). An episode that starts while an alert still waits for its answer is covered by it. No
new alert opens within `cooldown_s` of the last one closing; an alert nobody acknowledged within
`escalate_after_s` is due for escalation.

Rule times are capture times, so replaying the same verdicts reproduces the same alerts with the
same ids; only the two deadlines (cloud wait and escalation) are wall-clock times, passed in as `now`.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from statistics import fmean

from pydantic import BaseModel, ConfigDict, Field

from core.settings import AlertRule
from schemas import FallEvent, PersonDown, Verdict, VerdictSource

# fixed namespace of alert ids: uuid5(namespace, camera + first fall frame of the episode) is deterministic
ALERT_ID_NAMESPACE = uuid.UUID("6f0f3c1e-2a7b-4d52-9a51-4c1f0e7d2b90")

RuleOutput = FallEvent | PersonDown
# A sampled frame's capture time is off by up to one source frame (33 ms at 30 fps): "lasted D seconds"
# allows that much, or falls sampled every 0.5 s from 2.016 s to 4.016 s would not have lasted 2 s.
CAPTURE_JITTER = timedelta(milliseconds=50)
# Before the person counts as down, this many non-falls in a row end the stretch of falls (one wrong frame
# does not); once down, n - k + 1 of them spanning up_after_s are needed: easy to drop a doubt, hard to
# drop a person down.
STRETCH_BREAK_FRAMES = 2


def alert_id_for(camera_id: str, first_frame_id: str) -> str:
    return str(uuid.uuid5(ALERT_ID_NAMESPACE, f"{camera_id}/{first_frame_id}"))


def rule_name(rule: AlertRule) -> str:
    return f"{rule.k} of {rule.n}" + (f" for {rule.down_for_s:g} s" if rule.down_for_s > 0 else "")


def cloud_rule_name(rule: AlertRule) -> str:
    return f"cloud p>={rule.cloud_confirm_probability:.2f} + a fall within {rule.confirm_within_s:g} s"


class WindowEntry(BaseModel):
    """What the rule keeps of one final verdict."""

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


class DownEpisode(BaseModel):
    """From the first fall verdict of a stretch until the person is seen up again."""

    model_config = ConfigDict(extra="forbid")

    first: WindowEntry = Field(description="the first fall verdict of the episode")
    latest: WindowEntry = Field(description="its newest fall verdict")
    down_since: datetime | None = Field(None, description="capture time at which the person counted as down")
    rule: str = ""
    evidence: list[WindowEntry] = Field(default_factory=list, description="the falls that made the person down")
    alerted: bool = Field(
        False, description="caregivers were alerted to it: it opened its alert, or an unanswered one covered it"
    )
    non_falls: list[WindowEntry] = Field(default_factory=list, description="the non-fall verdicts in a row since")

    @property
    def episode_id(self) -> str:
        return self.first.frame_id

    @property
    def down(self) -> bool:
        return self.down_since is not None


class CameraState(BaseModel):
    """Everything alerting remembers about one camera; `model_dump(mode="json")` is what the table stores.

    `rule` is configuration, not state: it is excluded from the dump and passed
    again on restore (`CameraState(rule=rule, **stored)`).
    """

    rule: AlertRule = Field(exclude=True)
    camera_id: str
    room: str = Field(description="the camera's room, which picks its rule")
    partition: int | None = Field(None, description="the `verdicts` partition of this camera")
    window: list[WindowEntry] = Field(default_factory=list, description="the last n final verdicts taken, oldest first")
    held: list[WindowEntry] = Field(
        default_factory=list, description="final verdicts captured after a pending frame, waiting for it"
    )
    seen_frames: dict[str, datetime] = Field(
        default_factory=dict, description="final frames still inside the window of time (dedupe)"
    )
    pending: dict[str, PendingFrame] = Field(default_factory=dict, description="offloaded frames, by frame id")
    newest_at: datetime | None = Field(None, description="capture time of the newest verdict received")
    taken_at: datetime | None = Field(None, description="capture time of the newest final verdict taken in order")
    last_fall_at: datetime | None = None
    episode: DownEpisode | None = Field(None, description="the stretch of falls now, if any")
    open_alert: FallEvent | None = Field(None, description="the camera's alert that is not closed yet")
    opened_wall_at: datetime | None = Field(None, description="wall clock when it opened (escalation deadline)")
    last_closed_at: datetime | None = Field(None, description="capture time of the newest verdict at closing")

    @property
    def open_alert_id(self) -> str | None:
        return self.open_alert.alert_id if self.open_alert is not None else None

    @property
    def person_down(self) -> bool:
        return self.episode is not None and self.episode.down

    def observe(self, verdict: Verdict, now: datetime) -> list[RuleOutput]:
        """Take one verdict of this camera; returns the alert events and person-down changes it causes."""
        if verdict.captured_at > now + self._window_span:
            return []  # from a clock gone wrong: counted, it would move the window past every real verdict
        if self.newest_at is not None and verdict.captured_at < self.newest_at - self._window_span:
            return []  # too late to count (and a redelivery this old is no longer in `seen_frames`)
        if verdict.frame_id in self.seen_frames:
            return []  # at-least-once delivery: a final verdict for this frame was counted already
        if self.newest_at is None or verdict.captured_at > self.newest_at:
            self.newest_at = verdict.captured_at
        self._forget_old()
        if not verdict.final:
            # the edge's provisional answer; a redelivery keeps the first deadline
            self.pending.setdefault(
                verdict.frame_id,
                PendingFrame(verdict=verdict, fallback_at=now + timedelta(seconds=self.rule.cloud_wait_s)),
            )
            return []
        in_zone = self.in_no_alert_zone(verdict)
        self.pending.pop(verdict.frame_id, None)
        self.seen_frames[verdict.frame_id] = verdict.captured_at
        entry = WindowEntry(
            frame_id=verdict.frame_id,
            captured_at=verdict.captured_at,
            fall=verdict.decision and not in_zone,
            fall_probability=verdict.fall_probability,
            source=verdict.source,
        )
        self.held = sorted([*self.held, entry], key=lambda e: e.captured_at)
        return self._take_in_order(verdict.room, now)

    def in_no_alert_zone(self, verdict: Verdict) -> bool:
        """The edge located this frame's person inside an `alerts: false` zone (a cloud verdict takes the
        place from the frame's provisional edge verdict). Unknown place: False, the fall counts."""
        pending = self.pending.get(verdict.frame_id)
        return verdict.in_no_alert_zone or (pending is not None and pending.verdict.in_no_alert_zone)

    def suppresses(self, verdict: Verdict) -> bool:
        """A final fall verdict, not counted yet, that counts as no fall: the person lies in a no-alert zone."""
        new = verdict.final and verdict.frame_id not in self.seen_frames
        return new and verdict.decision and self.in_no_alert_zone(verdict)

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

    def _forget_old(self) -> None:
        assert self.newest_at is not None
        horizon = self.newest_at - self._window_span
        self.seen_frames = {frame: at for frame, at in self.seen_frames.items() if at >= horizon}
        # a frame pending for longer than the window is given up on: it no longer holds the others back
        self.pending = {frame: p for frame, p in self.pending.items() if p.verdict.captured_at >= horizon}

    def _take_in_order(self, room: str, now: datetime) -> list[RuleOutput]:
        """Take the held final verdicts captured before every frame still pending, oldest first."""
        oldest_pending = min((p.verdict.captured_at for p in self.pending.values()), default=None)
        outputs: list[RuleOutput] = []
        while self.held and (oldest_pending is None or self.held[0].captured_at < oldest_pending):
            outputs += self._take(self.held.pop(0), room, now)
        return outputs

    def _take(self, entry: WindowEntry, room: str, now: datetime) -> list[RuleOutput]:
        """One final verdict, in capture order: the window, the person-down state, the alert."""
        # Only a final verdict that had no provisional one before it can come out of order (the edge sends
        # a camera's verdicts in capture order): it counts where its capture time puts it.
        self.taken_at = max(self.taken_at or entry.captured_at, entry.captured_at)
        if entry.fall and (self.last_fall_at is None or entry.captured_at > self.last_fall_at):
            self.last_fall_at = entry.captured_at
        horizon = self.taken_at - self._window_span
        entries = sorted([*self.window, entry], key=lambda e: e.captured_at)
        self.window = [e for e in entries if e.captured_at >= horizon][-self.rule.n :]
        outputs: list[RuleOutput] = []
        change = self._person_down_change(entry, room, now)
        if change is not None:
            outputs.append(change)
        episode = self.episode
        new_episode_down = episode is not None and episode.down and not episode.alerted
        if self.open_alert is not None and new_episode_down and self.open_alert.state == "open":
            assert episode is not None
            episode.alerted = True  # the alert still waiting for an answer covers this fall too
        elif self.open_alert is not None and new_episode_down:
            # A caregiver acknowledged an earlier fall, the person was seen up since, and is down again: a
            # new fall, alerted at once (no cooldown), or it would hide behind the acknowledged alert.
            outputs.append(self._resolve(now))
            outputs.append(self._open_alert(entry, room, now))
        elif self.open_alert is not None:
            resolved = self._resolve_if_up(entry, now)
            if resolved is not None:
                outputs.append(resolved)
        elif new_episode_down and not self._cooling_down():
            outputs.append(self._open_alert(entry, room, now))
        return outputs

    def _person_down_change(self, entry: WindowEntry, room: str, now: datetime) -> PersonDown | None:
        episode = self.episode
        if entry.fall:
            stale = episode is not None and entry.captured_at - episode.latest.captured_at > self._window_span
            if episode is None or (stale and not episode.down):
                episode = self.episode = DownEpisode(first=entry, latest=entry)
            elif entry.captured_at < episode.first.captured_at:
                episode.first = entry
            episode.latest = max(episode.latest, entry, key=lambda e: e.captured_at)
            episode.non_falls = []
            if episode.down:
                return None
            confirmed = self._confirmation(entry, episode)
            if confirmed is None:
                return None
            episode.rule, episode.evidence = confirmed
            episode.down_since = entry.captured_at
            return self._person_down_record(episode, room, now, down=True, changed_at=entry.captured_at)
        if episode is None:
            return None
        episode.non_falls.append(entry)
        in_a_row = episode.non_falls
        up_frames = self.rule.n - self.rule.k + 1
        if not episode.down:
            if len(in_a_row) >= min(STRETCH_BREAK_FRAMES, up_frames):
                self.episode = None  # the falls did not last: a bend, a sit, a wrong frame
            return None
        if len(in_a_row) < up_frames:
            return None
        if entry.captured_at - in_a_row[0].captured_at + CAPTURE_JITTER < timedelta(seconds=self.rule.up_after_s):
            return None
        self.episode = None
        return self._person_down_record(episode, room, now, down=False, changed_at=entry.captured_at)

    def _confirmation(self, entry: WindowEntry, episode: DownEpisode) -> tuple[str, list[WindowEntry]] | None:
        """Which rule makes the person down at this fall verdict, and its evidence (None: not yet)."""
        rule = self.rule
        falls = [e for e in self.window if e.fall and e.captured_at >= episode.first.captured_at]
        lasted = entry.captured_at - episode.first.captured_at + CAPTURE_JITTER
        if len(falls) >= rule.k and lasted >= timedelta(seconds=rule.down_for_s):
            return rule_name(rule), falls
        if rule.confirm_within_s > 0:
            within = timedelta(seconds=rule.confirm_within_s)
            pair = [e for e in falls if entry.captured_at - e.captured_at <= within]
            sure = any(e.source == "cloud" and e.fall_probability >= rule.cloud_confirm_probability for e in pair)
            if len(pair) >= 2 and sure:
                return cloud_rule_name(rule), pair
        return None

    def _person_down_record(
        self, episode: DownEpisode, room: str, now: datetime, down: bool, changed_at: datetime
    ) -> PersonDown:
        return PersonDown(
            camera_id=self.camera_id,
            room=room,
            down=down,
            since=episode.first.captured_at if down else episode.non_falls[0].captured_at,
            changed_at=changed_at,
            episode_id=alert_id_for(self.camera_id, episode.episode_id),
            rule=episode.rule,
            confidence=fmean(e.fall_probability for e in episode.evidence),
            evidence_frame_ids=[e.frame_id for e in episode.evidence],
            updated_at=now,
        )

    def _cooling_down(self) -> bool:
        if self.last_closed_at is None or self.taken_at is None:
            return False
        return self.taken_at - self.last_closed_at < timedelta(seconds=self.rule.cooldown_s)

    def _resolve_if_up(self, entry: WindowEntry, now: datetime) -> FallEvent | None:
        """An acknowledged alert resolves once the camera saw no fall for `resolve_after_s`."""
        assert self.open_alert is not None and self.taken_at is not None
        if self.open_alert.state != "acknowledged" or entry.fall or self.last_fall_at is None:
            return None
        if self.taken_at - self.last_fall_at < timedelta(seconds=self.rule.resolve_after_s):
            return None
        return self._resolve(now)

    def _resolve(self, now: datetime) -> FallEvent:
        assert self.open_alert is not None
        resolved = self.open_alert.model_copy(update={"state": "resolved", "updated_at": now})
        self._close()
        return resolved

    def _close(self) -> None:
        self.open_alert = None
        self.opened_wall_at = None
        self.last_closed_at = self.taken_at

    def _open_alert(self, entry: WindowEntry, room: str, now: datetime) -> FallEvent:
        episode = self.episode
        assert episode is not None and episode.evidence
        rule = episode.rule
        if any(e.source == "edge-fallback" for e in episode.evidence):
            rule += " (edge-fallback)"  # the cloud never answered for part of the evidence
        alert = FallEvent(
            alert_id=alert_id_for(self.camera_id, episode.episode_id),
            camera_id=self.camera_id,
            room=room,
            state="open",
            # the capture time of the verdict at which the rule fired, so a replay reproduces the alert
            # exactly; `updated_at` says when this message was made
            opened_at=entry.captured_at,
            updated_at=now,
            first_fall_at=episode.first.captured_at,
            confidence=fmean(e.fall_probability for e in episode.evidence),
            evidence_frame_ids=[e.frame_id for e in episode.evidence],
            rule=rule,
        )
        episode.alerted = True
        self.open_alert = alert
        self.opened_wall_at = now
        return alert
