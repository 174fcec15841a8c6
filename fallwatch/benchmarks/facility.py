"""`fallwatch bench facility`: how many cameras one machine carries with the whole pipeline on it.

Edge worker, cloud worker and alerting run as `python -m <service>` with tiny models on the local
stack (or a temporary one), as `bench soak` runs them; for each N a real `python -m producers`
streams N file cameras (the clips replicated, looped, in real time) at `--fps`, motion gating off
(the worst case), with the edge's offload budget at `--offload` of the frames (the switcher asks
for every one). After a warm-up, for `--seconds` it measures: frames published per second against
what the clips yield in real time, the edge's lag on `frames` (its trend in records/s), capture →
final verdict p50 / p95 of the verdicts of frames captured in the window, the frames the cameras
could not sample (behind schedule) and the producer's CPU. Between two N the producer stops and
the edge drains its backlog, so each N starts even.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import psutil

from core.kafka_io import consumer_group_lag, make_consumer, read_topic_partitions
from core.settings import CameraSettings, Settings, load_settings
from fallwatch.benchmarks.kit import bench_table, cpu_seconds, kafka_clients, read_all, show
from fallwatch.benchmarks.soak import soak_settings
from fallwatch.processes import start_services, stop_services
from fallwatch.stack import fresh_run, local_stack_settings
from producers.status import read_statuses
from producers.video import RateSampler
from schemas import Verdict

SERVICES = ("edge_workers", "cloud_workers", "alerting")
LAG_SAMPLE_S = 5.0
DRAIN_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 60.0  # an edge that has not caught up by then is measured as it is
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Row:
    cameras: int
    expected_fps: float
    published_fps: float
    lag_start: int
    lag_end: int
    lag_trend: float  # records/s, least squares over the window
    p50_s: float | None
    p95_s: float | None
    verdicts: int
    behind: int
    producer_cpu: float  # cores

    def meets(self) -> bool:
        """The issue's criteria: published within 2 % of expected, lag flat, capture → final p95 under 2 s."""
        flat = self.lag_trend < 0.05 * self.expected_fps and self.lag_end < 4 * self.expected_fps
        on_time = self.p95_s is not None and self.p95_s < 2.0
        return self.published_fps >= 0.98 * self.expected_fps and flat and on_time


def clip_rate(clip: Path, fps: float) -> float:
    """Frames per second a looped clip yields when sampled at `fps` in real time.

    Each loop restarts the schedule at the clip's first frame, right after the loop's last sample
    (a file camera is paced by its sampled frames; the rest of the file is read at once).
    """
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        time_base = stream.time_base or Fraction(1, 90_000)
        times = sorted(float(p.pts * time_base) for p in container.demux(stream) if p.pts is not None)
    sampler = RateSampler(fps)
    due = [t for t in times if sampler.due(t)]
    return len(due) / (due[-1] - due[0])


def run_facility(
    clips: list[Path], counts: list[int], fps: float, offload: float, seconds: float, warmup_s: float
) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="fallwatch-facility-") as scratch:
        scratch_dir = Path(scratch)
        with local_stack_settings(load_settings(), scratch_dir / "stack") as on_stack:
            settings = soak_settings(fresh_run(on_stack, "facility"), scratch_dir)
            settings = settings.model_copy(
                update={
                    "edge": settings.edge.model_copy(update={"switcher_threshold": 1.0, "max_offload_ratio": offload})
                }
            )
            rows = asyncio.run(facility(settings, scratch_dir, clips, counts, fps, seconds, warmup_s))
    print_table(rows, fps, offload, seconds)
    return rows


async def facility(
    settings: Settings,
    scratch_dir: Path,
    clips: list[Path],
    counts: list[int],
    fps: float,
    seconds: float,
    warmup_s: float,
) -> list[Row]:
    services = start_services(settings, scratch_dir / "services.yaml", {service: service for service in SERVICES})
    rows = []
    try:
        for count in counts:
            rows.append(await one_count(settings, scratch_dir, clips, count, fps, seconds, warmup_s))
            print_table(rows, fps, settings.edge.max_offload_ratio or 0.0, seconds)
    finally:
        stop_services(services.values(), STOP_TIMEOUT_S)
    return rows


