"""The webhook channel: signed POSTs (`alerting.webhooks`) through an outbox in Redis.

Each (receiver, event, alert) goes into the outbox and is sent at once from
there; a failed try is rescheduled with backoff, so a delivery survives the
worker's death (another worker takes a claimed delivery over when its lease
ends). Passes over the outbox run side by side (each claims what is due, so
none sends what another holds): a slow receiver never holds up the next alert's
delivery to the others. An alert Redis knows to be answered already is not notified (a replay of
`fall-events`). Without Redis, every attempt is made right here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any

from redis.exceptions import RedisError

from alerting.channels.base import Channel
from alerting.metrics import AlertingMetrics
from alerting.notifications import Notifier
from alerting.store import AlertStore
from alerting.webhooks import WebhookSender
from core.settings import Settings
from schemas import FallEvent

log = logging.getLogger(__name__)

OPENED_EVENT = "alert.opened"
ESCALATED_EVENT = "alert.escalated"
# A claimed delivery is another worker's to take over after this long (a POST lasts webhook_timeout_s at most).
OUTBOX_LEASE_MARGIN_S = 10.0
OUTBOX_BATCH = 50


def delivery_member(event_name: str, alert_id: str, url: str) -> str:
    """The outbox's id of one delivery: the same alert, event and receiver is the same delivery."""
    return f"{event_name}:{alert_id}:{hashlib.sha256(url.encode()).hexdigest()[:16]}"


