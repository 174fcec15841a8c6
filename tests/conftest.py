"""Shared fixtures: the real local stack (Kafka KRaft + redis-server) once per session.

Each test gets its own topic names (a unique prefix) on that stack, so tests do
not see each other's records; services under test get the same settings either
as an object or as a YAML file (`FALLWATCH_CONFIG`) for subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import cv2
import numpy as np
import pytest
from aiokafka.errors import GroupCoordinatorNotAvailableError

from core.kafka_io import consumer_group_lag, make_admin, make_consumer, topic_specs
from core.settings import Settings
from edge_workers.model import ViltEdgeModel
from edge_workers.switcher import create_untrained_switcher
from fallwatch.benchmarks.kit import read_all as read_all  # the tests read topics as the benchmarks do
from fallwatch.devkit.models import ModelPaths, build_tiny_models
from fallwatch.devkit.tiny_cloud import set_fall_bias as set_cloud_fall_bias
from fallwatch.devkit.tiny_edge import set_fall_bias as set_edge_fall_bias
from fallwatch.processes import write_config
from fallwatch.stack import LocalStack, StackState, fresh_run
from schemas import Message, decode

M = TypeVar("M", bound=Message)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
FALL_CLIPS = SHARED_DATASETS / "fall-clips"


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("stack"), cache_dir=REPO / ".cache", partitions=4)
    stack.up(topic_specs(Settings()))
    yield stack
    stack.down()


@pytest.fixture(scope="session")
def stack_state(local_stack: LocalStack) -> StackState:
    state = local_stack.read_state()
    assert state is not None
    return state


def settings_for(
    stack_state: StackState, tmp_path: Path, kafka: dict[str, object] | None = None, **sections: object
) -> Settings:
    """Settings pointing at a stack (`kafka`: more Kafka settings), a run of one test: its own topics, consumer
    groups and alerting app (fallwatch.stack.fresh_run, as the benchmarks and the demo scope theirs)."""
    settings = Settings(
        state_dir=tmp_path / "state",
        kafka={**stack_state.kafka_fields(), **(kafka or {})},
        redis=stack_state.redis_fields(),
        **sections,
    )
    return fresh_run(settings, "t")


@pytest.fixture
def settings(stack_state: StackState, tmp_path: Path) -> Settings:
    return settings_for(stack_state, tmp_path)


async def consume_until(
    settings: Settings,
    topic: str,
    model: type[M],
    done: Callable[[list[M]], bool],
    timeout_s: float = 120.0,
) -> list[M]:
    """Read `topic` from the beginning until `done(messages)` holds; fail the test at the deadline."""
    consumer = make_consumer(settings, topic, group_id=None)
    await consumer.start()
    messages: list[M] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        while not done(messages):
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"timed out after {timeout_s:.0f} s on {topic}: {len(messages)} messages so far")
            batches = await consumer.getmany(timeout_ms=200)
            messages.extend(decode(model, r.value) for batch in batches.values() for r in batch)
    finally:
        await consumer.stop()
    return messages


async def until(condition: Callable[[], object], what: str, timeout_s: float = 60.0) -> None:
    """Poll `condition` (a function, sync or async) until it holds; fail the test at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await holds(condition()):
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)  # polling the condition


async def holds(value: object) -> bool:
    return bool(await value if inspect.isawaitable(value) else value)


async def until_caught_up(settings: Settings, group_id: str, topic: str, timeout_s: float = 120.0) -> None:
    """Wait until `group_id` has committed every record of `topic` (so it will answer nothing more)."""

    async def caught_up() -> bool:
        return await consumer_group_lag(settings, group_id, topic) == 0

    await until(caught_up, f"{group_id} to commit all of {topic}", timeout_s)