async def one_count(
    settings: Settings, scratch_dir: Path, clips: list[Path], count: int, fps: float, seconds: float, warmup_s: float
) -> Row:
    cameras = [
        CameraSettings(
            id=f"n{count}-cam-{index}",
            room=f"n{count}-room-{index}",
            url=str(clips[index % len(clips)]),
            fps=fps,
            loop=True,
            motion={"enabled": False},
        )
        for index in range(count)
    ]
    expected = sum(clip_rate(Path(camera.url), fps) for camera in cameras)
    on_cameras = settings.model_copy(
        update={"producers": settings.producers.model_copy(update={"cameras": cameras, "status_interval_s": 1.0})}
    )
    name = f"producers-{count}"
    producer = start_services(on_cameras, scratch_dir / f"{name}.yaml", {name: "producers"})[name]
    try:
        await settle(settings, expected, warmup_s)
        process = psutil.Process(producer.pid)
        cpu_start, behind_start = cpu_seconds(process), await behind_total(on_cameras)
        frames_start = await end_offsets(settings, settings.kafka.topics.frames)
        window_start = datetime.now().astimezone()
        started = time.monotonic()
        lags: list[tuple[float, int]] = []
        while (elapsed := time.monotonic() - started) < seconds:
            lags.append(
                (elapsed, await consumer_group_lag(settings, settings.edge.group_id, settings.kafka.topics.frames))
            )
            await asyncio.sleep(LAG_SAMPLE_S)  # the sampling period of the lag series
        elapsed = time.monotonic() - started
        frames_end = await end_offsets(settings, settings.kafka.topics.frames)
        cpu = (cpu_seconds(process) - cpu_start) / elapsed
        behind = await behind_total(on_cameras) - behind_start
        window_end = datetime.now().astimezone()
    finally:
        stop_services([producer], STOP_TIMEOUT_S)
    await drain(settings)  # the window's frames get their final verdicts before they are read
    delays = await final_delays(settings, f"n{count}-", window_start, window_end)
    trend = float(np.polyfit([t for t, _ in lags], [lag for _, lag in lags], 1)[0]) if len(lags) > 1 else 0.0
    return Row(
        cameras=count,
        expected_fps=expected,
        published_fps=(frames_end - frames_start) / elapsed,
        lag_start=lags[0][1],
        lag_end=lags[-1][1],
        lag_trend=trend,
        p50_s=statistics.median(delays) if delays else None,
        p95_s=float(np.percentile(delays, 95)) if delays else None,
        verdicts=len(delays),
        behind=behind,
        producer_cpu=cpu,
    )


async def settle(settings: Settings, expected_fps: float, warmup_s: float) -> None:
    """The warm-up: `warmup_s`, then (bounded) until the edge has caught up with the cameras' start."""
    await asyncio.sleep(warmup_s)  # the producer connects and every camera reaches its steady rate
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        if await consumer_group_lag(settings, settings.edge.group_id, settings.kafka.topics.frames) < 2 * expected_fps:
            return
        await asyncio.sleep(1.0)  # polling the lag


async def behind_total(settings: Settings) -> int:
    statuses = await read_statuses(settings)
    ids = {camera.id for camera in settings.producers.cameras}
    return sum(status.get("behind", 0) for camera_id, status in statuses.items() if camera_id in ids)


async def end_offsets(settings: Settings, topic: str) -> int:
    consumer = make_consumer(settings, topic, group_id=None)
    async with kafka_clients(consumer):
        return sum((await consumer.end_offsets(await read_topic_partitions(settings, topic))).values())


async def final_delays(settings: Settings, prefix: str, window_start: datetime, window_end: datetime) -> list[float]:
    """Capture → final verdict (its produced_at) of this N's frames captured in the window, read after it."""
    return [
        (verdict.produced_at - verdict.captured_at).total_seconds()
        for verdict in await read_all(settings, settings.kafka.topics.verdicts, Verdict)
        if verdict.final and verdict.camera_id.startswith(prefix) and window_start <= verdict.captured_at <= window_end
    ]


async def drain(settings: Settings) -> None:
    """Wait (bounded) for the edge and the cloud to answer everything published so far."""
    topics = settings.kafka.topics
    groups = ((settings.edge.group_id, topics.frames), (settings.cloud.group_id, topics.cloud_requests))
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        if all([await consumer_group_lag(settings, group, topic) == 0 for group, topic in groups]):
            return
        await asyncio.sleep(1.0)  # polling the lags


def print_table(rows: list[Row], fps: float, offload: float, seconds: float) -> None:
    table = bench_table(
        f"facility: whole pipeline on this machine, file cameras at {fps:g} fps, {offload:.0%} offloaded, "
        f"motion gate off, {seconds:g} s per N",
        ("cameras", "expected frames/s", "published frames/s", "edge lag on frames (start → end, trend/s)",
         "capture → final verdict p50 / p95", "final verdicts (window)", "behind (slots)", "producer CPU",
         "meets the goal"),
    )  # fmt: skip
    for row in rows:
        table.add_row(
            str(row.cameras),
            f"{row.expected_fps:.1f}",
            f"{row.published_fps:.1f}",
            f"{row.lag_start} → {row.lag_end} ({row.lag_trend:+.1f}/s)",
            "-" if row.p50_s is None else f"{row.p50_s:.2f} / {row.p95_s:.2f} s",
            str(row.verdicts),
            str(row.behind),
            f"{row.producer_cpu:.0%} of a core",
            "yes" if row.meets() else "no",
        )
    show(table, width=200)