class WebhookChannel(Channel):
    name = "webhook"

    def __init__(self, settings: Settings, store: AlertStore, metrics: AlertingMetrics, notifier: Notifier) -> None:
        super().__init__()
        self.notifier = notifier
        self.rule = settings.alerting
        self.store = store
        self.metrics = metrics
        self.sender = WebhookSender(settings.alerting)
        self.topic = settings.kafka.topics.fall_events
        # Deliveries this worker put into the outbox or took from it, until done: put back if Redis loses them.
        self._unfinished: dict[str, bytes] = {}
        self.worker_id = uuid.uuid4().hex

    async def alert_changed(self, alert: FallEvent) -> None:
        if alert.state == "open" and await self._nobody_answered(alert):
            await self._notify(self.rule.webhook_urls, OPENED_EVENT, alert, self.notifier.body(alert))

    async def escalated(self, alert: FallEvent) -> None:
        body = self.notifier.body(alert, escalated=True)
        await self._notify(self.rule.escalation_webhook_urls, ESCALATED_EVENT, alert, body)

    async def tick(self) -> None:
        self.spawn(self.outbox_pass())

    async def outbox_pass(self) -> None:
        """Keep this worker's unfinished deliveries in the outbox, then send what is due."""
        await self.keep_unfinished()
        await self.deliver_due()

    async def keep_unfinished(self) -> None:
        """Every worker puts back its own deliveries once Redis lost the outbox (restarted empty): whichever
        worker rebuilds the alert state, none of them knows the others' retries. Deliveries another worker
        finished are forgotten here, so they are never put back."""
        unfinished = dict(self._unfinished)
        try:
            restored, gone = await self.store.keep_outbox(self.topic, self.worker_id, unfinished, time.time())
        except (RedisError, OSError):
            return  # checked again on the next tick
        for member in gone:
            if self._unfinished.get(member) is unfinished[member]:  # not queued again meanwhile
                del self._unfinished[member]
        if restored:
            log.warning("the webhook outbox had lost %d of this worker's unfinished deliveries: queued again", restored)

    async def close(self) -> None:
        await super().close()
        await self.sender.close()

    async def _nobody_answered(self, alert: FallEvent) -> bool:
        """False when Redis knows a caregiver answered: a replay of `fall-events` (a new consumer group reads it
        from the start) must not page anyone about old alerts. Without Redis: notify."""
        try:
            stored = await self.store.alert(alert.alert_id)
        except (RedisError, OSError):
            return True
        return stored is None or stored.state == "open"

    async def _notify(self, urls: list[str], event_name: str, alert: FallEvent, body: bytes) -> None:
        """Into the outbox, then one outbox pass at once; without Redis, every attempt right here."""
        if not urls:
            return
        try:
            for url in urls:
                entry = {
                    "url": url,
                    "event": event_name,
                    "alert_id": alert.alert_id,
                    "body": body.decode(),
                    "attempt": 0,
                }
                member = delivery_member(event_name, alert.alert_id, url)
                payload = json.dumps(entry).encode()
                if await self.store.enqueue_delivery(self.topic, member, payload, time.time()):
                    self._unfinished[member] = payload
        except (RedisError, OSError) as exc:
            self.metrics.redis_failures.inc()
            log.error("webhook outbox unavailable (%s): %s of alert %s sent directly", exc, event_name, alert.alert_id)
            results = await asyncio.gather(
                *(self.sender.deliver(url, event_name, alert.alert_id, body) for url in urls)
            )
            for accepted in results:
                self._count(event_name, accepted)
            return
        self.spawn(self.deliver_due())

    def _count(self, event_name: str, accepted: bool) -> None:
        counter = self.metrics.webhook_deliveries if accepted else self.metrics.webhook_failures
        counter.labels(event=event_name).inc()

    async def deliver_due(self) -> None:
        """One pass over the outbox: every due delivery is tried once, then done, or rescheduled with backoff."""
        lease_s = self.rule.webhook_timeout_s + OUTBOX_LEASE_MARGIN_S
        token = uuid.uuid4().hex
        try:
            claimed = await self.store.claim_deliveries(self.topic, time.time(), lease_s, OUTBOX_BATCH, token)
        except (RedisError, OSError):
            return  # the outbox waits in Redis; the next pass after Redis is back sends it
        self._unfinished.update(claimed)
        await asyncio.gather(*(self._deliver_one(member, payload, token) for member, payload in claimed))

    async def _deliver_one(self, member: str, payload: bytes, token: str) -> None:
        try:
            entry = json.loads(payload)
            event_name, url, alert_id, body = entry["event"], entry["url"], entry["alert_id"], entry["body"].encode()
            attempt = int(entry["attempt"]) + 1
        except (ValueError, KeyError, AttributeError, TypeError) as exc:  # not ours to send: another version's
            self._unfinished.pop(member, None)
            log.error("webhook outbox entry %s unreadable, dropped: %r", member, exc)
            await self._redis_quietly(self.store.delivery_done(self.topic, member, token, delivered=False), member)
            return
        result = await self.sender.attempt(url, event_name, alert_id, body)
        if result.final or attempt >= self.rule.webhook_attempts:
            if not result.final:
                self.sender.say_gave_up(url, event_name, alert_id, result.problem)
            self._count(event_name, result.accepted)
            self._unfinished.pop(member, None)
            await self._redis_quietly(
                self.store.delivery_done(self.topic, member, token, delivered=result.accepted), member
            )
            return
        self.sender.say_retry(url, event_name, alert_id, attempt, result.problem)
        due = time.time() + self.sender.retry_delay_s(attempt)
        entry["attempt"] = attempt
        # kept until the outbox says another worker finished it: put back from here should Redis lose it
        self._unfinished[member] = json.dumps(entry).encode()
        await self._redis_quietly(
            self.store.retry_delivery(self.topic, member, token, self._unfinished[member], due), member
        )

    async def _redis_quietly(self, call: Coroutine[Any, Any, bool], member: str) -> None:
        """An outbox update; if Redis fails now the lease runs out and the delivery is tried again. Refused: this
        try outlived its lease and a later claim finished the delivery or holds it (left to that claim)."""
        try:
            applied = await call
        except (RedisError, OSError) as exc:
            self.metrics.redis_failures.inc()
            log.error("webhook outbox not updated (%s); the delivery is retried after its lease", exc)
            return
        if not applied:
            self.metrics.webhook_leases_lost.inc()
            log.warning(
                "webhook delivery %s: this try outlived its lease; left to the worker that took it over", member
            )
