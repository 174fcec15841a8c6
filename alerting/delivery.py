"""Delivery of alerts to caregivers: Redis (state, stream, snapshot), signed webhooks, escalation.

`store_first` writes a new alert to Redis once, before it is published, so a
reader of `fall-events` finds it in Redis (unless Redis is down). `handle` runs
for every record of `fall-events`. Webhooks of a new alert go first: each
(receiver, event, alert) goes into the webhook *outbox* in Redis and is sent at
once from there; an alert Redis knows to be answered already is not notified
again. The outbox makes delivery crash-safe: a delivery stays in it until the
receiver accepted it or its attempts are used up, retries are scheduled there
(not in memory), and a delivery whose worker died is taken over by the next
outbox pass once its lease ends. Accepted deliveries are marked, so each alert
reaches each receiver once (a crash between the receiver's answer and the mark
repeats the POST with the same `Idempotency-Key`). When Redis is down the
webhooks are sent directly and `handle` waits for them, so faust does not commit
the record before they were tried (a crash then redelivers it). Then the state
is written to Redis, retried until Redis answers, so an alert made during an
outage reaches Redis when it returns (faust commits the record only after
`handle` returned); a state Redis has already is not written twice.

Redis restarted empty (the local stack keeps no persistence) loses the alerts,
the active set and each camera's open alert: `rebuild_if_empty` notices the
missing marker and replays `fall-events` into Redis (state changes apply only
forwards, so the replay and live changes mix safely).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

from aiokafka import TopicPartition
from redis.exceptions import RedisError

from alerting.metrics import AlertingMetrics
from alerting.snapshots import find_frame_jpeg
from alerting.store import AlertStore
from alerting.webhooks import WebhookSender
from core.kafka_io import make_consumer, read_topic_partitions
from core.settings import Settings
from schemas import FallEvent, SchemaError, decode, encode

log = logging.getLogger(__name__)

OPENED_EVENT = "alert.opened"
ESCALATED_EVENT = "alert.escalated"
REDIS_RETRY_MAX_S = 5.0
# A claimed delivery is another worker's to take over after this long (a POST lasts webhook_timeout_s at most).
OUTBOX_LEASE_MARGIN_S = 10.0
OUTBOX_BATCH = 50
REBUILD_LEASE_S = 120


def delivery_member(event_name: str, alert_id: str, url: str) -> str:
    """The outbox's id of one delivery: the same alert, event and receiver is the same delivery."""
    return f"{event_name}:{alert_id}:{hashlib.sha256(url.encode()).hexdigest()[:16]}"


class Delivery:
    def __init__(self, settings: Settings, store: AlertStore, metrics: AlertingMetrics) -> None:
        self.settings = settings
        self.rule = settings.alerting
        self.store = store
        self.metrics = metrics
        self.webhooks = WebhookSender(settings.alerting)
        self.topic = settings.kafka.topics.fall_events
        self._tasks: set[asyncio.Task[None]] = set()
        self._outbox_pass = asyncio.Lock()
        # Deliveries this worker put into the outbox or took from it, until done: put back if Redis loses them.
        self._unfinished: dict[str, bytes] = {}
        self._rebuilding = False

    async def store_first(self, event: FallEvent) -> None:
        """One try; on failure `handle` retries it when the record comes back from `fall-events`."""
        try:
            await self.store.apply(event)
        except (RedisError, OSError) as exc:
            self.metrics.redis_failures.inc()
            log.error("could not write alert %s to Redis now (it goes to fall-events): %s", event.alert_id, exc)

    async def handle(self, event: FallEvent) -> None:
        if event.state == "open" and await self._nobody_answered(event):
            await self._notify(self.rule.webhook_urls, OPENED_EVENT, event)
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
        await self._notify(self.rule.escalation_webhook_urls, ESCALATED_EVENT, alert)

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
        """Into the outbox, then one outbox pass at once; without Redis, every attempt right here."""
        if not urls:
            return
        body = encode(alert).decode()
        try:
            for url in urls:
                entry = {"url": url, "event": event_name, "alert": body, "attempt": 0}
                member = delivery_member(event_name, alert.alert_id, url)
                payload = json.dumps(entry).encode()
                if await self.store.enqueue_delivery(self.topic, member, payload, time.time()):
                    self._unfinished[member] = payload
        except (RedisError, OSError) as exc:
            self.metrics.redis_failures.inc()
            log.error("webhook outbox unavailable (%s): %s of alert %s sent directly", exc, event_name, alert.alert_id)
            results = await asyncio.gather(*(self.webhooks.deliver(url, event_name, alert) for url in urls))
            for accepted in results:
                self._count(event_name, accepted)
            return
        self._spawn(self.deliver_due())

    def _count(self, event_name: str, accepted: bool) -> None:
        counter = self.metrics.webhook_deliveries if accepted else self.metrics.webhook_failures
        counter.labels(event=event_name).inc()

    async def deliver_due(self) -> None:
        """One pass over the outbox: every due delivery is tried once, then done, or rescheduled with backoff."""
        if self._outbox_pass.locked():
            return  # the running pass takes what is due
        async with self._outbox_pass:
            lease_s = self.rule.webhook_timeout_s + OUTBOX_LEASE_MARGIN_S
            try:
                claimed = await self.store.claim_deliveries(self.topic, time.time(), lease_s, OUTBOX_BATCH)
            except (RedisError, OSError):
                return  # the outbox waits in Redis; the next pass after Redis is back sends it
            self._unfinished.update(claimed)
            await asyncio.gather(*(self._deliver_one(member, payload) for member, payload in claimed))

    async def _deliver_one(self, member: str, payload: bytes) -> None:
        entry = json.loads(payload)
        event_name, url = entry["event"], entry["url"]
        try:
            alert = decode(FallEvent, entry["alert"].encode())
        except SchemaError as exc:  # not ours to send: an outbox entry of another version
            self._unfinished.pop(member, None)
            log.error("webhook outbox entry %s unreadable, dropped: %s", member, exc)
            await self._redis_quietly(self.store.delivery_done(self.topic, member, delivered=False))
            return
        result = await self.webhooks.attempt(url, event_name, alert)
        attempt = entry["attempt"] + 1
        if result.final or attempt >= self.rule.webhook_attempts:
            if not result.final:
                self.webhooks.say_gave_up(url, event_name, alert, result.problem)
            self._count(event_name, result.accepted)
            self._unfinished.pop(member, None)
            await self._redis_quietly(self.store.delivery_done(self.topic, member, delivered=result.accepted))
            return
        self.webhooks.say_retry(url, event_name, alert, attempt, result.problem)
        due = time.time() + self.webhooks.retry_delay_s(attempt)
        entry["attempt"] = attempt
        self._unfinished[member] = json.dumps(entry).encode()
        await self._redis_quietly(self.store.retry_delivery(self.topic, member, self._unfinished[member], due))

    async def _redis_quietly(self, call: Coroutine[Any, Any, None]) -> None:
        """An outbox update; if Redis fails now the lease runs out and the delivery is tried again."""
        try:
            await call
        except (RedisError, OSError) as exc:
            self.metrics.redis_failures.inc()
            log.error("webhook outbox not updated (%s); the delivery is retried after its lease", exc)

    async def rebuild_if_empty(self) -> None:
        """Replay `fall-events` into Redis when Redis lost the alert state (restarted empty), once per loss."""
        if self._rebuilding:
            return
        try:
            if await self.store.is_built(self.topic) or not await self.store.claim_rebuild(self.topic, REBUILD_LEASE_S):
                return
        except (RedisError, OSError):
            return  # still down: checked again on the next tick
        self._rebuilding = True
        self._spawn(self._rebuild())

    async def _rebuild(self) -> None:
        started = time.monotonic()
        try:
            events = await read_topic(self.settings, self.topic)
            changed = 0
            for event in events:
                changed += await self.store.apply(event)
            # the outbox went with the rest: what this worker had not delivered yet goes back in
            for member, payload in list(self._unfinished.items()):
                await self.store.enqueue_delivery(self.topic, member, payload, time.time())
            await self.store.mark_built(self.topic)
            active = len(await self.store.active_alerts())
        except (RedisError, OSError) as exc:
            self.metrics.redis_failures.inc()
            log.error("rebuilding the alert state from %s stopped (%s); retried on the next tick", self.topic, exc)
            return
        finally:
            self._rebuilding = False
        self.metrics.state_rebuilds.inc()
        log.warning(
            "Redis had no alert state: rebuilt from %d records of %s (%d changes, %d active alerts), "
            "%d webhook deliveries back in the outbox, in %.1f s",
            len(events),
            self.topic,
            changed,
            active,
            len(self._unfinished),
            time.monotonic() - started,
        )

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


async def read_topic(settings: Settings, topic: str) -> list[FallEvent]:
    """Every readable alert event on `topic` from the start up to its end now (unreadable ones skipped)."""
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        partitions: list[TopicPartition] = await read_topic_partitions(settings, topic)
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        events: list[FallEvent] = []
        while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
            for records in (await consumer.getmany(*partitions, timeout_ms=1000)).values():
                for record in records:
                    try:
                        events.append(decode(FallEvent, record.value))
                    except SchemaError:
                        continue  # dead-lettered by deliver-alerts when it met it
        return events
    finally:
        await consumer.stop()
