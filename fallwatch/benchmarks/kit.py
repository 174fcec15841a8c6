"""What every `fallwatch bench` measurement (and the tests) build on: inputs, timers, Kafka readers and tables."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console, RenderableType
from rich.table import Table

from core.images import decode_known_jpeg_rgb, encode_jpeg, encode_jpeg_rgb
from core.kafka_io import make_consumer, read_topic_partitions
from core.settings import Settings
from schemas import Frame, Message, Verdict, decode

T = TypeVar("T")
M = TypeVar("M", bound=Message)

CAMERA_SIZE = (480, 640)  # height, width of the frames the benchmarks feed
SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "falls-fallaction" / "images"


# --- inputs -----------------------------------------------------------------------------------
def camera_images(count: int = 16) -> list[np.ndarray]:
    """Camera-sized RGB frames: real fall images when ../shared is beside the checkout, else noise."""
    height, width = CAMERA_SIZE
    paths = sorted(SHARED_IMAGES.glob("*.jpg"))[:count] if SHARED_IMAGES.is_dir() else []
    if paths:
        return [
            cv2.resize(decode_known_jpeg_rgb(path.read_bytes()), (width, height), interpolation=cv2.INTER_AREA)
            for path in paths
        ]
    rng = np.random.default_rng(0)
    return [cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), np.uint8), (31, 31), 0) for _ in range(count)]


def camera_jpegs(count: int = 16) -> list[bytes]:
    """`camera_images` as a camera sends them."""
    return [encode_jpeg_rgb(image) for image in camera_images(count)]


def noise_jpegs(count: int, size: tuple[int, int]) -> list[bytes]:
    """JPEGs of uniform noise (height, width): frames no switcher is sure about, so a share goes to the cloud."""
    rng = np.random.default_rng(0)
    return [encode_jpeg(rng.integers(0, 256, (*size, 3), dtype=np.uint8), quality=95) for _ in range(count)]


def camera_frame(camera: str, room: str, seq: int, captured_at: datetime, jpeg: bytes, size: tuple[int, int]) -> Frame:
    """A camera's frame `seq` as the producer publishes it; `size` is (height, width)."""
    height, width = size
    return Frame(
        frame_id=Frame.make_id(camera, captured_at, seq), camera_id=camera, room=room, seq=seq,
        captured_at=captured_at, width=width, height=height, jpeg=jpeg,
    )  # fmt: skip


# --- timers -----------------------------------------------------------------------------------
def seconds_of(call: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def alternating(calls: Mapping[str, Callable[[], T]], rounds: int, warm_up: bool = False) -> dict[str, list[T]]:
    """What each call returns, round by round: every call once per round, in turn, so load from other work
    on the machine falls on all of them alike. `warm_up`: one discarded call of each first (first calls
    allocate and pick kernels)."""
    if warm_up:
        for call in calls.values():
            call()
    results: dict[str, list[T]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            results[name].append(call())
    return results


def cpu_seconds(process: psutil.Process | None = None) -> float:
    """User + system CPU seconds of `process` (every thread), or of this process."""
    if process is None:
        return time.process_time()
    times = process.cpu_times()
    return times.user + times.system


@dataclass(frozen=True)
class CpuClock:
    process_s: float  # this process, every thread
    machine_busy_s: float  # every core of the machine, from /proc/stat


def cpu_clock() -> CpuClock:
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return CpuClock(cpu_seconds(), (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"))


# --- Kafka ------------------------------------------------------------------------------------
@asynccontextmanager
async def kafka_clients(*clients: AIOKafkaConsumer | AIOKafkaProducer) -> AsyncIterator[None]:
    """The clients started, and stopped again on the way out (the last started first)."""
    async with AsyncExitStack() as stack:
        for client in clients:
            await client.start()
            stack.push_async_callback(client.stop)
        yield


async def read_verdicts(consumer: AIOKafkaConsumer, count: int, timeout_s: float) -> list[Verdict]:
    """Read on until `count` more frames have a verdict (a frame answered twice counts once).

    A Kafka consumer sleeps in a long poll until verdicts arrive, where polling a worker's metrics
    would wake the event loop every few milliseconds and take the GIL from the model's thread (that
    made the edge worker's ViLT forward ~4 % slower than the same forward in the raw loop).
    """
    verdicts: dict[str, Verdict] = {}
    deadline = time.monotonic() + timeout_s
    while len(verdicts) < count:
        if (left_s := deadline - time.monotonic()) <= 0:
            raise TimeoutError(f"only {len(verdicts)} of {count} verdicts after {timeout_s:.0f} s")
        batches = await consumer.getmany(timeout_ms=int(left_s * 1000))
        for record in (record for records in batches.values() for record in records):
            verdict = decode(Verdict, record.value)
            verdicts[verdict.frame_id] = verdict
    return list(verdicts.values())


async def read_all(settings: Settings, topic: str, model: type[M]) -> list[M]:
    """Everything on `topic` up to its end offsets now."""
    consumer = make_consumer(settings, topic, group_id=None)
    messages: list[M] = []
    async with kafka_clients(consumer):
        partitions = await read_topic_partitions(settings, topic)
        end = await consumer.end_offsets(partitions)
        while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
            batches = await consumer.getmany(timeout_ms=1000)
            messages += [decode(model, record.value) for records in batches.values() for record in records]
    return messages


# --- tables -----------------------------------------------------------------------------------
def bench_table(title: str, columns: Iterable[str], labels: int = 0) -> Table:
    """A table of figures: its first `labels` columns left-aligned text, the others right-aligned numbers."""
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index < labels else "right")
    return table


def optional(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def show(*renderables: RenderableType, width: int = 160) -> None:
    """Print tables and lines on a console this wide (wide tables would wrap on a narrow terminal)."""
    console = Console(width=width)
    for renderable in renderables:
        console.print(renderable)