async def until_group_stable_with(settings: Settings, group_id: str, members: int, timeout_s: float = 60) -> None:
    """Wait until the consumer group has settled (state Stable) with `members` members."""
    admin = make_admin(settings)
    await admin.start()
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        while True:
            try:
                [response] = await admin.describe_consumer_groups([group_id])
            except GroupCoordinatorNotAvailableError:  # a new broker loads `__consumer_offsets` first
                state, group_members = "no coordinator yet", []
            else:
                _error, _group, state, _protocol_type, _protocol, group_members, *_ = response.groups[0]
                if state == "Stable" and len(group_members) == members:
                    return
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"group {group_id} never settled with {members} members ({state}, {len(group_members)})")
            await asyncio.sleep(0.2)  # polling the group's state
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real fall clip when ../shared is beside the checkout, else a synthetic moving-square video."""
    real = FALL_CLIPS / "gmdcsa24_s1_fall13_backward_fall.mp4"
    if real.is_file():
        return real
    path = tmp_path_factory.mktemp("clip") / "synthetic.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (320, 240))
    for i in range(120):
        image = np.full((240, 320, 3), 40, np.uint8)
        cv2.rectangle(image, (2 * i, 60), (2 * i + 40, 160), (200, 180, 160), -1)
        writer.write(image)
    writer.release()
    return path


def write_video(
    path: Path, frames: int, draw: Callable[[np.ndarray, int], None], fps: float = 10.0, width: int = 320
) -> None:
    """A `width`×240 mp4 whose frame `index` is drawn by `draw(image, index)` on a grey background."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, 240))
    for index in range(frames):
        image = np.full((240, width, 3), 50, np.uint8)
        draw(image, index)
        writer.write(image)
    writer.release()


@pytest.fixture(scope="session")
def drawn_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled clip folder (clips.csv) of three drawn 4 s videos: a figure that tips over at 2 s and stays
    down (breathing), one that walks across, one that sits down at 1 s and stays seated."""
    folder = tmp_path_factory.mktemp("drawn-clips")

    # every figure moves a few pixels a frame, enough for the producers' motion gate
    def tipping(image: np.ndarray, index: int) -> None:
        if index < 20:
            cv2.rectangle(image, (120 + 3 * index, 60), (150 + 3 * index, 200), (200, 180, 160), -1)
        else:
            bob = 4 * (index % 2)
            cv2.rectangle(image, (90, 166 + bob), (230, 196 + bob), (200, 180, 160), -1)

    def walking(image: np.ndarray, index: int) -> None:
        cv2.rectangle(image, (20 + 6 * index, 60), (50 + 6 * index, 200), (200, 180, 160), -1)

    def sitting(image: np.ndarray, index: int) -> None:
        top, sway = (60 if index < 10 else 120), 4 * (index % 2)
        cv2.rectangle(image, (140 + sway, top), (175 + sway, 200), (160, 200, 180), -1)

    write_video(folder / "tips-over.mp4", 40, tipping)
    write_video(folder / "walks.mp4", 40, walking)
    write_video(folder / "sits.mp4", 40, sitting)
    (folder / "clips.csv").write_text(
        "file,label,fall_start_s\ntips-over.mp4,fall,2.0\nwalks.mp4,no_fall,\nsits.mp4,no_fall,\n"
    )
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> ModelPaths:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


def fall_saying_models(tiny: ModelPaths, directory: Path) -> ModelPaths:
    """Copies of the tiny pair configured (weights set, same classes) to answer "fall" for every input."""
    fall = ModelPaths(directory / "edge-vilt", directory / "cloud-llava", directory / "switchers")
    shutil.copytree(tiny.edge, fall.edge)
    shutil.copytree(tiny.cloud, fall.cloud)
    set_edge_fall_bias(fall.edge, fall=True)
    set_cloud_fall_bias(fall.cloud, fall=True)
    edge = ViltEdgeModel.from_pretrained(str(fall.edge), Settings().edge.question)
    create_untrained_switcher(fall.switcher_registry, edge.hidden_size, edge.name)
    return fall


@contextlib.contextmanager
def service_process(package: str, settings: Settings, tmp_path: Path, *args: str) -> Iterator[subprocess.Popen]:
    """`python -m <package> ARGS` with these settings; SIGTERM on exit, and it must stop cleanly."""
    env = write_config(settings, tmp_path / f"{package}-{uuid.uuid4().hex[:6]}.yaml")
    log_path = tmp_path / f"{package}-{uuid.uuid4().hex[:6]}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", package, *args], cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert returncode in (0, -signal.SIGKILL), log_path.read_text()[-3000:]


class Worker(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


W = TypeVar("W", bound=Worker)


@contextlib.asynccontextmanager
async def running(worker: W) -> AsyncIterator[W]:
    """Run an in-process worker (edge, cloud) as a task; stop it and wait for it to drain on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await task


def run_fallwatch(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m fallwatch ARGS` in the checkout, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "fallwatch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )
