"""The Redis channel: each alert's state, the active set and the caregiver stream (`alerting.store`).

A new alert is written before it is published, so a reader of `fall-events`
finds it in Redis; every record of `fall-events` is written until Redis takes
it (it is the durable record, so waiting loses nothing). When Redis restarted
empty, one worker replays `fall-events` into it, and `person-down` (which of a
room's cameras see a person down, whichever worker owns them).
"""

from __future__ import annotations

import logging
import time
from typing import TypeVar

from aiokafka import TopicPartition
from redis.exceptions import RedisError

from alerting.channels.base import Channel
from alerting.metrics import AlertingMetrics
from alerting.notifications import Notifier
from alerting.store import ACTIVE_STATES, STATE_RANK, AlertStore
from core.kafka_io import make_consumer, read_topic_partitions
from core.retry import retry_until_done
from core.settings import Settings
from schemas import FallEvent, Message, PersonDown, SchemaError, decode

log = logging.getLogger(__name__)

REDIS_ERRORS = (RedisError, OSError)
REDIS_RETRY_MAX_S = 5.0
REBUILD_LEASE_S = 120

M = TypeVar("M", bound=Message)


class RedisChannel(Channel):
    name = "redis"

    def __init__(
        self,
        settings: Settings,
        store: AlertStore,
        metrics: AlertingMetrics,
        notifier: Notifier,
    ) -> None:
        super().__init__()
        self.notifier = notifier
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.topic = settings.kafka.topics.fall_events
        self._rebuilding = False

    async def before_publish(self, alert: FallEvent) -> None:
        """One try; on failure `alert_changed` retries it when the record comes back from `fall-events`."""
        try:
            await self.store.apply(alert, self.notifier.notification(alert))
        except REDIS_ERRORS as exc:
            self.metrics.redis_failures.inc()
            log.error("could not write alert %s to Redis now (it goes to fall-events): %s", alert.alert_id, exc)

    async def alert_changed(self, alert: FallEvent) -> None:
        def waits(exc: BaseException) -> None:
            self.metrics.redis_failures.inc()
            log.error(
                "Redis unavailable, alert %s (%s) waits (it is on fall-events): %s", alert.alert_id, alert.state, exc
            )

        async def store() -> bool:
            return await self.store.apply(alert, self.notifier.notification(alert))

        await retry_until_done(store, REDIS_ERRORS, waits, REDIS_RETRY_MAX_S)

    async def escalated(self, alert: FallEvent) -> None:
        try:
            await self.store.add_escalation(alert, self.notifier.notification(alert, escalated=True))
        except REDIS_ERRORS as exc:
            log.error("escalation of alert %s not on the Redis stream: %s", alert.alert_id, exc)

    async def tick(self) -> None:
        """Replay `fall-events` into Redis when Redis lost the alert state (restarted empty), once per loss."""
        if self._rebuilding:
            return
        try:
            if await self.store.is_built(self.topic) or not await self.store.claim_rebuild(self.topic, REBUILD_LEASE_S):
                return
        except REDIS_ERRORS:
            return  # still down: checked again on the next tick
        self._rebuilding = True
        self.spawn(self._rebuild())

    async def _rebuild(self) -> None:
        started = time.monotonic()
        try:
            events = await read_topic(self.settings, self.topic, FallEvent)
            changed = 0
            for event in latest_states(events):
                # only alerts still active go to the stream: a caregiver's page must not be told of closed ones
                # as news, and one that opened while Redis was away is news
                notification = self.notifier.notification(event)
                changed += await self.store.apply(event, notification, to_stream=event.state in ACTIVE_STATES)
            person_down = await read_topic(self.settings, self.settings.kafka.topics.person_down, PersonDown)
            for change in person_down:
                await self.store.camera_down(change)
            await self.store.mark_built(self.topic)
            active = len(await self.store.active_alerts())
        except REDIS_ERRORS as exc:
            self.metrics.redis_failures.inc()
            log.error("rebuilding the alert state from %s stopped (%s); retried on the next tick", self.topic, exc)
            return
        finally:
            self._rebuilding = False
        self.metrics.state_rebuilds.inc()
        log.warning(
            "Redis had no alert state: rebuilt from %d records of %s (%d changes, %d active alerts) and %d of %s "
            "in %.1f s",
            len(events),
            self.topic,
            changed,
            active,
            len(person_down),
            self.settings.kafka.topics.person_down,
            time.monotonic() - started,
        )


def latest_states(events: list[FallEvent]) -> list[FallEvent]:
    """Each alert's furthest state (the one the store keeps of all of them), in the order first seen."""
    latest: dict[str, FallEvent] = {}
    for event in events:
        known = latest.get(event.alert_id)
        if known is None or STATE_RANK[event.state] > STATE_RANK[known.state]:
            latest[event.alert_id] = event
    return list(latest.values())


async def read_topic(settings: Settings, topic: str, model: type[M]) -> list[M]:
    """Every readable `model` record on `topic` from the start up to its end now (unreadable ones skipped)."""
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        partitions: list[TopicPartition] = await read_topic_partitions(settings, topic)
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        events: list[M] = []
        while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
            for records in (await consumer.getmany(*partitions, timeout_ms=1000)).values():
                for record in records:
                    try:
                        events.append(decode(model, record.value))
                    except SchemaError:
                        continue  # dead-lettered by the agent that met it
        return events
    finally:
        await consumer.stop()
