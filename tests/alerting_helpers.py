"""What the alerting and dashboard tests share: verdicts, the worker subprocess, topic reads, a webhook receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import cv2
import pytest
from aiokafka import TopicPartition
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from core.images import encode_jpeg
from core.kafka_io import make_admin, make_consumer, make_producer, topic_configs
from core.settings import Settings
from fallwatch.stack import StackState, free_port
from schemas import FallEvent, Frame, Message, Verdict, VerdictSource, encode, utc_now
from tests.conftest import REPO, consume_until, settings_for, write_config

M = TypeVar("M", bound=Message)

# an hour ago, to the second: consumers refuse capture times far from their clock (capture_time settings)
T0 = utc_now().replace(microsecond=0) - timedelta(hours=1)
WAIT_S = 30.0
WEBHOOK_SECRET = "test-webhook-secret"


def make_verdict(
    camera_id: str,
    seq: int,
    fall: bool,
    at_s: float | None = None,
    final: bool = True,
    fall_probability: float | None = None,
    source: VerdictSource = "edge",
    start: datetime = T0,
) -> Verdict:
    """Frame `seq` of a camera, captured `at_s` seconds after `start` (by default `seq` s: one frame a second)."""
    captured_at = start + timedelta(seconds=seq if at_s is None else at_s)
    probability = fall_probability if fall_probability is not None else (0.9 if fall else 0.1)
    return Verdict(
        frame_id=f"{camera_id}-{int(captured_at.timestamp() * 1000)}-{seq}",
        camera_id=camera_id,
        room=f"room-of-{camera_id}",
        captured_at=captured_at,
        source=source,
        final=final,
        fall_probability=probability,
        decision=fall,
        edge_model="tiny-vilt",
        cloud_model="tiny-llava" if source == "cloud" else None,
    )


def an_open_alert(name: str) -> tuple[FallEvent, Verdict]:
    """An open alert of a new camera, as the rule opens it on one fall verdict (whose frame is its evidence)."""
    verdict = make_verdict(unique_camera(name), 0, fall=True)
    alert = FallEvent(
        alert_id=f"alert-of-{verdict.camera_id}",
        camera_id=verdict.camera_id,
        room=verdict.room,
        state="open",
        opened_at=verdict.captured_at,
        first_fall_at=verdict.captured_at,
        confidence=0.9,
        evidence_frame_ids=[verdict.frame_id],
        rule="3 of 5",
    )
    return alert, verdict


def unique_camera(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def alerts_for(events: list[FallEvent], camera_id: str) -> list[FallEvent]:
    return [event for event in events if event.camera_id == camera_id]


def alerting_settings(stack_state: StackState, tmp_path: Path, **rules: object) -> Settings:
    # a fresh app id: its consumer group and its table's changelog topic are this test's alone
    alerting = {
        "k": 3,
        "n": 5,
        "window_s": 30.0,
        "cooldown_s": 60.0,
        # the mechanics of the service: no duration to wait for, the sure-cloud pair on
        "down_for_s": 0.0,
        "up_after_s": 0.0,
        "confirm_within_s": 2.0,
        "tick_s": 0.2,
        **rules,
    }
    return settings_for(stack_state, tmp_path, alerting=alerting)


@contextmanager
def alerting_worker(settings: Settings, tmp_path: Path) -> Iterator[Path]:
    """`python -m alerting` with these settings (yields its log); on exit SIGTERM it and check it stopped cleanly."""
    env = write_config(settings, tmp_path / f"cfg-{uuid.uuid4().hex[:4]}.yaml")
    log_path = tmp_path / f"alerting-{uuid.uuid4().hex[:4]}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "alerting"], cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    started_at = time.monotonic()
    try:
        yield log_path
    finally:
        process.send_signal(signal.SIGTERM)
        stopping_at = time.monotonic()
        try:
            returncode = process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        stop_s = time.monotonic() - stopping_at
        print(f"alerting ran {stopping_at - started_at:.1f} s, stopped {stop_s:.1f} s after SIGTERM")
        assert returncode == 0, log_path.read_text()[-3000:]


async def produce(settings: Settings, topic: str, records: list[tuple[str, bytes]]) -> None:
    """Send (key, value) records to `topic` and wait until the broker acked them all."""
    producer = make_producer(settings)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, key=key.encode(), value=value)
    finally:
        await producer.stop()


async def set_topic_configs(settings: Settings, topic: str, configs: dict[str, str]) -> None:
    """Change configs of a topic (e.g. `max.message.bytes`, to make the broker refuse records); returns once
    the broker says they are in effect (it applies a change after acknowledging it)."""
    admin = make_admin(settings)
    await admin.start()
    deadline = time.monotonic() + WAIT_S
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
        while {key: (await topic_configs(admin, [topic]))[topic].get(key) for key in configs} != configs:
            if time.monotonic() > deadline:
                pytest.fail(f"the configs {configs} of {topic} never took effect")
            await asyncio.sleep(0.05)  # polling the broker's view of the topic
    finally:
        await admin.close()


def send_verdicts(settings: Settings, verdicts: list[Verdict]) -> None:
    asyncio.run(produce(settings, settings.kafka.topics.verdicts, as_records(verdicts)))


def send_events(settings: Settings, events: list[FallEvent]) -> None:
    """State changes as the dashboard publishes them."""
    asyncio.run(produce(settings, settings.kafka.topics.fall_events, as_records(events)))


def as_records(messages: list[Verdict] | list[FallEvent]) -> list[tuple[str, bytes]]:
    return [(message.camera_id, encode(message)) for message in messages]


async def read_until(
    settings: Settings, topic: str, model: type[M], done: Callable[[list[M]], bool], timeout_s: float = WAIT_S
) -> list[M]:
    """`consume_until` with the alerting tests' shorter deadline."""
    return await consume_until(settings, topic, model, done, timeout_s)


