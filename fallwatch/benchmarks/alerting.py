"""`fallwatch bench alerting`: time from the first fall verdict to the alert, at the default rule settings.

Runs the real alerting service (`python -m alerting`, default `alerting` settings, fresh topics
and app id) on the local stack (`fallwatch stack up`). Each row plays fall verdicts of new cameras
as they would arrive live (`--fps` frames a second, capture time = now) and measures, per camera,
the wall time from sending its first fall verdict to reading its alert on `fall-events`. The
baseline, measured in the same run, is one verdict's Kafka round trip (send → read back), the
floor under every row.

A second table follows the same alerts from their `open` on `fall-events` (the confirmed fall, its
baseline) to the room's retained MQTT alert state (a mosquitto the benchmark starts on a free port)
and to the dashboard: a blocking read of the Redis change stream `fallwatch:alert-events`, which is
what the page's live update (`/api/events`) reads.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import aiomqtt
import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.table import Table

from alerting.channels.mqtt import MqttTopics
from alerting.dashboard import STREAM_BLOCK_MS
from alerting.rules import rule_name
from alerting.store import AlertStore
from core.kafka_io import make_consumer, make_producer
from core.settings import AlertRule, ConfigError, Settings, load_settings
from fallwatch.benchmarks.kit import bench_table, kafka_clients, show
from fallwatch.processes import start_services, stop_services
from fallwatch.stack import LocalStack, free_port, fresh_run, stop_pid
from schemas import FallEvent, Verdict, VerdictSource, decode, encode, utc_now

START_TIMEOUT_S = 120.0
ALERT_TIMEOUT_S = 60.0
DELIVERY_TIMEOUT_S = 30.0
ROOM = "bench"  # every camera's room: one retained MQTT alert topic

# (a camera's n-th frame) -> (source, final, P(fall)) of its verdict
VerdictPlan = Callable[[int], tuple[VerdictSource, bool, float]]
# (path, expected wait, seconds from the first fall verdict to the alert, per camera)
Row = tuple[str, str, list[float]]
# (path, seconds to the alert, (alert on fall-events → MQTT, → dashboard) seconds, per camera)
DeliveryRow = tuple[str, list[float], list[tuple[float, float]]]


def edge_falls(_: int) -> tuple[VerdictSource, bool, float]:
    return "edge", True, 0.8


def sure_cloud_fall(_: int) -> tuple[VerdictSource, bool, float]:
    return "cloud", True, 0.95


def offloaded_cloud_down(_: int) -> tuple[VerdictSource, bool, float]:
    return "edge", False, 0.8


def verdict_now(
    camera: str, seq: int, source: VerdictSource, final: bool, probability: float, decision: bool
) -> Verdict:
    """The verdict of `camera`'s frame `seq`, captured now."""
    captured_at = utc_now()
    return Verdict(
        frame_id=f"{camera}-{int(captured_at.timestamp() * 1000)}-{seq}", camera_id=camera, room=ROOM,
        captured_at=captured_at, source=source, final=final, fall_probability=probability, decision=decision,
        edge_model="bench", cloud_model="bench" if source == "cloud" else None,
    )  # fmt: skip


