"""The dispatcher: every change of an alert, to every configured delivery channel (`alerting.channels`).

Channels run in order for each record of `fall-events`: webhooks first (they
read Redis to skip alerts already answered), then the Redis state, then the
snapshot. An escalation is claimed once in Redis (workers swap cameras on a
rebalance), then sent through every channel. MQTT, when configured, comes last:
its buttons answer alerts that must be in Redis by then.
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError

from alerting.answers import Action, Answers, Publish
from alerting.channels.base import Channel
from alerting.channels.mqtt import MqttChannel
from alerting.channels.redis_state import RedisChannel
from alerting.channels.snapshot import SnapshotChannel
from alerting.channels.webhook import WebhookChannel
from alerting.metrics import AlertingMetrics
from alerting.notifications import Notifier
from alerting.store import AlertStore
from core.settings import Settings
from schemas import FallEvent, PersonDown

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self, settings: Settings, store: AlertStore, metrics: AlertingMetrics, channels: list[Channel]
    ) -> None:
        self.rule = settings.alerting
        self.store = store
        self.metrics = metrics
        self.channels = channels

    @classmethod
    def for_settings(cls, settings: Settings, metrics: AlertingMetrics, publish: Publish) -> Dispatcher:
        """The channels these settings configure; `publish` sends an answer that came in over a channel."""
        store = AlertStore(settings.redis, settings.alerting.stream_maxlen)
        notifier = Notifier(settings.alerting)
        dispatcher = cls(settings, store, metrics, [])
        dispatcher.channels = [
            WebhookChannel(settings, store, metrics, notifier),
            RedisChannel(settings, store, metrics, notifier),
            SnapshotChannel(settings, store, on_saved=dispatcher.snapshot_ready),
        ]
        if settings.alerting.mqtt.enabled:
            answers = Answers(settings.kafka.topics, store, notifier, publish)

            async def answer(alert_id: str, action: Action, by: str) -> FallEvent:
                return (await answers.answer(alert_id, action, by)).alert

            dispatcher.channels.append(MqttChannel(settings, store, notifier, answer))
        return dispatcher

    async def start(self) -> None:
        for channel in self.channels:
            await channel.start()

    async def before_publish(self, alert: FallEvent) -> None:
        for channel in self.channels:
            await channel.before_publish(alert)

    async def handle(self, alert: FallEvent) -> None:
        for channel in self.channels:
            await channel.alert_changed(alert)

    async def person_down(self, change: PersonDown) -> None:
        for channel in self.channels:
            await channel.person_down(change)

    async def snapshot_ready(self, alert: FallEvent) -> None:
        for channel in self.channels:
            await channel.snapshot_ready(alert)

    async def escalate(self, alert: FallEvent) -> bool:
        """Once per alert (also across workers when Redis is up), through every channel, unless Redis knows
        it was answered; True when that is done. False while another worker holds the claim and has not
        sent it yet: ask again later (it may have died meanwhile)."""
        try:
            stored = await self.store.alert(alert.alert_id)
            if stored is not None and stored.state != "open":
                # answered through the dashboard or MQTT, and not read back from fall-events yet
                log.info("alert %s was %s before its escalation: not escalated", alert.alert_id, stored.state)
                return True
            if not await self.store.claim_escalation(alert.alert_id):
                return await self.store.escalation_is_sent(alert.alert_id)
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
        for channel in self.channels:
            await channel.escalated(alert)
        try:
            await self.store.escalation_sent(alert.alert_id)
        except (RedisError, OSError) as exc:
            log.error("escalation of alert %s sent, not marked in Redis: %s", alert.alert_id, exc)
        return True

    async def tick(self) -> None:
        for channel in self.channels:
            await channel.tick()

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        await self.store.close()
