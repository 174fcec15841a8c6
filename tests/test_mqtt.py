"""MQTT delivery and Home Assistant discovery against a real mosquitto (the session stack's, or a private one).

Discovery payloads are checked against the configuration variables Home
Assistant documents for each MQTT platform (`HA_FIELDS`, from
https://www.home-assistant.io/integrations/<platform>.mqtt/ and the MQTT
integration's device and availability options), an alert's lifecycle is read
off the retained topics, and a button press comes back and acknowledges.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
import redis

from alerting.channels.mqtt import MqttChannel, MqttTopics, room_slug
from alerting.notifications import Notifier
from alerting.store import AlertStore, alert_key
from core.settings import RedisSettings, Settings
from fallwatch.stack import LocalStack, StackSecurity, StackState, free_port, stop_pid
from schemas import FallEvent, Label, PersonDown, decode, utc_now
from tests.alerting_helpers import (
    WAIT_S,
    WEBHOOK_SECRET,
    WebhookReceiver,
    alerting_settings,
    alerting_worker,
    alerts_of,
    fall_with_frames,
    make_verdict,
    read_until,
    send_verdicts,
    unique_camera,
    wait_for,
    wait_until_consumed,
)
from tests.conftest import REPO, read_all, until, write_config

TOKEN = "test-dashboard-token"

# Configuration variables Home Assistant documents, by platform: every key fallwatch sends must be one of them.
HA_ENTITY_FIELDS = {
    "availability", "availability_mode", "availability_template", "availability_topic", "device",
    "default_entity_id", "enabled_by_default", "encoding", "entity_category", "entity_picture", "icon",
    "json_attributes_template", "json_attributes_topic", "name", "object_id", "origin", "payload_available",
    "payload_not_available", "platform", "qos", "unique_id",
}  # fmt: skip
HA_FIELDS: dict[str, set[str]] = {
    "binary_sensor": HA_ENTITY_FIELDS | {
        "device_class", "expire_after", "force_update", "off_delay", "payload_off", "payload_on", "state_topic",
        "value_template",
    },
    "sensor": HA_ENTITY_FIELDS | {
        "device_class", "expire_after", "force_update", "last_reset_value_template", "options", "state_class",
        "state_topic", "suggested_display_precision", "unit_of_measurement", "value_template",
    },
    "image": HA_ENTITY_FIELDS | {"content_type", "image_encoding", "image_topic", "url_template", "url_topic"},
    "button": HA_ENTITY_FIELDS | {"command_template", "command_topic", "device_class", "payload_press", "retain"},
}  # fmt: skip
HA_REQUIRED = {"binary_sensor": {"state_topic"}, "sensor": {"state_topic"}, "button": {"command_topic"}}
HA_DEVICE_FIELDS = {
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model", "model_id", "name",
    "serial_number", "suggested_area", "sw_version", "via_device",
}  # fmt: skip
# https://www.home-assistant.io/integrations/binary_sensor/#device-class and sensor/#device-class (a part)
HA_BINARY_SENSOR_CLASSES = {
    "battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door", "garage_door", "gas", "heat",
    "light", "lock", "moisture", "motion", "moving", "occupancy", "opening", "plug", "power", "presence", "problem",
    "running", "safety", "smoke", "sound", "tamper", "update", "vibration", "window",
}  # fmt: skip
HA_SENSOR_CLASSES = {"date", "duration", "enum", "timestamp"}  # the non-numeric ones, which are what fallwatch uses


def mqtt_client(port: int, **options: object) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, identifier=f"test-{uuid.uuid4().hex[:6]}", timeout=10, **options)


async def read_retained(
    port: int, topic_filter: str, done: Callable[[dict[str, bytes]], bool], timeout_s: float = WAIT_S, **options: object
) -> dict[str, bytes]:
    """Subscribe to `topic_filter` and collect topic → newest payload until `done` holds; fails at the deadline."""
    got: dict[str, bytes] = {}
    async with mqtt_client(port, **options) as client:
        await client.subscribe(topic_filter, qos=1)
        deadline = time.monotonic() + timeout_s
        messages = aiter(client.messages)
        while not done(got):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"timed out after {timeout_s:.0f} s on {topic_filter}; got {sorted(got)}")
            try:
                message = await asyncio.wait_for(anext(messages), remaining)
            except TimeoutError:
                continue
            got[str(message.topic)] = bytes(message.payload)  # type: ignore[arg-type]
    return got


def wait_retained(port: int, topic: str, done: Callable[[bytes], bool], **options: object) -> bytes:
    return asyncio.run(read_retained(port, topic, lambda got: topic in got and done(got[topic]), **options))[topic]


def press(port: int, topic: str) -> None:
    async def send() -> None:
        async with mqtt_client(port) as client:
            await client.publish(topic, b"PRESS", qos=1)

    asyncio.run(send())


def json_state(state: str, alert_id: str) -> Callable[[bytes], bool]:
    def matches(payload: bytes) -> bool:
        body = json.loads(payload)
        return bool(body["alert_id"] == alert_id and body["state"] == state)

    return matches


@dataclass
class MqttWorker:
    settings: Settings
    port: int
    topics: MqttTopics


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(WEBHOOK_SECRET).running() as running:
        yield running


@pytest.fixture(scope="module")
def worker(
    stack_state: StackState, tmp_path_factory: pytest.TempPathFactory, receiver: WebhookReceiver
) -> Iterator[MqttWorker]:
    """One alerting worker publishing to the stack's broker, under topic prefixes of its own, and to a webhook."""
    assert stack_state.mqtt is not None, "the local stack runs mosquitto"
    tmp_path = tmp_path_factory.mktemp("mqtt")
    run = uuid.uuid4().hex[:6]
    mqtt = {**stack_state.mqtt_fields(), "topic_prefix": f"fw-{run}", "discovery_prefix": f"ha-{run}"}
    # an acknowledged alert resolves 3 s (capture time) after the last fall frame
    settings = alerting_settings(
        stack_state,
        tmp_path,
        dashboard_token=TOKEN,
        mqtt=mqtt,
        resolve_after_s=3.0,
        webhook_urls=[f"{receiver.url}/alerts"],
        webhook_secret=WEBHOOK_SECRET,
        webhook_backoff_s=0.2,
    )
    topics = MqttTopics(mqtt["topic_prefix"], mqtt["discovery_prefix"])
    with alerting_worker(settings, tmp_path):
        yield MqttWorker(settings, stack_state.mqtt.port, topics)
    # a clean stop says so on the availability topic (the will covers a crash)
    assert wait_retained(stack_state.mqtt.port, topics.availability, lambda p: p == b"offline") == b"offline"


