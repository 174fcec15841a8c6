"""An offload budget shared by edge workers (`edge.offload_budget_key`): counted in the real Redis, so two
workers together send what one budget allows, and a worker without Redis keeps its own."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from redis.asyncio import Redis

from core.settings import Settings
from edge_workers.model import EdgeModel, load_edge_model
from edge_workers.routing import RoutingPolicy
from edge_workers.service import EdgeWorker
from edge_workers.shared_budget import SharedOffloadBudget
from fallwatch.devkit.models import ModelPaths
from fallwatch.stack import StackState, free_port
from schemas import Verdict
from tests.conftest import read_all, running, until_group_stable_with
from tests.test_edge_worker import (
    answered_by_a_worker,
    make_frames,
    publish_frames,
    registry_with_untrained,
    until_verdicts,
    worker_settings,
)

SLOTS = 6
# SLOTS frames over an hour's window: no slot leaves the window during a test
FPS_AND_WINDOW = {"max_offload_fps": SLOTS / 3600, "offload_window_s": 3600.0}


def policy(max_offload_ratio: float | None = None, max_offload_fps: float | None = None) -> RoutingPolicy:
    return RoutingPolicy(1.0, max_offload_ratio, max_offload_fps, window_s=100.0, exploration_rate=0.0)


def tiny_edge_model(tiny: ModelPaths) -> EdgeModel:
    return load_edge_model(Settings(edge=tiny.settings_sections()["edge"]))


def test_two_workers_take_their_slots_from_one_budget(
    stack_state: StackState,
) -> None:
    key = f"test:{uuid.uuid4().hex}:offload-budget"
    by_rate, by_share = policy(max_offload_fps=0.1), policy(max_offload_ratio=0.25)  # 10 slots; 25 % of frames

    async def scenario() -> dict[str, object]:
        clients = [Redis.from_url(stack_state.redis_url) for _ in range(2)]
        a, b = (SharedOffloadBudget(client, key) for client in clients)
        other = SharedOffloadBudget(clients[0], f"{key}:other")
        shares = SharedOffloadBudget(clients[0], f"{key}:shares"), SharedOffloadBudget(clients[1], f"{key}:shares")
        try:
            taken = [(await a.reserve(by_rate, 8)).slots, (await b.reserve(by_rate, 8)).slots]
            after = (await a.reserve(by_rate, 8)).slots
            # a second that left the window is dropped, not counted
            stale = f"o:{int(time.time()) - 1000}"
            await clients[0].hset(f"{key}:other", stale, 100)
            elsewhere = (await other.reserve(by_rate, 8)).slots
            return {
                "taken": taken,
                "after": after,
                "elsewhere": elsewhere,
                "stale kept": await clients[0].hexists(f"{key}:other", stale),
                "shares": [(await budget.reserve(by_share, 8)).slots for budget in shares],
            }
        finally:
            await clients[0].delete(key, f"{key}:other", f"{key}:shares")
            for client in clients:
                await client.aclose()

    assert asyncio.run(scenario()) == {
        "taken": [8, 2],  # what A took is not B's
        "after": 0,
        "elsewhere": 8,  # another key is another budget; the stale second counts nothing
        "stale kept": False,
        "shares": [2, 2],  # 25 % of 8 frames, then of 16 less the 2 taken
    }


def test_a_worker_hands_back_the_slots_it_did_not_use(stack_state: StackState) -> None:
    key = f"test:{uuid.uuid4().hex}:offload-budget"

    async def scenario() -> list[int]:
        client = Redis.from_url(stack_state.redis_url)
        a, b = SharedOffloadBudget(client, key), SharedOffloadBudget(client, key)
        by_rate = policy(max_offload_fps=0.1)
        try:
            first = await a.reserve(by_rate, 8)
            await a.release(first, used=5)
            second = await b.reserve(by_rate, 8)
            return [first.slots, second.slots]
        finally:
            await client.delete(key)
            await client.aclose()

    assert asyncio.run(scenario()) == [8, 5], "the 3 slots A did not use, and the 2 no one took"


def test_two_edge_workers_naming_one_key_send_what_one_budget_allows(
    stack_state: StackState, tmp_path: Path, tiny_models: ModelPaths
) -> None:
    registry = tmp_path / "switchers"
    registry_with_untrained(tiny_models, registry, threshold=1.0)  # every frame asks for the cloud
    key = f"test:{uuid.uuid4().hex}:offload-budget"
    settings = worker_settings(stack_state, tmp_path, tiny_models, registry, offload_budget_key=key, **FPS_AND_WINDOW)
    frames = [frame for camera in range(12) for frame in make_frames(f"cam-{camera}", 4)]  # over 4 partitions

    def answered(worker: EdgeWorker) -> float:
        return worker.metrics.registry.get_sample_value("fallwatch_edge_frames_total") or 0.0

    async def scenario() -> tuple[list[Verdict], list[float]]:
        first_worker, second_worker = (EdgeWorker(settings, tiny_edge_model(tiny_models)) for _ in range(2))
        async with running(first_worker) as first, running(second_worker) as second:
            await until_group_stable_with(settings, settings.edge.group_id, 2)
            await publish_frames(settings, frames)
            await until_verdicts(settings, len(frames))
            counts = [answered(first), answered(second)]
        return await read_all(settings, settings.kafka.topics.verdicts, Verdict), counts

    verdicts, counts = asyncio.run(scenario())
    assert sorted(v.frame_id for v in verdicts) == sorted(f.frame_id for f in frames), "each frame answered once"
    assert min(counts) > SLOTS, f"each worker alone would have sent {SLOTS}: {counts}"
    offloaded = [v for v in verdicts if v.offload_reason is not None]
    assert len(offloaded) == SLOTS, "one budget for both workers, every slot used"
    assert sum(v.routing is not None and v.routing.over_budget for v in verdicts) == len(frames) - SLOTS


def test_an_edge_worker_without_redis_routes_by_its_own_budget(
    stack_state: StackState, tmp_path: Path, tiny_models: ModelPaths
) -> None:
    registry = tmp_path / "switchers"
    registry_with_untrained(tiny_models, registry, threshold=1.0)
    settings = worker_settings(
        stack_state, tmp_path, tiny_models, registry, offload_budget_key="test:offload-budget", **FPS_AND_WINDOW
    )
    unreachable = settings.redis.model_copy(update={"url": f"redis://127.0.0.1:{free_port()}/0"})
    settings = settings.model_copy(update={"redis": unreachable})
    frames = make_frames("cam-a", 16)

    verdicts = answered_by_a_worker(settings, tiny_edge_model(tiny_models), frames)
    assert sorted(v.frame_id for v in verdicts) == sorted(f.frame_id for f in frames)
    assert sum(v.offload_reason is not None for v in verdicts) == SLOTS, "the worker's own budget"
