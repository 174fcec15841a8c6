"""Delivery of alerts to caregivers: Redis (state, stream, snapshot), signed webhooks, escalation.

`store_first` writes a new alert to Redis once, before it is published, so a
reader of `fall-events` finds it in Redis (unless Redis is down). `handle` runs
for every record of `fall-events`. Webhooks of a new alert go out first and do
not wait for Redis: a Redis outage must not delay the caregivers' notification
(a redelivered alert repeats its idempotency key, the alert id); only an alert
Redis knows to be answered already is not notified again. Then the state
is written to Redis, retried until Redis answers, so an alert made during an
outage reaches Redis when it returns (faust commits the record only after
`handle` returned); a state Redis has already is not written twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from redis.exceptions import RedisError

from alerting.metrics import AlertingMetrics
from alerting.snapshots import find_frame_jpeg
from alerting.store import AlertStore
from alerting.webhooks import WebhookSender
from core.settings import Settings
from schemas import FallEvent

log = logging.getLogger(__name__)

OPENED_EVENT = "alert.opened"
ESCALATED_EVENT = "alert.escalated"
REDIS_RETRY_MAX_S = 5.0


class Delivery:
    def __init__(self, settings: Settings, store: AlertStore, metrics: AlertingMetrics) -> None:
        self.settings = settings
        self.rule = settings.alerting
        self.store = store
        self.metrics = metrics
        self.webhooks = WebhookSender(settings.alerting)
        self._tasks: set[asyncio.Task[None]] = set()

    async def store_first(self, event: FallEvent) -> None:
        """One try; on failure `handle` retries it when the record comes back from `fall-events`."""
        try:
            await self.store.apply(event)
        except (RedisError, OSError) as exc:
            self.metrics.redis_failures.inc()
            log.error("could not write alert %s to Redis now (it goes to fall-events): %s", event.alert_id, exc)

    async def handle(self, event: FallEvent) -> None:
        if event.state == "open" and await self._nobody_answered(event):
            self._spawn(self._notify(self.rule.webhook_urls, OPENED_EVENT, event))
        await self._until_stored(event)
        if event.state == "open":
            self._spawn(self._save_snapshot(event))

    async def escalate(self, alert: FallEvent) -> None:
        """Re-notify on the escalation channel, once per alert (also across workers when Redis is up)."""
        try:
            if not await self.store.claim_escalation(alert.alert_id):
                return
            await self.store.add_escalation(alert)
        except (RedisError, OSError) as exc:
            log.error("escalating alert %s without Redis: %s", alert.alert_id, exc)
        self.metrics.escalations.inc()
        log.warning(
            "alert %s (camera %s, room %s) not acknowledged within %.0f s: escalated",
            alert.alert_id,
            alert.camera_id,
            alert.room,
            self.rule.rule_for(alert.room).escalate_after_s,
        )
        self._spawn(self._notify(self.rule.escalation_webhook_urls, ESCALATED_EVENT, alert))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.webhooks.close()
        await self.store.close()

    async def _nobody_answered(self, event: FallEvent) -> bool:
        """False when Redis knows a caregiver answered: a replay of `fall-events` (a new consumer group reads it
        from the start) must not page anyone about old alerts. Without Redis: notify."""
        try:
            stored = await self.store.alert(event.alert_id)
        except (RedisError, OSError):
            return True
        return stored is None or stored.state == "open"

    async def _until_stored(self, event: FallEvent) -> None:
        delay = 0.1
        while True:
            try:
                await self.store.apply(event)
                return
            except (RedisError, OSError) as exc:
                self.metrics.redis_failures.inc()
                log.error(
                    "Redis unavailable, alert %s (%s) waits (it is on fall-events): %s",
                    event.alert_id,
                    event.state,
                    exc,
                )
            await asyncio.sleep(delay)  # backoff while Redis is down
            delay = min(delay * 2, REDIS_RETRY_MAX_S)

    async def _notify(self, urls: list[str], event_name: str, alert: FallEvent) -> None:
        results = await asyncio.gather(*(self.webhooks.deliver(url, event_name, alert) for url in urls))
        for accepted in results:
            counter = self.metrics.webhook_deliveries if accepted else self.metrics.webhook_failures
            counter.labels(event=event_name).inc()

    async def _save_snapshot(self, alert: FallEvent) -> None:
        try:
            if not await self.store.needs_snapshot(alert.alert_id):
                return  # a redelivery, or an alert already closed
        except (RedisError, OSError) as exc:
            log.error("no snapshot for alert %s: %s", alert.alert_id, exc)
            return
        # the newest evidence frame shows the person where they are now
        frame_id = alert.evidence_frame_ids[-1]
        jpeg = await find_frame_jpeg(self.settings, alert.camera_id, frame_id, alert.first_fall_at)
        if jpeg is None:
            log.warning(
                "no snapshot for alert %s: frame %s is not in %s",
                alert.alert_id,
                frame_id,
                self.settings.kafka.topics.frames,
            )
            return
        try:
            await self.store.save_snapshot(alert.alert_id, jpeg, self.rule.snapshot_ttl_s)
        except (RedisError, OSError) as exc:
            log.error("could not store the snapshot of alert %s: %s", alert.alert_id, exc)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())
