"""What a person reads of an alert, the same on every channel: one sentence, the room, the time down, a snapshot link.

The snapshot link is the dashboard's `/snapshots/<alert id>` signed with a key
derived from the dashboard's token and valid for `snapshot_link_ttl_s`: a
phone or Home Assistant can open it without the token, and only until then.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import datetime

from pydantic import BaseModel, Field

from core.settings import AlertingSettings
from schemas import AlertState, FallEvent, utc_now

STATE_WORDS: dict[AlertState, str] = {
    "open": "person down for {down}",
    "acknowledged": "acknowledged, person down for {down}",
    "resolved": "resolved, the person is up again",
    "false_alarm": "marked a false alarm",
}


class Notification(BaseModel):
    message: str = Field(
        description="one sentence, e.g. 'Room 12: person down for 40 s — confirmed by the cloud model'"
    )
    room: str
    state: AlertState
    down_for_s: float = Field(description="seconds since the first fall frame, when this was sent")
    snapshot_url: str | None = Field(description="signed, short-lived link to the snapshot (null: no dashboard)")
    drill: bool
    escalated: bool


def readable_duration(seconds: float) -> str:
    """40 s, 1 min 20 s, 2 h 5 min."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def plain_rule(rule: str) -> str:
    """The rule's name (`alerting.rules.rule_name`) as a caregiver would say it."""
    if rule.startswith("cloud"):
        return "confirmed by the cloud model"
    k_of_n = rule.split(" for ")[0].split(" of ")
    if len(k_of_n) == 2:
        return f"seen in {k_of_n[0]} of the last {k_of_n[1]} frames"
    return rule


def message_for(alert: FallEvent, down_for_s: float, escalated: bool) -> str:
    what = STATE_WORDS[alert.state].format(down=readable_duration(down_for_s))
    if escalated:
        what += ", nobody has acknowledged it"
    if alert.drill:
        return f"TEST — Room {alert.room}: fire drill, not a real alert ({what})"
    return f"Room {alert.room}: {what} — {plain_rule(alert.rule)}"


def link_signature(token: str, alert_id: str, expires: int) -> str:
    key = hmac.new(token.encode(), b"fallwatch snapshot links", hashlib.sha256).digest()
    return hmac.new(key, f"{alert_id}.{expires}".encode(), hashlib.sha256).hexdigest()


def link_is_valid(token: str, alert_id: str, expires: int, signature: str, now_s: float) -> bool:
    return now_s <= expires and hmac.compare_digest(link_signature(token, alert_id, expires), signature)


class Notifier:
    def __init__(self, alerting: AlertingSettings) -> None:
        self.alerting = alerting
        self.token = alerting.dashboard_key()

    def snapshot_url(self, alert_id: str) -> str | None:
        if not self.token:
            return None  # no dashboard to serve it
        expires = int(time.time()) + self.alerting.snapshot_link_ttl_s
        signature = link_signature(self.token, alert_id, expires)
        return f"{self.alerting.public_dashboard_url()}/snapshots/{alert_id}?expires={expires}&signature={signature}"

    def notification(self, alert: FallEvent, escalated: bool = False, now: datetime | None = None) -> Notification:
        down_for_s = round(((now or utc_now()) - alert.first_fall_at).total_seconds(), 1)
        return Notification(
            message=message_for(alert, down_for_s, escalated),
            room=alert.room,
            state=alert.state,
            down_for_s=down_for_s,
            snapshot_url=None if alert.drill else self.snapshot_url(alert.alert_id),
            drill=alert.drill,
            escalated=escalated,
        )

    def body(self, alert: FallEvent, escalated: bool = False) -> bytes:
        """The alert's fields and the notification's, as one JSON object (webhooks, MQTT)."""
        fields = {**alert.model_dump(mode="json"), **self.notification(alert, escalated).model_dump(mode="json")}
        return json.dumps(fields, ensure_ascii=False).encode()
