"""A caregiver's answer on an alert, whichever way it comes (the dashboard's buttons, an MQTT button).

An answer is a state change and, except for resolving, a label: both go to
Kafka first (`labels`, for dmd_offline, then `fall-events`, where the alerting
service learns of it), then to Redis, so every page updates at once; the
alerting service writing the same change again is a no-op. One answer at a time
per alert, on the state it was decided on (a claim in Redis): two caregivers
answering at once give one answer and one label. Errors of Redis reading the
alert reach the caller.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Literal

from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from alerting.notifications import Notifier
from alerting.store import AlertStore
from schemas import AlertState, FallEvent, Label, LabelVerdict, Topics, encode, utc_now

log = logging.getLogger(__name__)

LABEL_ID_NAMESPACE = uuid.UUID("0b7c4a52-93e1-4f6e-8f3d-5a2e61c0d7a4")

Action = Literal["acknowledge", "false-alarm", "resolve"]
# (topic, key, value), returning once the broker has it
Publish = Callable[[str, bytes, bytes], Awaitable[None]]


@dataclass(frozen=True)
class Transition:
    allowed_from: tuple[AlertState, ...]
    to: AlertState
    label: LabelVerdict | None


TRANSITIONS: dict[str, Transition] = {
    "acknowledge": Transition(("open",), "acknowledged", "true_fall"),
    "false-alarm": Transition(("open", "acknowledged"), "false_alarm", "false_alarm"),
    "resolve": Transition(("acknowledged",), "resolved", None),
}


class AnswerRefused(Exception):
    """An answer that cannot be taken; `status` is its HTTP status."""

    status = 409


class NoSuchAlert(AnswerRefused):
    status = 404


class NotPublished(AnswerRefused):
    status = 503


@dataclass(frozen=True)
class Answered:
    before: FallEvent
    alert: FallEvent
    label: Label | None


def label_id_for(alert_id: str, verdict: LabelVerdict) -> str:
    """Deterministic: the same answer on the same alert is the same label."""
    return str(uuid.uuid5(LABEL_ID_NAMESPACE, f"{alert_id}/{verdict}"))


def label_for(alert: FallEvent, verdict: LabelVerdict, by: str) -> Label:
    return Label(
        label_id=label_id_for(alert.alert_id, verdict),
        alert_id=alert.alert_id,
        camera_id=alert.camera_id,
        room=alert.room,
        frame_ids=alert.evidence_frame_ids,
        verdict=verdict,
        labelled_by=by,
    )


class Answers:
    def __init__(self, topics: Topics, store: AlertStore, notifier: Notifier, publish: Publish) -> None:
        self.topics = topics
        self.notifier = notifier
        self.store = store
        self.publish = publish

    async def answer(self, alert_id: str, action: Action, by: str) -> Answered:
        transition = TRANSITIONS[action]
        alert = await self.store.alert(alert_id)
        if alert is None:
            raise NoSuchAlert(f"no alert {alert_id}")
        if alert.state not in transition.allowed_from:
            raise AnswerRefused(f"alert {alert_id} is {alert.state}; cannot {action} it")
        changed = alert.model_copy(update={"state": transition.to, "updated_at": utc_now(), "answered_by": by})
        # a fire drill tests the delivery, never the model: its answer is no label
        label = label_for(changed, transition.label, by) if transition.label is not None and not alert.drill else None
        if not await self.store.claim_answer(alert_id, alert.state):
            # another caregiver's answer came first: two would publish two labels, one of them contradicted
            raise AnswerRefused(f"alert {alert_id} was answered by someone else meanwhile; cannot {action} it")
        try:
            await self._publish(changed, label)
        finally:
            with suppress(RedisError, OSError):  # else the claim ends with its TTL
                await self.store.answer_given(alert_id)
        log.info("alert %s %s by %s", alert_id, transition.to, by)
        return Answered(alert, changed, label)

    async def _publish(self, changed: FallEvent, label: Label | None) -> None:
        key = changed.camera_id.encode()
        try:
            # the label first: once the change is on fall-events the alert is answered, and an answer
            # repeated after a failure here would be refused, its label lost (a repeated label is deduped)
            if label is not None:
                await self.publish(self.topics.labels, key, encode(label))
            await self.publish(self.topics.fall_events, key, encode(changed))
        except KafkaError as exc:
            raise NotPublished(f"could not publish the answer: {exc}") from None
        try:
            await self.store.apply(changed, self.notifier.notification(changed))
            if label is not None:
                await self.store.save_label(label)
        except (RedisError, OSError) as exc:
            # it is on Kafka: the alerting service writes it to Redis when Redis is back
            log.error("answer on alert %s published but not stored in Redis: %s", changed.alert_id, exc)
