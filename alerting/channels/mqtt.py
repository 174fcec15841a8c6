"""The MQTT channel: per-room state topics, Home Assistant discovery, and its buttons coming back.

Topics (`MqttTopics`; the prefix is `alerting.mqtt.topic_prefix`), every state
retained and published with QoS 1, so a late subscriber (Home Assistant after a
restart) reads the current state at once:

- `<prefix>/availability`: `online` once connected; the broker publishes the will `offline` when the
  worker is gone;
- `<prefix>/rooms/<room>/alert`: the room's alert as JSON (`Notifier.body`: state, id, confidence,
  time since the fall, snapshot link, message): its newest open alert, else its newest acknowledged
  one, else the last that changed (a room has several cameras);
- `<prefix>/rooms/<room>/person_down`: `ON` while a camera of the room sees a person down, else `OFF`
  (the room's cameras may be on several workers: Redis keeps which are down);
- `<prefix>/rooms/<room>/snapshot`: the signed snapshot link of the room's latest alert, once the
  snapshot is stored;
- `<prefix>/rooms/<room>/acknowledge`, `.../false_alarm`: commands (the Home Assistant buttons press
  `PRESS`); they answer the alert the room's alert topic shows, the way the dashboard's buttons do
  (`alerting.answers`).

Discovery configs (`discovery_configs`) go to `<discovery prefix>/<component>/fallwatch_<room>/<entity>/config`,
retained, when a room is first seen. The connection is kept by reconnecting with backoff; what was
published meanwhile is kept and published again on the next connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from alerting.answers import Action, AnswerRefused
from alerting.channels.base import Channel
from alerting.notifications import Notifier
from alerting.store import AlertStore
from core.settings import MqttSettings, Settings
from schemas import FallEvent, PersonDown

log = logging.getLogger(__name__)

QOS = 1
ONLINE, OFFLINE = "online", "offline"
PRESS = "PRESS"
ANSWERED_BY = "Home Assistant (MQTT)"
# command topic's last level → the dashboard's action
COMMANDS: dict[str, Action] = {"acknowledge": "acknowledge", "false_alarm": "false-alarm"}
RECONNECT_MAX_S = 10.0

# (alert id, action, who) → the answered alert; raises AnswerRefused
Answer = Callable[[str, Action, str], Awaitable[FallEvent]]


def room_slug(room: str) -> str:
    """A room as one topic level and Home Assistant object id (letters, digits, _ and - only)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", room)


@dataclass(frozen=True)
class MqttTopics:
    prefix: str
    discovery_prefix: str

    @property
    def availability(self) -> str:
        return f"{self.prefix}/availability"

    def room(self, room: str, what: str) -> str:
        return f"{self.prefix}/rooms/{room_slug(room)}/{what}"

    def commands(self, share_group: str) -> list[str]:
        """Every room's commands; shared subscriptions, so one worker of the group takes each press."""
        return [f"$share/{share_group}/{self.prefix}/rooms/+/{command}" for command in COMMANDS]

    def discovery(self, component: str, room: str, entity: str) -> str:
        return f"{self.discovery_prefix}/{component}/fallwatch_{room_slug(room)}/{entity}/config"


def discovery_configs(topics: MqttTopics, room: str) -> dict[str, dict[str, Any]]:
    """Home Assistant MQTT discovery payloads of one room, by config topic: one device per room."""
    slug = room_slug(room)
    device = {
        "identifiers": [f"fallwatch_{slug}"],
        "name": f"Room {room}",
        "manufacturer": "fallwatch",
        "model": "fall detection",
    }
    common = {"availability_topic": topics.availability, "device": device, "qos": QOS}
    alert = topics.room(room, "alert")
    entities: list[tuple[str, str, dict[str, Any]]] = [
        # `safety`: on means unsafe, which is what a person down is; `occupancy` would say "someone is there"
        ("binary_sensor", "person_down", {
            "name": "Person down", "device_class": "safety", "state_topic": topics.room(room, "person_down"),
            "payload_on": "ON", "payload_off": "OFF",
        }),
        ("sensor", "alert", {
            "name": "Fall alert", "device_class": "enum", "state_topic": alert,
            "options": ["open", "acknowledged", "resolved", "false_alarm"],
            "value_template": "{{ value_json.state }}", "json_attributes_topic": alert,
        }),
        # a timestamp: Home Assistant shows it as "3 minutes ago", the time since the fall, without updates
        ("sensor", "fall_since", {
            "name": "Down since", "device_class": "timestamp", "state_topic": alert,
            "value_template": "{{ value_json.first_fall_at if value_json.state in ['open', 'acknowledged'] "
            "else None }}",
        }),
        ("image", "snapshot", {"name": "Fall snapshot", "url_topic": topics.room(room, "snapshot")}),
        ("button", "acknowledge", {
            "name": "Acknowledge fall", "command_topic": topics.room(room, "acknowledge"), "payload_press": PRESS,
        }),
        ("button", "false_alarm", {
            "name": "False alarm", "command_topic": topics.room(room, "false_alarm"), "payload_press": PRESS,
        }),
    ]  # fmt: skip
    return {
        topics.discovery(component, room, entity): {**common, **fields, "unique_id": f"fallwatch_{slug}_{entity}"}
        for component, entity, fields in entities
    }


