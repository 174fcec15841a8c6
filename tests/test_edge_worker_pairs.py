"""The edge worker serving versions of `edge.model_registry` on the real stack (Kafka, Redis).

Version A's edge model says "fall" for every frame while its calibration says a camera sees
falls on 5 % of frames: the drift guard must flag the camera and raise its cloud share within the
budget. Version B's says "no fall"; it is activated mid-stream and every frame must be answered
exactly once, by A's pair before the switch and by B's after it; a rollback brings A back. B's
switcher reads the camera's last edge probabilities, which a new version resets.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from redis import Redis

from core.kafka_io import consumer_group_lag
from core.settings import ConfigError, Settings
from edge_workers.model import EdgeModel, load_edge_model
from edge_workers.registry import (
    ACTIVE_FILE,
    ActiveSwitcher,
    Calibration,
    LoadedPair,
    PairRegistry,
    PairVersion,
    activate,
    active_version,
    announce_switcher,
    rollback,
    save_pair,
)
from edge_workers.service import EdgeWorker
from edge_workers.switcher import Switcher, SwitcherInputs, SwitcherMetadata, input_size
from fallwatch.devkit.models import ModelPaths
from fallwatch.devkit.tiny_edge import set_fall_bias
from schemas import CloudRequest, OperatorEvent, Verdict
from tests.conftest import consume_until, read_all, running, until_group_stable_with
from tests.test_edge_worker import make_frames, publish_frames, until, worker_settings

HIDDEN = 64  # the tiny ViLT head's hidden layer (2 × its hidden size)
BUDGET = 0.5
MIN_FRAMES = 8
CALIBRATION = Calibration(frames=100, fall_rate=0.05, offload_share=0.0, score_quantiles=[0.5] * 9)


def publish_version(registry: Path, tiny: ModelPaths, scratch: Path, fall: bool, version: str, history: int = 0) -> str:
    """A version; with `history`, its switcher reads the camera's last `history` edge probabilities too."""
    edge = scratch / f"edge-{version}"
    shutil.copytree(tiny.edge, edge)
    set_fall_bias(edge, fall=fall)
    inputs: SwitcherInputs = "hidden+confidence+history" if history else "hidden"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        switcher = Switcher(input_size(inputs, HIDDEN, history), inputs, history)
    metadata = SwitcherMetadata(
        version=version,
        input_dim=switcher.input_dim,
        inputs=inputs,
        history=history,
        threshold=0.0,  # the switcher never doubts: offloads come from exploration only
        edge_model="edge",
        created_at=datetime.now(UTC),
        trained=False,
    )
    pair = PairVersion(
        version=version,
        created_at=metadata.created_at,
        parent=None,
        edge_base=str(tiny.edge),
        edge_sha256="",
        switcher_sha256="",
        calibration=CALIBRATION,
        training_window="test",
    )
    save_pair(registry, pair, edge, switcher, metadata)
    activate(registry, version, replacing=active_version(registry))
    return version


async def one_look(
    registry: PairRegistry, serving: ActiveSwitcher, announced: bytes | None = None
) -> LoadedPair | None:
    """One look at the registry, due now: the first refresh starts it, the one after its end hands over."""
    assert await registry.refresh(serving, announced) is None and registry.loading is not None, "a look is due"
    await asyncio.wait({registry.loading})
    return await registry.refresh(serving, announced)


def pair_worker_settings(stack_state, tmp_path: Path, tiny: ModelPaths, registry: Path, **edge: object) -> Settings:
    """An edge worker serving the ACTIVE version of `registry` (edge model and switcher together)."""
    return worker_settings(stack_state, tmp_path, tiny, tmp_path / "unused", model_registry=str(registry), **edge)


