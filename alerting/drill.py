"""The fire drill (`fallwatch alerts test --room R`): a marked test alert through every configured channel.

The drill alert (`drill: true`, id `drill-…`, camera `drill-<room>`, no frames)
is published to `fall-events` as the rule would publish an alert, so the
running alerting service delivers it like any other: the check covers Kafka,
the service and each channel. Each channel is then watched for its delivery:
Redis (the alert's state and its stream entry, which the dashboard shows), each
webhook (the outbox's delivered mark), MQTT (the room's alert topic). With
`ack_wait_s`, the drill also waits for someone to acknowledge it on the
dashboard or with the Home Assistant button. At the end it is resolved, so it
leaves the dashboard. Its answers are never labels (`alerting.answers`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiomqtt

from alerting.channels.mqtt import ANSWERED_BY, MqttTopics, tls_context
from alerting.channels.webhook import OPENED_EVENT, delivery_member
from alerting.store import AlertStore, delivered_key
from core.kafka_io import make_producer, start_clients
from core.settings import Settings
from schemas import FallEvent, encode, utc_now

POLL_S = 0.2  # how often Redis is asked about a delivery


@dataclass
class ChannelResult:
    channel: str
    delivered: bool
    detail: str


def drill_alert(room: str) -> FallEvent:
    now = utc_now()
    return FallEvent(
        alert_id=f"drill-{uuid.uuid4().hex[:12]}",
        camera_id=f"drill-{room}",
        room=room,
        state="open",
        opened_at=now,
        first_fall_at=now,
        confidence=1.0,
        evidence_frame_ids=[],
        rule="fire drill",
        drill=True,
    )


async def within(deadline: float, check: Callable[[], Awaitable[bool]]) -> float | None:
    """Seconds until `check()` held (polled), or None at the deadline."""
    started = time.monotonic()
    while time.monotonic() < deadline:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(POLL_S)  # polling interval
    return None


async def publish(settings: Settings, alert: FallEvent) -> None:
    producer = make_producer(settings)
    await start_clients(settings, producer)
    try:
        await producer.send_and_wait(
            settings.kafka.topics.fall_events, key=alert.camera_id.encode(), value=encode(alert)
        )
    finally:
        await producer.stop()


async def check_redis(store: AlertStore, alert: FallEvent, deadline: float) -> ChannelResult:
    async def stored() -> bool:
        return await store.alert(alert.alert_id) is not None

    took = await within(deadline, stored)
    if took is None:
        return ChannelResult("redis/dashboard", False, "not in Redis in time: is the alerting service running?")
    return ChannelResult(
        "redis/dashboard", True, f"on the dashboard and the stream fallwatch:alert-events after {took:.1f} s"
    )


async def check_webhook(store: AlertStore, alert: FallEvent, url: str, deadline: float) -> ChannelResult:
    key = delivered_key(delivery_member(OPENED_EVENT, alert.alert_id, url))

    async def accepted() -> bool:
        return bool(await store.redis.exists(key))

    took = await within(deadline, accepted)
    if took is None:
        return ChannelResult(f"webhook {url}", False, "not accepted in time (see the alerting log)")
    return ChannelResult(f"webhook {url}", True, f"accepted after {took:.1f} s")


async def check_mqtt(settings: Settings, alert: FallEvent, deadline: float) -> ChannelResult:
    mqtt = settings.alerting.mqtt
    topic = MqttTopics(mqtt.topic_prefix, mqtt.discovery_prefix).room(alert.room, "alert")
    started = time.monotonic()
    client = aiomqtt.Client(
        mqtt.host, mqtt.port, username=mqtt.username, password=mqtt.secret(),
        tls_context=tls_context(mqtt), timeout=mqtt.connect_timeout_s,
    )  # fmt: skip
    try:
        async with client:
            await client.subscribe(topic, qos=1)
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                async for message in client.messages:
                    if json.loads(bytes(message.payload)).get("alert_id") == alert.alert_id:  # type: ignore[arg-type]
                        took = time.monotonic() - started
                        return ChannelResult("mqtt", True, f"on {topic} after {took:.1f} s")
    except aiomqtt.MqttError as exc:
        return ChannelResult("mqtt", False, f"broker {mqtt.host}:{mqtt.port} unreachable: {exc}")
    except TimeoutError:
        pass
    return ChannelResult("mqtt", False, f"nothing on {topic} in time (see the alerting log)")


async def check_answer(store: AlertStore, alert: FallEvent, ack_wait_s: float) -> ChannelResult:
    answered: list[FallEvent] = []

    async def acknowledged() -> bool:
        stored = await store.alert(alert.alert_id)
        if stored is not None and stored.state != "open":
            answered.append(stored)
        return bool(answered)

    if await within(time.monotonic() + ack_wait_s, acknowledged) is None:
        return ChannelResult("acknowledged", False, f"nobody acknowledged within {ack_wait_s:.0f} s")
    answer = answered[0]
    by = answer.answered_by or "?"
    where = "MQTT button" if by == ANSWERED_BY else "dashboard"
    took = (answer.updated_at - alert.opened_at).total_seconds()
    return ChannelResult("acknowledged", True, f"{answer.state} on the {where} by {by}, {took:.1f} s after the alert")


async def run_drill(
    settings: Settings, room: str, timeout_s: float, ack_wait_s: float
) -> tuple[FallEvent, list[ChannelResult]]:
    """Send the drill alert and watch every configured channel; returns the alert and one result per check."""
    alert = drill_alert(room)
    store = AlertStore(settings.redis, settings.alerting.stream_maxlen)
    try:
        await publish(settings, alert)
        deadline = time.monotonic() + timeout_s
        checks = [check_redis(store, alert, deadline)]
        checks += [check_webhook(store, alert, url, deadline) for url in settings.alerting.webhook_urls]
        if settings.alerting.mqtt.enabled:
            checks.append(check_mqtt(settings, alert, deadline))
        results = list(await asyncio.gather(*checks))
        if ack_wait_s > 0:
            results.append(await check_answer(store, alert, ack_wait_s))
        # closed, so it leaves the dashboard; from its stored state, which keeps who answered
        latest = await store.alert(alert.alert_id) or alert
        await publish(settings, latest.model_copy(update={"state": "resolved", "updated_at": utc_now()}))
    finally:
        await store.close()
    return alert, results