def tls_context(mqtt: MqttSettings) -> ssl.SSLContext | None:
    if not mqtt.tls:
        return None
    return ssl.create_default_context(cafile=str(mqtt.ca_file) if mqtt.ca_file else None)


class MqttChannel(Channel):
    name = "mqtt"

    def __init__(self, settings: Settings, store: AlertStore, notifier: Notifier, answer: Answer) -> None:
        super().__init__()
        self.mqtt = settings.alerting.mqtt
        self.client_id = f"{settings.alerting.app_id}-{id(self):x}"
        self.share_group = settings.alerting.app_id
        self.topics = MqttTopics(self.mqtt.topic_prefix, self.mqtt.discovery_prefix)
        self.store = store
        self.notifier = notifier
        self.answer = answer
        # every retained topic's latest payload: published again on each new connection
        self.retained: dict[str, bytes] = {}
        self.rooms: set[str] = set()
        self.down_cameras: dict[str, set[str]] = {}
        self._client: aiomqtt.Client | None = None
        # a payload published again on reconnect must never overtake a newer one
        self._publishing = asyncio.Lock()
        for room in settings.alerting.rooms:
            self._discover(room)

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def start(self) -> None:
        self.spawn(self._stay_connected())

    async def close(self) -> None:
        # a clean stop says so (the will is for a crash)
        await self.publish(self.topics.availability, OFFLINE.encode())
        await super().close()

    async def alert_changed(self, alert: FallEvent) -> None:
        await self._alert_state(alert, escalated=False)

    async def escalated(self, alert: FallEvent) -> None:
        await self._alert_state(alert, escalated=True)

    async def person_down(self, change: PersonDown) -> None:
        cameras = self.down_cameras.setdefault(change.room, set())
        (cameras.add if change.down else cameras.discard)(change.camera_id)
        await self._room_seen(change.room)
        try:
            # the room's cameras may belong to other workers: the room is down while any of them is
            down = await self.store.camera_down(change) > 0
        except (RedisError, OSError) as exc:
            log.warning(
                "room %s: person down from this worker's cameras only, Redis unavailable (%s)", change.room, exc
            )
            down = bool(cameras)
        await self.publish(self.topics.room(change.room, "person_down"), b"ON" if down else b"OFF")

    async def _alert_state(self, alert: FallEvent, escalated: bool) -> None:
        await self._room_seen(alert.room)
        shown = alert
        try:
            active = await self._room_alert(room_slug(alert.room))
            if active is not None and active.alert_id != alert.alert_id:
                # a room has several cameras: one camera's alert closing must not hide another's still open
                shown, escalated = active, bool(await self.store.escalated([active.alert_id]))
        except (RedisError, OSError) as exc:
            log.warning("MQTT shows alert %s of room %s without Redis (%s)", alert.alert_id, alert.room, exc)
        await self.publish(self.topics.room(alert.room, "alert"), self.notifier.body(shown, escalated))

    async def snapshot_ready(self, alert: FallEvent) -> None:
        # only now: Home Assistant fetches the image as soon as the link arrives
        link = self.notifier.snapshot_url(alert.alert_id)
        if link is not None:
            await self.publish(self.topics.room(alert.room, "snapshot"), link.encode())

    async def _room_seen(self, room: str) -> None:
        if room not in self.rooms:
            for topic, payload in self._discover(room).items():
                await self.publish(topic, payload)

    def _discover(self, room: str) -> dict[str, bytes]:
        self.rooms.add(room)
        return {topic: json.dumps(config).encode() for topic, config in discovery_configs(self.topics, room).items()}

    async def publish(self, topic: str, payload: bytes) -> None:
        """Retained, QoS 1; while disconnected only kept, and published on the next connection."""
        async with self._publishing:
            self.retained[topic] = payload
            if self._client is None:
                return
            try:
                await self._client.publish(topic, payload, qos=QOS, retain=True, timeout=self.mqtt.connect_timeout_s)
            except aiomqtt.MqttError as exc:
                log.warning("MQTT publish to %s failed (%s); sent again after the reconnect", topic, exc)

    async def _stay_connected(self) -> None:
        def say_retry(state: RetryCallState) -> None:
            assert state.outcome is not None and state.next_action is not None
            log.warning(
                "MQTT broker %s:%d unavailable (%s); reconnecting in %.1f s",
                self.mqtt.host,
                self.mqtt.port,
                state.outcome.exception(),
                state.next_action.sleep,
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(aiomqtt.MqttError),
            wait=wait_exponential(multiplier=0.5, max=RECONNECT_MAX_S),
            before_sleep=say_retry,
        )
        await retrying(self._session)

    async def _session(self) -> None:
        will = aiomqtt.Will(self.topics.availability, OFFLINE.encode(), qos=QOS, retain=True)
        client = aiomqtt.Client(
            self.mqtt.host,
            self.mqtt.port,
            username=self.mqtt.username,
            password=self.mqtt.secret(),
            identifier=self.client_id,
            will=will,
            keepalive=self.mqtt.keepalive_s,
            timeout=self.mqtt.connect_timeout_s,
            tls_context=tls_context(self.mqtt),
        )
        async with client:
            for commands in self.topics.commands(self.share_group):
                await client.subscribe(commands, qos=QOS)
            async with self._publishing:
                await client.publish(self.topics.availability, ONLINE.encode(), qos=QOS, retain=True)
                for topic, payload in self.retained.items():
                    await client.publish(topic, payload, qos=QOS, retain=True)
                self._client = client
            log.info(
                "MQTT connected to %s:%d, %d retained topics sent", self.mqtt.host, self.mqtt.port, len(self.retained)
            )
            try:
                async for message in client.messages:
                    await self._command(str(message.topic), message.payload)
            finally:
                self._client = None

    async def _command(self, topic: str, payload: Any) -> None:
        parts = topic.split("/")
        action = COMMANDS.get(parts[-1])
        if action is None or payload != PRESS.encode():
            return  # a state topic of ours, or not a press
        slug = parts[-2]
        try:
            alert = await self._active_alert(slug, action)
            if alert is None:
                log.warning("MQTT %s for room %s: no alert to answer", action, slug)
                return
            answered = await self.answer(alert.alert_id, action, ANSWERED_BY)
        except AnswerRefused as exc:
            log.warning("MQTT %s for room %s refused: %s", action, slug, exc)
            return
        except (RedisError, OSError) as exc:
            log.error("MQTT %s for room %s not taken, Redis unavailable: %s", action, slug, exc)
            return
        except Exception:  # a bug must cost this press, not the connection that takes every later one
            log.exception("MQTT %s for room %s failed", action, slug)
            return
        log.info("alert %s %s over MQTT", answered.alert_id, answered.state)

    async def _active_alert(self, slug: str, action: Action) -> FallEvent | None:
        """The alert a press of `action` answers: the one the room's alert topic shows."""
        alert = await self._room_alert(slug)
        if alert is None or (action == "acknowledge" and alert.state != "open"):
            return None
        return alert

    async def _room_alert(self, slug: str) -> FallEvent | None:
        """The room's alert on its topic: its newest open alert, else its newest acknowledged one (Redis)."""
        active = [alert for alert in await self.store.active_alerts() if room_slug(alert.room) == slug]
        for state in ("open", "acknowledged"):
            in_state = [alert for alert in active if alert.state == state]
            if in_state:
                return in_state[-1]
        return None
