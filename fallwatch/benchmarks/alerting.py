"""`fallwatch bench alerting`: time from the first fall verdict to the alert, at the default rule settings.

Runs the real alerting service (`python -m alerting`, default `alerting` settings, fresh topics
and app id) on the local stack (`fallwatch stack up`). Each row plays fall verdicts of new cameras
as they would arrive live (`--fps` frames a second, capture time = now) and measures, per camera,
the wall time from sending its first fall verdict to reading its alert on `fall-events`. The
baseline, measured in the same run, is one verdict's Kafka round trip (send → read back), the
floor under every row.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from alerting.rules import rule_name
from core.kafka_io import make_consumer, make_producer
from core.settings import ConfigError, Settings, load_settings
from fallwatch.benchmarks.kit import bench_table, kafka_clients, show
from fallwatch.processes import start_services, stop_services
from fallwatch.stack import fresh_run
from schemas import FallEvent, Verdict, VerdictSource, decode, encode, utc_now

START_TIMEOUT_S = 120.0
ALERT_TIMEOUT_S = 60.0

# (a camera's n-th frame) -> (source, final, P(fall)) of its verdict
VerdictPlan = Callable[[int], tuple[VerdictSource, bool, float]]


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
        frame_id=f"{camera}-{int(captured_at.timestamp() * 1000)}-{seq}", camera_id=camera, room="bench",
        captured_at=captured_at, source=source, final=final, fall_probability=probability, decision=decision,
        edge_model="bench", cloud_model="bench" if source == "cloud" else None,
    )  # fmt: skip


class AlertWatch:
    """Reads `fall-events` from its end and remembers when each camera's first alert arrived."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self.arrived: dict[str, float] = {}

    async def run(self) -> None:
        async for record in self.consumer:
            event = decode(FallEvent, record.value)
            if event.state == "open":
                self.arrived.setdefault(event.camera_id, time.monotonic())


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


async def measure(settings: Settings, cameras: int, fps: float) -> list[tuple[str, str, list[float]]]:
    producer = make_producer(settings, linger_ms=0)
    consumer = make_consumer(settings, settings.kafka.topics.fall_events, group_id=None, auto_offset_reset="latest")
    async with kafka_clients(producer, consumer):
        watch = AlertWatch(consumer)
        watcher = asyncio.create_task(watch.run())
        try:
            return await play_scenarios(settings, producer, watch, cameras, fps)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


async def play_scenarios(
    settings: Settings, producer: AIOKafkaProducer, watch: AlertWatch, cameras: int, fps: float
) -> list[tuple[str, str, list[float]]]:
    rule = settings.alerting
    verdicts = settings.kafka.topics.verdicts
    # warm-up: the first alert also waits for the worker's group join and table recovery
    await play_camera(producer, verdicts, watch, f"warmup-{uuid.uuid4().hex[:6]}", sure_cloud_fall, fps)
    rows = [("baseline: one verdict's Kafka round trip", "-", await kafka_round_trip(settings, producer, 10))]
    # the frame at which k falls have lasted down_for_s, after the first
    down_wait_s = max(rule.k - 1, math.ceil(rule.down_for_s * fps - 1e-9)) / fps
    scenarios: list[tuple[str, str, VerdictPlan]] = [
        ("sure cloud verdicts (p 0.95): the second confirms", f"{1 / fps:.1f}", sure_cloud_fall),
        (f"{rule_name(rule)} final edge falls at {fps:g} fps", f"{down_wait_s:.1f}", edge_falls),
        (
            f"offloaded, cloud down: edge-fallback after D = {rule.cloud_wait_s:g} s",
            f"{rule.cloud_wait_s + down_wait_s:.1f}",
            offloaded_cloud_down,
        ),
    ]
    for name, expected, plan in scenarios:
        times = [
            await play_camera(producer, verdicts, watch, f"bench-{uuid.uuid4().hex[:6]}", plan, fps)
            for _ in range(cameras)
        ]
        rows.append((name, expected, times))
    return rows


def bench_settings(state_dir: Path) -> Settings:
    """The local stack's addresses, fresh topics (created) and app id; every alerting rule setting at its default."""
    base = load_settings()
    settings = Settings(
        state_dir=state_dir, log_level="WARNING", kafka=base.kafka.model_dump(), redis=base.redis.model_dump()
    )
    return fresh_run(settings, "bench")


def bench_alerting(
    cameras: Annotated[int, typer.Option(help="cameras (alerts) per row")] = 5,
    fps: Annotated[float, typer.Option(help="verdicts per second of each camera, as a live camera sends")] = 2.0,
) -> None:
    """Alerting: seconds from a camera's first fall verdict to its alert, per confirmation path."""
    with tempfile.TemporaryDirectory(prefix="fallwatch-bench-alerting-") as tmp:
        settings = bench_settings(Path(tmp))
        services = start_services(settings, Path(tmp) / "alerting.yaml", {"alerting": "alerting"})
        try:
            rows = asyncio.run(asyncio.wait_for(measure(settings, cameras, fps), START_TIMEOUT_S + 600))
        finally:
            stop_services(services.values())
    table = bench_table(
        f"alerting at default settings: first fall verdict → alert on fall-events, {cameras} cameras per row",
        ("path", "expected wait (s)", "median (s)", "max (s)", "median − baseline (s)"),
        labels=1,
    )
    baseline = statistics.median(rows[0][2])
    for name, expected, times in rows:
        median = statistics.median(times)
        table.add_row(name, expected, f"{median:.3f}", f"{max(times):.3f}", f"{median - baseline:.3f}")
    show(table, width=200)
