"""`fallwatch bench soak`: the whole pipeline for N minutes; each service's memory and each consumer's lag over time.

Edge worker, cloud worker and alerting run as `python -m <service>` with tiny models on the running local
stack (or a temporary one); cameras are simulated in this process at a steady rate (noise JPEGs, so the
switcher offloads a share to the cloud). Every `--sample-s` the table gets a row: resident memory (RSS) of
each service and the lag of each consumer group (records not committed yet). A leak shows as memory that
keeps growing after the first minutes; a service that cannot keep up as a lag that keeps growing.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psutil
from aiokafka.errors import KafkaError

from core.kafka_io import consumer_group_lag, make_producer
from core.settings import Settings, load_settings
from fallwatch.benchmarks.kit import bench_table, camera_frame, kafka_clients, noise_jpegs, show
from fallwatch.devkit.models import build_tiny_models
from fallwatch.processes import start_services, stop_services
from fallwatch.stack import fresh_run, local_stack_settings
from schemas import encode, utc_now

SERVICES = ("edge_workers", "cloud_workers", "alerting")
SIZE = (240, 320)  # height, width of the simulated cameras' frames


@dataclass(frozen=True)
class Sample:
    elapsed_s: float
    frames_sent: int
    rss_mb: dict[str, float]
    lags: dict[str, int | None]  # consumer group → records behind (None: not known yet)
    alive: dict[str, bool]


def run_soak(minutes: float, cameras: int, fps: float, sample_s: float) -> list[Sample]:
    with tempfile.TemporaryDirectory(prefix="fallwatch-soak-") as scratch:
        scratch_dir = Path(scratch)
        with local_stack_settings(load_settings(), scratch_dir / "stack") as on_stack:
            settings = soak_settings(fresh_run(on_stack, "soak"), scratch_dir)
            samples = asyncio.run(soak(settings, scratch_dir, minutes, cameras, fps, sample_s))
    print_table(samples)
    return samples


def soak_settings(settings: Settings, scratch_dir: Path) -> Settings:
    models = build_tiny_models(scratch_dir / "models").settings_sections()
    return settings.model_copy(
        update={
            "state_dir": scratch_dir / "state",
            "edge": settings.edge.model_copy(
                update={
                    "model": models["edge"]["model"],
                    "switcher_registry": Path(models["edge"]["switcher_registry"]),
                    "switcher_threshold": 0.5,
                    "torch_threads": 1,
                }
            ),
            "cloud": settings.cloud.model_copy(update={"model": models["cloud"]["model"], "torch_threads": 1}),
        }
    )


async def soak(
    settings: Settings, scratch_dir: Path, minutes: float, cameras: int, fps: float, sample_s: float
) -> list[Sample]:
    processes = start_services(settings, scratch_dir / "soak.yaml", {service: service for service in SERVICES})
    topics = settings.kafka.topics
    groups = {  # the column name: the topic each service consumes
        "frames": (settings.edge.group_id, topics.frames),
        "cloud-requests": (settings.cloud.group_id, topics.cloud_requests),
        "verdicts": (settings.alerting.app_id, topics.verdicts),
    }
    samples: list[Sample] = []
    try:
        producer = make_producer(settings)
        async with kafka_clients(producer):
            started = time.monotonic()
            end = started + minutes * 60
            next_sample = started + sample_s  # the first row once the services had time to start
            sent = 0
            jpegs = noise_jpegs(2, SIZE)
            while True:
                now = time.monotonic()
                if now >= next_sample or now >= end:
                    samples.append(await sample(now - started, sent, processes, groups, settings))
                    next_sample += sample_s
                    if now >= end:
                        break
                captured_at = utc_now()
                for camera in range(cameras):
                    camera_id = f"soak-cam-{camera}"
                    frame = camera_frame(camera_id, f"room-{camera}", sent, captured_at, jpegs[sent % len(jpegs)], SIZE)
                    await producer.send(settings.kafka.topics.frames, key=camera_id.encode(), value=encode(frame))
                    sent += 1
                await asyncio.sleep(1 / fps)  # the cameras' frame rate
    finally:
        stop_services(processes.values())
    return samples


async def sample(
    elapsed_s: float,
    sent: int,
    processes: dict[str, subprocess.Popen[bytes]],
    groups: dict[str, tuple[str, str]],
    settings: Settings,
) -> Sample:
    rss: dict[str, float] = {}
    alive: dict[str, bool] = {}
    for service, process in processes.items():
        alive[service] = process.poll() is None
        try:
            rss[service] = psutil.Process(process.pid).memory_info().rss / 2**20 if alive[service] else 0.0
        except psutil.NoSuchProcess:
            rss[service] = 0.0
    lags: dict[str, int | None] = {}
    for name, (group, topic) in groups.items():
        try:
            lags[name] = await consumer_group_lag(settings, group, topic)
        except KafkaError:  # the group has no coordinator yet (a fresh broker creates its offsets topic)
            lags[name] = None
    return Sample(elapsed_s, sent, rss, lags, alive)


def print_table(samples: list[Sample]) -> None:
    if not samples:
        return
    table = bench_table(
        "soak: resident memory (MB) of each service and lag (records) of each consumer group",
        ("elapsed", "frames sent", *(f"{service.removesuffix('_workers')} MB" for service in samples[0].rss_mb),
         *(f"lag {topic}" for topic in samples[0].lags)),
    )  # fmt: skip
    for s in samples:
        memory = [f"{mb:.0f}" if s.alive[service] else "DEAD" for service, mb in s.rss_mb.items()]
        table.add_row(
            str(timedelta(seconds=round(s.elapsed_s))),
            str(s.frames_sent),
            *memory,
            *("?" if lag is None else str(lag) for lag in s.lags.values()),
        )
    show(table, width=120)
    # the first sample may catch the services still warming up: growth counts from the second
    warm = samples[1] if len(samples) > 2 else samples[0]
    growth = {service: samples[-1].rss_mb[service] - warm.rss_mb[service] for service in warm.rss_mb}
    print(
        f"memory growth {timedelta(seconds=round(warm.elapsed_s))} → last sample: "
        + ", ".join(f"{k} {v:+.0f} MB" for k, v in growth.items())
    )