def test_discovery_gives_each_room_documented_entities(worker: MqttWorker) -> None:
    camera = unique_camera("discovery")
    send_verdicts(worker.settings, [make_verdict(camera, seq, fall=True) for seq in range(3)])
    (alert,) = alerts_of(worker.settings, camera)
    slug = room_slug(alert.room)
    configs = asyncio.run(
        read_retained(
            worker.port, f"{worker.topics.discovery_prefix}/+/fallwatch_{slug}/+/config", lambda got: len(got) >= 6
        )
    )
    components = sorted(topic.split("/")[1] for topic in configs)
    assert components == ["binary_sensor", "button", "button", "image", "sensor", "sensor"]
    unique_ids = set()
    for topic, payload in configs.items():
        component, config = topic.split("/")[1], json.loads(payload)
        assert set(config) <= HA_FIELDS[component], f"{topic}: undocumented {set(config) - HA_FIELDS[component]}"
        assert HA_REQUIRED.get(component, set()) <= set(config), topic
        assert set(config["device"]) <= HA_DEVICE_FIELDS and config["device"]["identifiers"] == [f"fallwatch_{slug}"]
        assert config["availability_topic"] == worker.topics.availability
        assert config["qos"] == 1
        unique_ids.add(config["unique_id"])
        for key in ("state_topic", "command_topic", "url_topic", "json_attributes_topic"):
            if key in config:
                assert config[key].startswith(f"{worker.topics.prefix}/rooms/{slug}/"), (topic, key)
                assert "+" not in config[key] and "#" not in config[key]
        if component == "binary_sensor":
            assert config["device_class"] in HA_BINARY_SENSOR_CLASSES
            assert (config["payload_on"], config["payload_off"]) == ("ON", "OFF")
        if component == "sensor":
            assert config["device_class"] in HA_SENSOR_CLASSES
            assert ("options" in config) == (config["device_class"] == "enum"), "options belong to enum sensors"
        if component == "image":
            assert ("url_topic" in config) != ("image_topic" in config), "an image takes one of the two"
    assert len(unique_ids) == 6
    assert wait_retained(worker.port, worker.topics.availability, lambda p: p == b"online") == b"online"