def alerts_of(settings: Settings, camera_id: str, count: int = 1, timeout_s: float = WAIT_S) -> list[FallEvent]:
    """Wait until `fall-events` holds at least `count` events of this camera; returns them."""
    events = asyncio.run(
        read_until(
            settings,
            settings.kafka.topics.fall_events,
            FallEvent,
            lambda got: len(alerts_for(got, camera_id)) >= count,
            timeout_s,
        )
    )
    return alerts_for(events, camera_id)


async def wait_until_consumed(settings: Settings, *topics: str, timeout_s: float = WAIT_S) -> None:
    """Wait until the app's group committed every record sent so far to `topics` (default: verdicts).

    faust flushes what the agent sent for a record before it commits the
    record's offset, so afterwards every alert those records caused is on
    `fall-events`: a missing alert is really missing, not late.
    """
    consumer = make_consumer(settings, group_id=None)
    admin = make_admin(settings)
    await consumer.start()
    await admin.start()
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in (topics or (settings.kafka.topics.verdicts,))
            for p in range(settings.kafka.partitions)
        ]
        end = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout_s
        while True:
            committed = await admin.list_consumer_group_offsets(settings.alerting.app_id, partitions=partitions)
            behind = {
                tp: end[tp] - committed[tp].offset
                for tp in partitions
                if end[tp] > 0 and (tp not in committed or committed[tp].offset < end[tp])
            }
            if not behind:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"alerting did not commit the records within {timeout_s:.0f} s: {behind}")
            await asyncio.sleep(0.2)  # polling interval of the committed offsets, not a synchronisation
    finally:
        await admin.close()
        await consumer.stop()


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> object:
    """Poll `condition` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)  # polling interval


def fall_with_frames(settings: Settings, clip_path: Path, name: str) -> FallEvent:
    """Three fall verdicts of a new camera, their frames (real JPEGs) on `frames`; returns the alert."""
    camera = unique_camera(name)
    verdicts = [make_verdict(camera, seq, fall=True, start=utc_now()) for seq in range(3)]
    capture = cv2.VideoCapture(str(clip_path))
    ok, image = capture.read()
    capture.release()
    assert ok
    jpeg = encode_jpeg(image)
    frames = [
        Frame(
            frame_id=v.frame_id,
            camera_id=camera,
            room=v.room,
            seq=seq,
            captured_at=v.captured_at,
            width=image.shape[1],
            height=image.shape[0],
            jpeg=jpeg,
        )
        for seq, v in enumerate(verdicts)
    ]
    asyncio.run(produce(settings, settings.kafka.topics.frames, [(camera, encode(f)) for f in frames]))
    send_verdicts(settings, verdicts)
    (alert,) = alerts_of(settings, camera)
    return alert


# --- a webhook receiver --------------------------------------------------------------------------


@dataclass
class Delivery:
    path: str
    event: str
    idempotency_key: str
    signature_valid: bool
    status: int
    body: bytes

    @property
    def alert_id(self) -> str:
        """The alert the idempotency key names (`<alert id>:<event>`)."""
        return self.idempotency_key.rpartition(":")[0]


@dataclass
class WebhookReceiver:
    """A real HTTP server that checks each signature and refuses the first try of every notification."""

    secret: str
    port: int = field(default_factory=free_port)
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def received(self, path: str, alert_id: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.path == path and d.alert_id == alert_id]

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> int:
        timestamp = headers.get("X-Fallwatch-Timestamp", "")
        # checked here independently of alerting.webhooks: HMAC-SHA256 over "timestamp.body"
        digest = hmac.new(self.secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        expected = f"sha256={digest}"
        valid = hmac.compare_digest(expected, headers.get("X-Fallwatch-Signature", "")) and (
            abs(time.time() - int(timestamp or 0)) < 300
        )
        key = headers.get("Idempotency-Key", "")
        with self.lock:
            first_try = not any(d.path == path and d.idempotency_key == key for d in self.deliveries)
            status = 401 if not valid else (503 if first_try else 200)
            self.deliveries.append(Delivery(path, headers.get("X-Fallwatch-Event", ""), key, valid, status, body))
        return status

    @contextmanager
    def running(self) -> Iterator[WebhookReceiver]:
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.reply(receiver.handle(self.path, dict(self.headers.items()), body))

        with http_server(Handler, self.port):
            yield self


class QuietHandler(BaseHTTPRequestHandler):
    """A test receiver's request handler: empty replies, no log lines (the test reports what matters)."""

    def reply(self, status: int, **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler], port: int | None = None) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 in a thread; its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", port or free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def body_alert_id(delivery: Delivery) -> str:
    return str(json.loads(delivery.body)["alert_id"])