def test_hot_reload_of_edge_and_switcher_mid_stream_and_the_drift_guard(
    stack_state, tmp_path: Path, tiny_models: ModelPaths, caplog: pytest.LogCaptureFixture
) -> None:
    registry = tmp_path / "registry"
    old = publish_version(registry, tiny_models, tmp_path, fall=True, version="v1")
    settings = pair_worker_settings(
        stack_state,
        tmp_path,
        tiny_models,
        registry,
        registry_poll_s=3600,  # only the announcement can trigger the reload quickly
        max_offload_ratio=BUDGET,
        # judged on the fall rate alone: the untrained switcher's scores are whatever they are
        drift={
            "drift_window": 40,
            "drift_min_frames": MIN_FRAMES,
            "learning_exploration_rate": 1.0,
            "score_distance_tolerance": 1.0,
        },
    )
    before, after, back = make_frames("cam-a", 24), make_frames("cam-a", 24, 24), make_frames("cam-a", 8, 48)
    announce_key = settings.edge.registry_announce_key
    assert announce_key is not None

    async def answered(count: int) -> None:
        await consume_until(settings, settings.kafka.topics.verdicts, Verdict, lambda m: len(m) >= count)

    async def scenario() -> tuple[float | None, float | None]:
        async with running(EdgeWorker(settings, None)) as worker:
            await publish_frames(settings, before)
            await answered(len(before))
            flagged = worker.metrics.registry.get_sample_value("fallwatch_edge_camera_drift", {"camera": "cam-a"})
            # its learning mode explores every frame the budget allows; the switcher itself doubts none
            check = worker.drift.check("cam-a")
            assert check is not None and check.offload_share == 0.0
            assert check.reasons == ["edge fall rate 100% against 5%"], "exploration is not the switcher's share"
            new = publish_version(registry, tiny_models, tmp_path, fall=False, version="v2", history=4)
            announce_switcher(Redis.from_url(settings.redis.url), announce_key, new)
            await until(lambda: worker.model.name == "v2/edge", "the announced version")
            cleared = worker.metrics.registry.get_sample_value("fallwatch_edge_camera_drift", {"camera": "cam-a"})
            await publish_frames(settings, after)
            await answered(len(before) + len(after))
            assert len(worker.history.recent["cam-a"]) == 4, "v2's switcher reads the camera's last 4 frames"
            assert rollback(registry) == ("v2", "v1")
            announce_switcher(Redis.from_url(settings.redis.url), announce_key, "v1")
            await until(lambda: worker.model.name == "v1/edge", "the rolled-back version")
            assert not worker.history.recent, "another version's probabilities are not v1's history"
            await publish_frames(settings, back)
            await answered(len(before) + len(after) + len(back))
            # a version whose edge model is not what its record says: refused, v1 stays
            publish_version(registry, tiny_models, tmp_path, fall=False, version="v3")
            (registry / "v3" / "edge" / "config.json").write_text("{}")
            announce_switcher(Redis.from_url(settings.redis.url), announce_key, "v3")
            await until(lambda: "v3" in worker.registry.refused, "the refusal of v3")
            assert worker.model.name == "v1/edge"
        return flagged, cleared

    with caplog.at_level(logging.WARNING, logger="edge_workers.drift"):
        flagged, cleared = asyncio.run(scenario())
    verdicts = asyncio.run(consume_until(settings, settings.kafka.topics.verdicts, Verdict, lambda m: len(m) >= 56))
    counts = Counter(v.frame_id for v in verdicts)
    assert set(counts) == {f.frame_id for f in before + after + back} and set(counts.values()) == {1}
    by_id = {v.frame_id: v for v in verdicts}
    for frames, version, fall in ((before, old, True), (after, "v2", False), (back, old, True)):
        answers = {(by_id[f.frame_id].edge_model, by_id[f.frame_id].switcher_version, by_id[f.frame_id].decision)
                   for f in frames}  # fmt: skip
        assert answers == {(f"{version}/edge", version, fall)}, "edge model and switcher swapped together"

    # the drift guard: the fall-saying edge is off its calibration once it has MIN_FRAMES frames
    assert flagged == 1.0 and cleared is None, "flagged, and cleared by the new version's calibration"
    warnings = [r.getMessage() for r in caplog.records if r.name == "edge_workers.drift"]
    expected = (
        "camera cam-a drifted from the published pair's calibration over 8 frames: edge fall rate 100% against 5%"
    )
    assert warnings == [expected, expected], "flagged under v1, not under v2, again after the rollback to v1"
    requests = asyncio.run(
        consume_until(settings, settings.kafka.topics.cloud_requests, CloudRequest, lambda m: len(m) >= 1)
    )
    offloaded = {r.frame_id for r in requests}
    assert not offloaded & {f.frame_id for f in before[:MIN_FRAMES]}, "nothing explored before the flag"
    assert offloaded & {f.frame_id for f in before[MIN_FRAMES + 4 :]}, "the flagged camera goes to the cloud"
    assert {r.reason for r in requests} == {"exploration"}
    assert len(offloaded & {f.frame_id for f in before}) <= BUDGET * len(before), "within the budget"
    assert asyncio.run(consumer_group_lag(settings, settings.edge.group_id, settings.kafka.topics.frames)) == 0

    # the same as operator events, beside the log lines
    events = asyncio.run(consume_until(settings, settings.kafka.topics.operator_events, OperatorEvent,
                                       lambda m: any(e.kind == "version_refused" for e in m)))  # fmt: skip
    camera = [(e.kind, e.version) for e in events if e.camera_id == "cam-a"]
    assert camera == [("drift_flagged", "v1"), ("learning_started", "v1"), ("learning_ended", "v2"),
                      ("drift_flagged", "v1"), ("learning_started", "v1")]  # fmt: skip
    assert [e.message for e in events if e.kind == "drift_flagged"] == [expected, expected]
    refused = [e for e in events if e.kind == "version_refused"]
    assert len(refused) == 1 and refused[0].version == "v3" and refused[0].camera_id is None
    assert refused[0].message.startswith("version v3 refused, keeping v1: the edge model of v3 does not match")