class AlertWatch:
    """Reads `fall-events` from its end and remembers when each camera's first alert arrived."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self.arrived: dict[str, float] = {}
        self.alert_ids: dict[str, str] = {}

    async def run(self) -> None:
        async for record in self.consumer:
            event = decode(FallEvent, record.value)
            if event.state == "open":
                self.arrived.setdefault(event.camera_id, time.monotonic())
                self.alert_ids.setdefault(event.camera_id, event.alert_id)


class DeliveryWatch:
    """Remembers when each alert's `open` reached the room's MQTT alert topic and the dashboard's live stream."""

    def __init__(self) -> None:
        self.mqtt: dict[str, asyncio.Future[float]] = {}
        self.dashboard: dict[str, asyncio.Future[float]] = {}

    @staticmethod
    def arrival(arrivals: dict[str, asyncio.Future[float]], alert_id: str) -> asyncio.Future[float]:
        return arrivals.setdefault(alert_id, asyncio.get_running_loop().create_future())

    def seen(self, arrivals: dict[str, asyncio.Future[float]], alert_id: str) -> None:
        future = self.arrival(arrivals, alert_id)
        if not future.done():
            future.set_result(time.monotonic())

    async def watch_mqtt(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            body = json.loads(bytes(message.payload))  # type: ignore[arg-type]
            if body["state"] == "open":
                self.seen(self.mqtt, body["alert_id"])

    async def watch_dashboard(self, store: AlertStore, after: str) -> None:
        """Blocking reads of the change stream after `after`, as the dashboard's `/api/events` reads it."""
        while True:
            for entry_id, fields in await store.read_events(after, STREAM_BLOCK_MS):
                after = entry_id
                if fields["kind"] == "state" and fields["state"] == "open":
                    self.seen(self.dashboard, fields["alert_id"])

    async def after_alert(self, watch: AlertWatch, camera: str) -> tuple[float, float]:
        """Seconds from `camera`'s alert arriving on fall-events to its MQTT alert state and to the dashboard."""
        alert_id = watch.alert_ids[camera]
        try:
            async with asyncio.timeout(DELIVERY_TIMEOUT_S):
                mqtt_at = await self.arrival(self.mqtt, alert_id)
                dashboard_at = await self.arrival(self.dashboard, alert_id)
        except TimeoutError:
            raise ConfigError(
                f"alert {alert_id} not on both MQTT and the dashboard stream within {DELIVERY_TIMEOUT_S:.0f} s"
            ) from None
        return mqtt_at - watch.arrived[camera], dashboard_at - watch.arrived[camera]


async def play_camera(
    producer: AIOKafkaProducer, topic: str, watch: AlertWatch, camera: str, plan: VerdictPlan, fps: float
) -> float:
    """Send fall verdicts of `camera` at `fps` until its alert arrives; seconds from the first send to the alert."""
    first_sent: float | None = None
    seq = 0
    deadline = time.monotonic() + ALERT_TIMEOUT_S
    while camera not in watch.arrived:
        if time.monotonic() > deadline:
            raise ConfigError(f"no alert for {camera} within {ALERT_TIMEOUT_S:.0f} s: is the stack healthy?")
        due = (first_sent or time.monotonic()) + seq / fps
        await asyncio.sleep(max(0.0, due - time.monotonic()))  # pacing of a live camera
        if camera in watch.arrived:
            break
        source, final, probability = plan(seq)
        verdict = verdict_now(camera, seq, source, final, probability, decision=True)
        await producer.send_and_wait(topic, key=camera.encode(), value=encode(verdict))
        if first_sent is None:
            first_sent = time.monotonic()
        seq += 1
    assert first_sent is not None
    return watch.arrived[camera] - first_sent


async def kafka_round_trip(settings: Settings, producer: AIOKafkaProducer, samples: int) -> list[float]:
    """Baseline: send a verdict (no fall, so it opens nothing) and read it back from the topic."""
    topic = settings.kafka.topics.verdicts
    consumer = make_consumer(settings, topic, group_id=None, auto_offset_reset="latest")
    async with kafka_clients(consumer):
        await consumer.getmany(timeout_ms=500)  # joins the partitions at their end before the first send
        times = []
        for index in range(samples):
            camera = f"baseline-{uuid.uuid4().hex[:6]}"
            probe = verdict_now(camera, index, "edge", True, 0.1, decision=False)
            sent = time.monotonic()
            await producer.send_and_wait(topic, key=camera.encode(), value=encode(probe))
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                if any(r.key == camera.encode() for records in batches.values() for r in records):
                    break
            times.append(time.monotonic() - sent)
        return times


async def measure(settings: Settings, cameras: int, fps: float) -> tuple[list[Row], list[DeliveryRow]]:
    producer = make_producer(settings, linger_ms=0)
    consumer = make_consumer(settings, settings.kafka.topics.fall_events, group_id=None, auto_offset_reset="latest")
    mqtt = settings.alerting.mqtt
    client = aiomqtt.Client(mqtt.host, mqtt.port, timeout=mqtt.connect_timeout_s)
    store = AlertStore(settings.redis, settings.alerting.stream_maxlen)
    try:
        async with kafka_clients(producer, consumer), client:
            await client.subscribe(MqttTopics(mqtt.topic_prefix, mqtt.discovery_prefix).room(ROOM, "alert"), qos=1)
            watch, deliveries = AlertWatch(consumer), DeliveryWatch()
            watchers = [
                asyncio.create_task(watch.run()),
                asyncio.create_task(deliveries.watch_mqtt(client)),
                asyncio.create_task(deliveries.watch_dashboard(store, await store.last_event_id())),
            ]
            try:
                return await play_scenarios(settings, producer, watch, deliveries, cameras, fps)
            finally:
                for watcher in watchers:
                    watcher.cancel()
                await asyncio.gather(*watchers, return_exceptions=True)
    finally:
        await store.close()


def sure_cloud_scenario(rule: AlertRule, fps: float, down_wait_s: float) -> tuple[str, str, VerdictPlan]:
    """Sure cloud verdicts: with the fast path on the second one confirms; off (the default) they wait like any."""
    if rule.confirm_within_s > 0:
        return "sure cloud verdicts (p 0.95): the second confirms", f"{1 / fps:.1f}", sure_cloud_fall
    return "sure cloud verdicts (p 0.95), fast path off: as k of n", f"{down_wait_s:.1f}", sure_cloud_fall


async def play_scenarios(
    settings: Settings,
    producer: AIOKafkaProducer,
    watch: AlertWatch,
    deliveries: DeliveryWatch,
    cameras: int,
    fps: float,
) -> tuple[list[Row], list[DeliveryRow]]:
    rule = settings.alerting
    verdicts = settings.kafka.topics.verdicts
    # warm-up: the first alert also waits for the worker's group join and table recovery, and its MQTT
    # message for the channel's connection to the broker
    warmup = f"warmup-{uuid.uuid4().hex[:6]}"
    await play_camera(producer, verdicts, watch, warmup, sure_cloud_fall, fps)
    await deliveries.after_alert(watch, warmup)
    baseline = await kafka_round_trip(settings, producer, 10)
    rows: list[Row] = [("baseline: one verdict's Kafka round trip", "-", baseline)]
    # the frame at which k falls have lasted down_for_s, after the first
    down_wait_s = max(rule.k - 1, math.ceil(rule.down_for_s * fps - 1e-9)) / fps
    scenarios: list[tuple[str, str, VerdictPlan]] = [
        sure_cloud_scenario(rule, fps, down_wait_s),
        (f"{rule_name(rule)} final edge falls at {fps:g} fps", f"{down_wait_s:.1f}", edge_falls),
        (
            f"offloaded, cloud down: edge-fallback after D = {rule.cloud_wait_s:g} s",
            f"{rule.cloud_wait_s + down_wait_s:.1f}",
            offloaded_cloud_down,
        ),
    ]
    delivered: list[DeliveryRow] = []
    for name, expected, plan in scenarios:
        names = [f"bench-{uuid.uuid4().hex[:6]}" for _ in range(cameras)]
        times = [await play_camera(producer, verdicts, watch, camera, plan, fps) for camera in names]
        rows.append((name, expected, times))
        delivered.append((name, times, [await deliveries.after_alert(watch, camera) for camera in names]))
    return rows, delivered


def bench_settings(state_dir: Path, mqtt_port: int) -> Settings:
    """The local stack's Kafka and Redis, the benchmark's broker, fresh topics (created) and app id;
    every alerting rule setting at its default."""
    base = load_settings()
    settings = Settings(
        state_dir=state_dir, log_level="WARNING", kafka=base.kafka.model_dump(), redis=base.redis.model_dump(),
        alerting={"mqtt": {"host": "127.0.0.1", "port": mqtt_port}},
    )  # fmt: skip
    return fresh_run(settings, "bench")


def delivery_table(rows: list[DeliveryRow]) -> Table:
    table = bench_table(
        "the same alerts, medians from the first fall verdict: open on fall-events (the confirmed fall, baseline), "
        "the room's retained MQTT alert state, the dashboard's live stream (a blocking XREAD of "
        "fallwatch:alert-events, as /api/events reads it); 'after' = minus the alert's fall-events arrival",
        (
            "path", "fall-events (s)", "MQTT (s)", "dashboard (s)",
            "MQTT after, median (s)", "max (s)", "dashboard after, median (s)", "max (s)",
        ),
        labels=1,
    )  # fmt: skip
    median = statistics.median
    for name, times, after in rows:
        mqtt_after, dashboard_after = [mqtt for mqtt, _ in after], [dashboard for _, dashboard in after]
        to_mqtt = [seconds + mqtt for seconds, mqtt in zip(times, mqtt_after, strict=True)]
        to_dashboard = [seconds + dashboard for seconds, dashboard in zip(times, dashboard_after, strict=True)]
        figures = [median(times), median(to_mqtt), median(to_dashboard)]
        figures += [median(mqtt_after), max(mqtt_after), median(dashboard_after), max(dashboard_after)]
        table.add_row(name, *(f"{value:.3f}" for value in figures))
    return table


def bench_alerting(
    cameras: Annotated[int, typer.Option(help="cameras (alerts) per row")] = 5,
    fps: Annotated[float, typer.Option(help="verdicts per second of each camera, as a live camera sends")] = 2.0,
) -> None:
    """Alerting: seconds from a camera's first fall verdict to its alert, per confirmation path, and on to
    its MQTT message and the dashboard."""
    with tempfile.TemporaryDirectory(prefix="fallwatch-bench-alerting-") as tmp, ExitStack() as started:
        broker_dir = Path(tmp) / "mosquitto"
        broker_dir.mkdir()
        broker = LocalStack(broker_dir, cache_dir=broker_dir).start_mosquitto(free_port())  # no Kafka: nothing cached
        started.callback(stop_pid, broker.pid)
        settings = bench_settings(Path(tmp), broker.port)
        services = start_services(settings, Path(tmp) / "alerting.yaml", {"alerting": "alerting"})
        started.callback(stop_services, services.values())
        rows, delivered = asyncio.run(asyncio.wait_for(measure(settings, cameras, fps), START_TIMEOUT_S + 600))
    table = bench_table(
        f"alerting at default settings: first fall verdict → alert on fall-events, {cameras} cameras per row",
        ("path", "expected wait (s)", "median (s)", "max (s)", "median − baseline (s)"),
        labels=1,
    )
    baseline = statistics.median(rows[0][2])
    for name, expected, times in rows:
        median = statistics.median(times)
        table.add_row(name, expected, f"{median:.3f}", f"{max(times):.3f}", f"{median - baseline:.3f}")
    show(table, delivery_table(delivered), width=200)