def test_an_alert_lives_on_the_topics_and_the_button_acknowledges_it(worker: MqttWorker, clip_path: Path) -> None:
    settings = worker.settings
    alert = fall_with_frames(settings, clip_path, "lifecycle")
    camera = alert.camera_id
    alert_topic = worker.topics.room(alert.room, "alert")

    opened = json.loads(wait_retained(worker.port, alert_topic, json_state("open", alert.alert_id)))
    assert opened["confidence"] == alert.confidence and opened["down_for_s"] >= 0
    assert opened["message"].startswith(f"Room {alert.room}: person down for ")
    assert opened["snapshot_url"].startswith(f"{settings.alerting.public_dashboard_url()}/snapshots/{alert.alert_id}?")
    assert wait_retained(worker.port, worker.topics.room(alert.room, "person_down"), lambda p: p == b"ON") == b"ON"
    # the image entity's link comes once the snapshot is stored, so it opens
    link = wait_retained(
        worker.port, worker.topics.room(alert.room, "snapshot"), lambda p: alert.alert_id.encode() in p
    )
    assert link.decode().split("?")[0] == opened["snapshot_url"].split("?")[0]
    snapshots = redis.Redis.from_url(settings.redis.url)
    try:
        assert snapshots.exists(f"fallwatch:snapshot:{alert.alert_id}"), "stored before its link went out"
    finally:
        snapshots.close()

    press(worker.port, worker.topics.room(alert.room, "acknowledge"))
    acknowledged = json.loads(wait_retained(worker.port, alert_topic, json_state("acknowledged", alert.alert_id)))
    assert acknowledged["answered_by"] == "Home Assistant (MQTT)"
    store = redis.Redis.from_url(settings.redis.url)
    try:
        stored = decode(FallEvent, store.get(alert_key(alert.alert_id)))
    finally:
        store.close()
    assert (stored.state, stored.answered_by) == ("acknowledged", "Home Assistant (MQTT)")
    labels = asyncio.run(
        read_until(
            settings, settings.kafka.topics.labels, Label, lambda got: any(x.alert_id == alert.alert_id for x in got)
        )
    )
    (label,) = [x for x in labels if x.alert_id == alert.alert_id]
    assert (label.verdict, label.labelled_by) == ("true_fall", "Home Assistant (MQTT)")

    # the person gets up: the rule resolves the acknowledged alert and the binary sensor clears
    asyncio.run(wait_until_consumed(settings, settings.kafka.topics.fall_events))  # the rule knows the answer
    send_verdicts(settings, [make_verdict(camera, seq, fall=False, start=utc_now()) for seq in range(3, 8)])
    wait_retained(worker.port, alert_topic, json_state("resolved", alert.alert_id))
    assert wait_retained(worker.port, worker.topics.room(alert.room, "person_down"), lambda p: p == b"OFF") == b"OFF"
    assert [e.state for e in alerts_of(settings, camera, count=3)] == ["open", "acknowledged", "resolved"]


def test_a_room_with_two_cameras_shows_the_alert_still_open_when_the_other_closes(worker: MqttWorker) -> None:
    settings = worker.settings
    room = f"shared {uuid.uuid4().hex[:4]}"
    alert_topic = worker.topics.room(room, "alert")

    def fall_seen_by(camera: str) -> FallEvent:
        falls = [make_verdict(camera, seq, fall=True, start=utc_now()) for seq in range(3)]
        send_verdicts(settings, [verdict.model_copy(update={"room": room}) for verdict in falls])
        (alert,) = alerts_of(settings, camera)
        return alert

    bedside = fall_seen_by(unique_camera("bedside"))
    door = fall_seen_by(unique_camera("door"))
    wait_retained(worker.port, alert_topic, json_state("open", door.alert_id))  # the newest open alert
    # the button answers the alert the topic shows: the door camera's, which was someone lying on purpose
    press(worker.port, worker.topics.room(room, "false_alarm"))
    assert [event.state for event in alerts_of(settings, door.camera_id, count=2)] == ["open", "false_alarm"]
    asyncio.run(wait_until_consumed(settings, settings.kafka.topics.fall_events))  # delivered on every channel
    shown = json.loads(wait_retained(worker.port, alert_topic, lambda payload: True))
    assert (shown["alert_id"], shown["state"]) == (bedside.alert_id, "open"), "the bedside fall is still open"


def test_the_fire_drill_reports_every_channel_and_is_never_a_label(
    worker: MqttWorker, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    settings = worker.settings
    room = f"drill {uuid.uuid4().hex[:4]}"
    env = write_config(settings, tmp_path / "drill.yaml")
    drill = subprocess.Popen(
        [sys.executable, "-m", "fallwatch", "alerts", "test", "--room", room, "--ack-wait", "30"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # the drill reaches Home Assistant, clearly marked, and someone presses Acknowledge there
        payload = json.loads(wait_retained(worker.port, worker.topics.room(room, "alert"), lambda p: b'"drill"' in p))
        assert payload["drill"] and payload["message"].startswith(f"TEST — Room {room}: fire drill, not a real alert")
        press(worker.port, worker.topics.room(room, "acknowledge"))
        out, err = drill.communicate(timeout=60)
    finally:
        if drill.poll() is None:
            drill.kill()
            drill.communicate()
    print(out)
    assert drill.returncode == 0, out + err
    header, *rows = out.splitlines()
    alert_id = header.split()[2]
    assert header == f"fire drill {alert_id} in room {room} (marked drill: not a real alert, never a label)"
    by_channel = {row.split("  ")[1].strip(): row for row in rows}
    assert sorted(by_channel) == ["acknowledged", "mqtt", "redis/dashboard", f"webhook {receiver.url}/alerts"]
    assert all("  OK  " in row for row in rows), rows
    assert "acknowledged on the MQTT button by Home Assistant (MQTT), " in by_channel["acknowledged"]
    (accepted,) = [d for d in receiver.received("/alerts", alert_id) if d.status == 200]
    assert json.loads(accepted.body)["drill"] is True

    # the answer published its label (if any) before it reached Redis, and Redis has it: read every label now
    labels = asyncio.run(read_all(settings, settings.kafka.topics.labels, Label))
    assert [label for label in labels if label.alert_id == alert_id] == [], "a drill is never a label"
    store = redis.Redis.from_url(settings.redis.url)

    def resolved() -> FallEvent | None:
        raw = store.get(alert_key(alert_id))
        stored = decode(FallEvent, raw) if raw else None
        return stored if stored is not None and stored.state == "resolved" else None

    try:
        closed = wait_for(resolved, "the drill resolved at its end, so it leaves the dashboard")
    finally:
        store.close()
    assert isinstance(closed, FallEvent) and closed.answered_by == "Home Assistant (MQTT)"


def test_a_channel_that_does_not_deliver_fails_the_drill(worker: MqttWorker, tmp_path: Path) -> None:
    # the drill checks a webhook the running service does not know: it cannot be delivered
    unknown = f"http://127.0.0.1:{free_port()}/nobody"
    settings = worker.settings.model_copy(deep=True)
    settings.alerting.webhook_urls = [unknown]
    env = write_config(settings, tmp_path / "drill.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "fallwatch", "alerts", "test", "--room", "r", "--timeout", "3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    rows = result.stdout.splitlines()[1:]
    assert [row.split("  ")[1].strip() for row in rows] == ["redis/dashboard", f"webhook {unknown}", "mqtt"]
    assert [("  OK  " in row) for row in rows] == [True, False, True]


def channel_settings(port: int, security: StackSecurity | None = None, **mqtt: object) -> Settings:
    fields: dict[str, object] = {"host": "127.0.0.1", "port": port, "topic_prefix": f"fw-{uuid.uuid4().hex[:6]}"}
    if security is not None:
        fields |= {"username": security.username, "password_file": security.password_file, "tls": True}
        fields |= {"ca_file": security.cert_file}
    return Settings(alerting={"dashboard_token": TOKEN, "mqtt": {**fields, **mqtt}})


def an_alert(room: str) -> FallEvent:
    now = utc_now()
    return FallEvent(
        alert_id=f"a-{uuid.uuid4().hex[:6]}",
        camera_id="cam",
        room=room,
        state="open",
        opened_at=now,
        first_fall_at=now,
        confidence=0.9,
        evidence_frame_ids=["f"],
        rule="3 of 5",
    )


async def channel_running(settings: Settings) -> MqttChannel:
    store = AlertStore(settings.redis, 10)

    async def no_answers(alert_id: str, action: str, by: str) -> FallEvent:
        raise AssertionError("no button is pressed here")

    channel = MqttChannel(settings, store, Notifier(settings.alerting), no_answers)
    await channel.start()
    return channel


def test_the_channel_reconnects_and_publishes_its_state_again(tmp_path: Path) -> None:
    private = LocalStack(tmp_path / "broker", cache_dir=REPO / ".cache")
    private.state_dir.mkdir(parents=True)
    port = free_port()
    broker = private.start_mosquitto(port)
    settings = channel_settings(port)
    topics = MqttTopics(settings.alerting.mqtt.topic_prefix, settings.alerting.mqtt.discovery_prefix)
    alert = an_alert("12")

    async def scenario() -> None:
        nonlocal broker
        channel = await channel_running(settings)
        try:
            await channel.alert_changed(alert)
            alert_topic = topics.room(alert.room, "alert")
            await read_retained(port, alert_topic, lambda got: alert_topic in got)
            stop_pid(broker.pid)
            broker = private.start_mosquitto(port)  # empty: no persistence
            # the state comes back without a new alert: published again on the new connection
            got = await read_retained(
                port, f"{topics.prefix}/#", lambda got: {alert_topic, topics.availability} <= got.keys()
            )
            assert json.loads(got[alert_topic])["alert_id"] == alert.alert_id
            assert got[topics.availability] == b"online"
        finally:
            await channel.close()

    try:
        asyncio.run(scenario())
    finally:
        stop_pid(broker.pid)


def test_a_room_stays_down_while_a_camera_of_another_worker_sees_the_person_down(stack_state: StackState) -> None:
    assert stack_state.mqtt is not None
    port = stack_state.mqtt.port
    settings = channel_settings(port).model_copy(update={"redis": RedisSettings(**stack_state.redis_fields())})
    topics = MqttTopics(settings.alerting.mqtt.topic_prefix, settings.alerting.mqtt.discovery_prefix)
    room = f"two-workers {uuid.uuid4().hex[:4]}"
    person_down = topics.room(room, "person_down")

    def change(camera_id: str, down: bool) -> PersonDown:
        now = utc_now()
        return PersonDown(
            camera_id=camera_id, room=room, down=down, since=now, changed_at=now, episode_id=f"e-{camera_id}",
            rule="3 of 5", confidence=0.9, evidence_frame_ids=["f"],
        )  # fmt: skip

    async def scenario() -> list[bytes]:
        # two alerting workers, each owning one camera of the room (their partitions)
        bedside, door = await channel_running(settings), await channel_running(settings)
        shown = []
        try:
            await until(lambda: bedside.connected and door.connected, "both workers connected")
            for channel, camera_id, down in ((bedside, "bedside", True), (door, "door", True), (door, "door", False)):
                await channel.person_down(change(camera_id, down))
            shown.append((await read_retained(port, person_down, lambda got: person_down in got))[person_down])
            await bedside.person_down(change("bedside", False))
            shown.append((await read_retained(port, person_down, lambda got: person_down in got))[person_down])
        finally:
            await bedside.close()
            await door.close()
        return shown

    assert asyncio.run(scenario()) == [b"ON", b"OFF"], "down while the bedside camera sees it, then up"


def test_tls_and_a_password_are_required_and_used(tmp_path: Path) -> None:
    private = LocalStack(tmp_path / "broker", cache_dir=REPO / ".cache", secure=True)
    private.state_dir.mkdir(parents=True)
    security = private.make_security()
    port = free_port()
    broker = private.start_mosquitto(port, security)
    settings = channel_settings(port, security)
    topics = MqttTopics(settings.alerting.mqtt.topic_prefix, settings.alerting.mqtt.discovery_prefix)
    tls = ssl.create_default_context(cafile=security.cert_file)

    async def scenario() -> None:
        with pytest.raises(aiomqtt.MqttError):  # anonymous, even over TLS
            async with mqtt_client(port, tls_context=tls):
                pass
        with pytest.raises(aiomqtt.MqttError):
            async with mqtt_client(port, tls_context=tls, username=security.username, password="wrong"):
                pass
        channel = await channel_running(settings)
        try:
            got = await read_retained(
                port, topics.availability, lambda got: got.get(topics.availability) == b"online",
                tls_context=tls, username=security.username, password=security.password(),
            )  # fmt: skip
            assert got[topics.availability] == b"online"
        finally:
            await channel.close()

    try:
        asyncio.run(scenario())
    finally:
        stop_pid(broker.pid)


def test_a_press_that_fails_costs_that_press_only(stack_state: StackState, tmp_path: Path) -> None:
    private = LocalStack(tmp_path / "broker", cache_dir=REPO / ".cache")
    private.state_dir.mkdir(parents=True)
    port = free_port()
    broker = private.start_mosquitto(port)
    settings = channel_settings(port).model_copy(update={"redis": stack_state.redis_settings()})
    topics = MqttTopics(settings.alerting.mqtt.topic_prefix, settings.alerting.mqtt.discovery_prefix)
    alert = an_alert(f"room-{uuid.uuid4().hex[:6]}")
    presses: list[str] = []

    async def buggy_answer(alert_id: str, action: str, by: str) -> FallEvent:
        presses.append(alert_id)
        raise RuntimeError("a bug in the answer path")

    async def pressed(count: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while len(presses) < count:
            assert time.monotonic() < deadline, f"{len(presses)} of {count} presses reached the answer"
            await asyncio.sleep(0.1)  # polling interval

    async def scenario() -> None:
        store = AlertStore(settings.redis, 10)
        notifier = Notifier(settings.alerting)
        await store.apply(alert, notifier.notification(alert))
        channel = MqttChannel(settings, store, notifier, buggy_answer)
        await channel.start()
        try:
            await read_retained(port, topics.availability, lambda got: got.get(topics.availability) == b"online")
            async with mqtt_client(port) as client:
                for count in (1, 2):  # the second press still arrives: the first one's error did not end the channel
                    await client.publish(topics.room(alert.room, "acknowledge"), b"PRESS", qos=1)
                    await pressed(count)
        finally:
            await channel.close()
            await store.close()

    try:
        asyncio.run(scenario())
    finally:
        stop_pid(broker.pid)
    assert presses == [alert.alert_id, alert.alert_id]