def test_the_cameras_are_answered_while_a_new_version_loads(stack_state, tmp_path: Path, tiny_models) -> None:
    # A real edge model's from_pretrained and CPU-option check take seconds; here the load of v2
    # is held until the test releases it, and the frames meanwhile must be answered by v1.
    registry = tmp_path / "registry"
    publish_version(registry, tiny_models, tmp_path, fall=True, version="v1")
    settings = pair_worker_settings(stack_state, tmp_path, tiny_models, registry, registry_poll_s=3600)
    announce_key = settings.edge.registry_announce_key
    assert announce_key is not None
    during, after = make_frames("cam-a", 16), make_frames("cam-a", 8, 16)
    loading, release = threading.Event(), threading.Event()

    async def answered(count: int, timeout_s: float = 120.0) -> list[Verdict]:
        return await consume_until(
            settings, settings.kafka.topics.verdicts, Verdict, lambda m: len(m) >= count, timeout_s=timeout_s
        )

    async def scenario() -> list[Verdict]:
        async with running(EdgeWorker(settings, None)) as worker:
            registry_of_worker = worker.registry
            assert isinstance(registry_of_worker, PairRegistry)
            load = registry_of_worker.load_model

            def held_load(directory: Path) -> EdgeModel:
                loading.set()
                release.wait(120)
                return load(directory)

            registry_of_worker.load_model = held_load
            announce_switcher(Redis.from_url(settings.redis.url), announce_key, publish_version(
                registry, tiny_models, tmp_path, fall=False, version="v2"
            ))  # fmt: skip
            try:
                assert await asyncio.to_thread(loading.wait, 120), "the worker never began to load v2"
                await publish_frames(settings, during)
                await answered(len(during), timeout_s=60)
                assert worker.model.name == "v1/edge"
            finally:
                release.set()
            await until(lambda: worker.model.name == "v2/edge", "v2, once loaded")
            await publish_frames(settings, after)
            await answered(len(during) + len(after))
        return await read_all(settings, settings.kafka.topics.verdicts, Verdict)

    verdicts = asyncio.run(scenario())
    assert sorted(v.frame_id for v in verdicts) == sorted(f.frame_id for f in during + after), "each answered once"
    by_id = {v.frame_id: v for v in verdicts}
    for frames, version in ((during, "v1"), (after, "v2")):
        assert {(by_id[f.frame_id].edge_model, by_id[f.frame_id].switcher_version) for f in frames} == {
            (f"{version}/edge", version)
        }


def test_start_without_an_active_version_is_one_readable_line(tmp_path: Path) -> None:
    settings = Settings(edge={"model_registry": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match=r"no active version in .*empty.*run `fallwatch dmd adapt`"):
        EdgeWorker(settings, None)


def test_an_unreadable_active_pointer_keeps_the_pair_that_works_and_is_reported_once(
    tmp_path: Path, tiny_models: ModelPaths
) -> None:
    registry_dir = tmp_path / "registry"
    publish_version(registry_dir, tiny_models, tmp_path, fall=True, version="v1")
    settings = Settings(edge={"model_registry": str(registry_dir)})
    registry = PairRegistry(registry_dir, lambda directory: load_edge_model(settings, directory), 0.0, None)
    serving = registry.load_active().switcher
    publish_version(registry_dir, tiny_models, tmp_path, fall=False, version="v2")
    pointer = (registry_dir / ACTIVE_FILE).read_text()
    (registry_dir / ACTIVE_FILE).write_text(pointer[: len(pointer) // 2])  # copied by hand, half of it

    async def polls() -> list[str | None]:
        found = [await one_look(registry, serving) for _ in range(3)]
        (registry_dir / ACTIVE_FILE).write_text(pointer)
        found.append(await one_look(registry, serving))
        return [None if loaded is None else loaded.version.version for loaded in found]

    assert asyncio.run(polls()) == [None, None, None, "v2"], "v1 served until the pointer reads again"
    (event,) = registry.events
    assert event.kind == "version_refused" and event.version is None
    assert event.message.startswith(f"{registry_dir / ACTIVE_FILE} is not a pointer to a version: ")
    assert event.message.endswith("; keeping v1") and "\n" not in event.message
    # at the start, the same file is one readable line, not a traceback
    (registry_dir / ACTIVE_FILE).write_text("{}")
    with pytest.raises(ConfigError, match="is not a pointer to a version: version: Field required"):
        EdgeWorker(settings, None)


def test_a_version_rolled_back_while_it_loads_is_not_served(tmp_path: Path, tiny_models: ModelPaths) -> None:
    """ACTIVE moves from v2 back to v1 (a rollback) while the worker loads v2: v2 is not swapped in, and the
    worker looks again at once (not a poll period later), so a new publish of v2 is served at the next look."""
    registry_dir = tmp_path / "registry"
    publish_version(registry_dir, tiny_models, tmp_path, fall=True, version="v1")
    settings = Settings(edge={"model_registry": str(registry_dir)})
    publish_version(registry_dir, tiny_models, tmp_path, fall=False, version="v2")
    rolled_back: list[tuple[str, str]] = []

    def load_rolled_back_meanwhile(directory: Path) -> EdgeModel:
        if directory.parent.name == "v2" and not rolled_back:
            rolled_back.append(rollback(registry_dir))
        return load_edge_model(settings, directory)

    # poll_s of an hour: a look is due when the announcement changes, or when the registry asks for one
    registry = PairRegistry(registry_dir, load_rolled_back_meanwhile, 3600.0, None)
    activate(registry_dir, "v1", replacing="v2")  # v1 served at the start
    serving = registry.load_active().switcher
    activate(registry_dir, "v2", replacing="v1")

    async def looks() -> list[str | None]:
        found = [await one_look(registry, serving, b"v2")]
        assert rolled_back == [("v2", "v1")], "ACTIVE moved back to v1 during the load"
        assert found == [None], "v2 not served: ACTIVE named v1 again once it had loaded"
        # nothing announced since: due at once all the same; v1 is served, nothing to load
        found.append(await one_look(registry, serving, b"v2"))
        activate(registry_dir, "v2", replacing="v1")
        found.append(await one_look(registry, serving, b"v2 again"))
        return [None if loaded is None else loaded.version.version for loaded in found]

    assert asyncio.run(looks()) == [None, None, "v2"]
    assert not registry.refused, "a version rolled back during its load is not refused"


def test_after_a_rebalance_each_camera_s_drift_is_reported_by_the_worker_that_answers_it(
    stack_state, tmp_path: Path, tiny_models: ModelPaths
) -> None:
    registry = tmp_path / "registry"
    publish_version(registry, tiny_models, tmp_path, fall=True, version="v1")  # every camera drifts from 5 %
    drift = {"drift_window": 40, "drift_min_frames": MIN_FRAMES, "score_distance_tolerance": 1.0}
    settings = pair_worker_settings(stack_state, tmp_path, tiny_models, registry, drift=drift)
    cameras = {f"cam-{i}" for i in range(6)}  # over the topic's 4 partitions

    def frames(first_seq: int) -> list:
        return [frame for camera in sorted(cameras) for frame in make_frames(camera, MIN_FRAMES, first_seq)]

    def flagged(worker: EdgeWorker) -> set[str]:
        return {
            sample.labels["camera"]
            for metric in worker.metrics.registry.collect()
            if metric.name == "fallwatch_edge_camera_drift"
            for sample in metric.samples
            if sample.value == 1.0
        }

    async def scenario() -> set[str]:
        async with running(EdgeWorker(settings, None)) as first:
            await publish_frames(settings, frames(0))
            await until(lambda: flagged(first) == cameras, "every camera flagged by the only worker")
            async with running(EdgeWorker(settings, None)) as second:
                await until_group_stable_with(settings, settings.edge.group_id, 2)
                await publish_frames(settings, frames(MIN_FRAMES))

                def reported_once() -> bool:
                    both = flagged(first), flagged(second)
                    return both[0] | both[1] == cameras and bool(both[1]) and not both[0] & both[1]

                await until(reported_once, "each camera flagged by one worker, the one that answers it")
                assert set(first.clips.by_camera).isdisjoint(flagged(second)), "no frames of the cameras it lost"
                return flagged(first)

    assert asyncio.run(scenario()), "the first worker kept the cameras of its partitions"
