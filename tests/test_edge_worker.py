"""The edge worker on the real stack: hot reload, refusals, budget, exploration, dead letters, metrics, SIGKILL.

Frames are written straight to the test's `frames` topic (small JPEGs of random
noise, so switcher scores differ), and the worker runs as an asyncio task with the
tiny ViLT, or as `python -m edge_workers` for the SIGKILL test.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter, defaultdict
from datetime import timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from redis import Redis

from core.images import decode_jpeg_rgb, encode_jpeg
from core.kafka_io import consumer_group_lag, make_producer
from core.settings import Settings
from edge_workers.model import EdgeModel, load_edge_model
from edge_workers.registry import announce_switcher
from edge_workers.service import FRAMES_FETCH_BYTES, EdgeWorker
from edge_workers.switcher import create_untrained_switcher, latest_version, load_switcher
from fallwatch.devkit.models import ModelPaths
from fallwatch.stack import free_port
from schemas import CloudRequest, DeadLetter, Frame, Verdict, encode, utc_now
from tests.conftest import (
    consume_until,
    read_all,
    running,
    service_process,
    settings_for,
    until,
    until_caught_up,
    until_group_stable_with,
    write_config,
)

START = utc_now().replace(microsecond=0) - timedelta(hours=1)  # within the capture-time bounds


def make_frames(camera_id: str, count: int, first_seq: int = 0, seed: int = 0) -> list[Frame]:
    rng = np.random.default_rng(seed + first_seq)
    frames = []
    for seq in range(first_seq, first_seq + count):
        image = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
        captured_at = START + timedelta(milliseconds=250 * seq)
        frames.append(
            Frame(
                frame_id=Frame.make_id(camera_id, captured_at, seq),
                camera_id=camera_id,
                room="101",
                seq=seq,
                captured_at=captured_at,
                width=64,
                height=48,
                jpeg=encode_jpeg(image),
            )
        )
    return frames


async def publish(settings: Settings, values: list[tuple[str, bytes]]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        acks = [
            await producer.send(settings.kafka.topics.frames, key=key.encode(), value=value) for key, value in values
        ]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


async def publish_frames(settings: Settings, frames: list[Frame]) -> None:
    await publish(settings, [(frame.camera_id, encode(frame)) for frame in frames])


def worker_settings(stack_state, tmp_path: Path, tiny: ModelPaths, registry: Path, **edge: object) -> Settings:
    sections = tiny.settings_sections()
    sections["edge"].update(
        switcher_registry=str(registry),
        batch_size=4,
        batch_wait_ms=20,
        registry_announce_key=f"test:{uuid.uuid4().hex}:announced",
    )
    sections["edge"].update(edge)
    return settings_for(stack_state, tmp_path, **sections)


def registry_with_untrained(tiny: ModelPaths, registry: Path, threshold: float, seed: int = 0) -> str:
    source = latest_version(tiny.switcher_registry)
    assert source is not None
    metadata = load_switcher(source)[1]
    return create_untrained_switcher(registry, metadata.input_dim, metadata.edge_model, threshold, seed).name


def verdicts_for(settings: Settings, count: int) -> list[Verdict]:
    return asyncio.run(until_verdicts(settings, count))


def answered_by_a_worker(settings: Settings, edge_model: EdgeModel, frames: list[Frame]) -> list[Verdict]:
    """Publish `frames`, then run a worker until every one has a verdict; those verdicts."""

    async def scenario() -> None:
        await publish_frames(settings, frames)
        async with running(EdgeWorker(settings, edge_model)):
            await until_verdicts(settings, len(frames))

    asyncio.run(scenario())
    return verdicts_for(settings, len(frames))


async def until_verdicts(settings: Settings, count: int) -> list[Verdict]:
    """Read the verdicts until `count` frames have one (a frame answered twice counts once)."""
    topic = settings.kafka.topics.verdicts
    return await consume_until(settings, topic, Verdict, lambda m: len({v.frame_id for v in m}) >= count)


@pytest.fixture(scope="module")
def edge_model(tiny_models: ModelPaths) -> EdgeModel:
    return load_edge_model(Settings(edge=tiny_models.settings_sections()["edge"]))


def test_hot_reload_mid_stream_answers_every_frame_once_with_the_new_switcher(
    stack_state, tmp_path: Path, tiny_models: ModelPaths, edge_model: EdgeModel
) -> None:
    registry = tmp_path / "switchers"
    old = registry_with_untrained(tiny_models, registry, threshold=0.0, seed=0)
    # a long poll: only the announcement can trigger the reload quickly
    settings = worker_settings(stack_state, tmp_path, tiny_models, registry, registry_poll_s=3600)
    before, after = make_frames("cam-a", 24), make_frames("cam-a", 24, first_seq=24)

    async def scenario() -> str:
        async with running(EdgeWorker(settings, edge_model)) as worker:
            await publish_frames(settings, before)
            await consume_until(settings, settings.kafka.topics.verdicts, Verdict, lambda m: len(m) >= len(before))
            new = registry_with_untrained(tiny_models, registry, threshold=0.0, seed=1)
            announce_switcher(Redis.from_url(settings.redis.url), settings.edge.registry_announce_key, new)
            await until(lambda: worker.active.metadata.version == new, "the announced switcher")
            await publish_frames(settings, after)
            await consume_until(
                settings, settings.kafka.topics.verdicts, Verdict, lambda m: len(m) >= len(before) + len(after)
            )
        return new

    new = asyncio.run(scenario())
    verdicts = verdicts_for(settings, len(before) + len(after))
    counts = Counter(v.frame_id for v in verdicts)
    assert set(counts) == {f.frame_id for f in before + after} and set(counts.values()) == {1}, "none lost or twice"
    by_id = {v.frame_id: v for v in verdicts}
    assert {by_id[f.frame_id].switcher_version for f in before} == {old}
    assert {by_id[f.frame_id].switcher_version for f in after} == {new}
    # the scores really come from the new switcher's weights
    new_switcher = load_switcher(registry / new)[0]
    expected = new_switcher.agreement_probability(edge_model.predict([decode_jpeg_rgb(f.jpeg) for f in after]).hidden)
    np.testing.assert_allclose([by_id[f.frame_id].switcher_score for f in after], expected, atol=1e-3)
    assert asyncio.run(consumer_group_lag(settings, settings.edge.group_id, settings.kafka.topics.frames)) == 0


def test_a_mismatched_switcher_is_refused_at_hot_reload_and_the_old_one_kept(
    stack_state,
    tmp_path: Path,
    tiny_models: ModelPaths,
    edge_model: EdgeModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = tmp_path / "switchers"
    old = registry_with_untrained(tiny_models, registry, threshold=0.0)
    settings = worker_settings(stack_state, tmp_path, tiny_models, registry, registry_poll_s=0.05)
    frames = make_frames("cam-b", 8)

    async def scenario() -> str:
        async with running(EdgeWorker(settings, edge_model)) as worker:
            wrong = create_untrained_switcher(registry, edge_model.hidden_size, "some/other-model").name
            await until(lambda: wrong in worker.registry.refused, "the refusal")
            await publish_frames(settings, frames)
            await consume_until(settings, settings.kafka.topics.verdicts, Verdict, lambda m: len(m) >= len(frames))
        return wrong

    with caplog.at_level(logging.ERROR, logger="edge_workers.registry"):
        wrong = asyncio.run(scenario())
    refusals = [r.getMessage() for r in caplog.records if r.name == "edge_workers.registry"]
    assert len(refusals) == 1, "one line, not one per poll"
    assert f"switcher {wrong} refused, keeping {old}" in refusals[0] and "some/other-model" in refusals[0]
    assert {v.switcher_version for v in verdicts_for(settings, len(frames))} == {old}


def test_start_up_with_a_mismatched_switcher_is_one_readable_line(
    stack_state, tmp_path: Path, tiny_models: ModelPaths
) -> None:
    registry = tmp_path / "switchers"
    create_untrained_switcher(registry, 99, "some/other-model")
    settings = worker_settings(stack_state, tmp_path, tiny_models, registry)

    result = subprocess.run(
        [sys.executable, "-m", "edge_workers"],
        env=write_config(settings, tmp_path / "edge.yaml"),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "99-d hidden vectors" in errors[0] and "some/other-model" in errors[0]


def test_offload_budget_holds_under_a_burst(
    stack_state, tmp_path: Path, tiny_models: ModelPaths, edge_model: EdgeModel
) -> None:
    registry = tmp_path / "switchers"
    registry_with_untrained(tiny_models, registry, threshold=1.0)  # every frame asks for the cloud
    settings = worker_settings(
        stack_state, tmp_path, tiny_models, registry, batch_size=8, max_offload_ratio=0.25, offload_window_s=600
    )
    burst = make_frames("cam-c", 40) + make_frames("cam-d", 24)

    verdicts = answered_by_a_worker(settings, edge_model, burst)
    offloaded = [v for v in verdicts if v.offload_reason == "switcher"]
    kept = [v for v in verdicts if v.routing is not None and v.routing.over_budget]
    assert len(verdicts) == len(burst)
    assert len(offloaded) == 16, "25 % of 64 frames, not more"
    assert len(kept) == 48 and all(v.final and v.source == "edge" and v.offload_reason is None for v in kept)
    assert all(not v.final for v in offloaded)
    assert {(v.routing.max_offload_ratio, v.routing.window_s, v.routing.threshold) for v in verdicts if v.routing} == {
        (0.25, 600, 1.0)
    } and all(v.routing is not None for v in verdicts), "the policy is recorded in each verdict"
    requests = asyncio.run(
        consume_until(settings, settings.kafka.topics.cloud_requests, CloudRequest, lambda m: len(m) >= 16)
    )
    assert {r.frame_id for r in requests} == {v.frame_id for v in offloaded}
    assert {r.reason for r in requests} == {"switcher"}


def test_exploration_sends_a_share_of_confident_frames_marked(
    stack_state, tmp_path: Path, tiny_models: ModelPaths, edge_model: EdgeModel
) -> None:
    registry = tmp_path / "switchers"
    registry_with_untrained(tiny_models, registry, threshold=0.0)  # every frame is confident
    settings = worker_settings(
        stack_state, tmp_path, tiny_models, registry, batch_size=16, exploration_rate=0.2, exploration_seed=3
    )
    frames = make_frames("cam-e", 160)

    verdicts = answered_by_a_worker(settings, edge_model, frames)
    explored = [v for v in verdicts if v.offload_reason == "exploration"]
    # binomial(160, 0.2): mean 32, sd 5.1; 3.5 sd either side
    assert 14 <= len(explored) <= 50, len(explored)
    assert all(not v.final for v in explored), "the cloud answers an explored frame"
    assert all(v.final for v in verdicts if v.offload_reason is None)
    requests = asyncio.run(
        consume_until(settings, settings.kafka.topics.cloud_requests, CloudRequest, lambda m: len(m) >= len(explored))
    )
    assert {r.frame_id for r in requests} == {v.frame_id for v in explored}
    assert {r.reason for r in requests} == {"exploration"}
    assert all(r.clip_frame_ids[-1] == r.frame_id and len(r.clip_keys) == len(r.clip_frame_ids) for r in requests)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_each_kind_of_malformed_frame_is_dead_lettered_and_counted(
    stack_state, tmp_path: Path, tiny_models: ModelPaths, edge_model: EdgeModel
) -> None:
    registry = tmp_path / "switchers"
    registry_with_untrained(tiny_models, registry, threshold=0.0)
    port = free_port()
    settings = worker_settings(
        stack_state,
        tmp_path,
        tiny_models,
        registry,
        known_cameras=["cam-f"],
        max_frame_bytes=100_000,
        metrics_port=port,
    )
    good, after = make_frames("cam-f", 2)
    future_version = encode(good).replace(b'"schema_version":1', b'"schema_version":2')
    assert future_version != encode(good)
    bad: list[tuple[str, bytes]] = [
        ("cam-f", b"not json at all"),
        ("cam-f", future_version),
        ("cam-f", encode(good.model_copy(update={"jpeg": b"\xff\xd8 truncated"}))),
        ("cam-f", encode(good.model_copy(update={"jpeg": b""}))),
        ("cam-f", encode(good.model_copy(update={"jpeg": b"\xff" * 200_000}))),
        ("cam-x", encode(good.model_copy(update={"camera_id": "cam-x"}))),
        # a valid JPEG the model's pre-processing cannot resize (its short side would become 0 pixels)
        ("cam-f", encode(good.model_copy(update={"jpeg": encode_jpeg(np.zeros((16, 600, 3), np.uint8))}))),
        # not a JPEG: its size is judged once decoded
        (
            "cam-f",
            encode(good.model_copy(update={"jpeg": cv2.imencode(".png", np.zeros((8, 64, 3), np.uint8))[1].tobytes()})),
        ),
    ]

    async def scenario() -> tuple[list[DeadLetter], dict[str, float]]:
        await publish(settings, [*bad, ("cam-f", encode(after))])
        async with running(EdgeWorker(settings, edge_model)):
            dead = await consume_until(
                settings, settings.kafka.topics.dead_letters, DeadLetter, lambda m: len(m) >= len(bad)
            )
            await consume_until(settings, settings.kafka.topics.verdicts, Verdict, lambda m: len(m) >= 1)
            samples: dict[str, float] = {}

            def scraped_all() -> bool:
                samples.update(scrape(port))
                # the gauges and counters follow the batches: wait until the last batch is in them
                return (samples.get("fallwatch_edge_frames_total"), samples.get("fallwatch_edge_consumer_lag")) == (
                    1.0,
                    0.0,
                ) and samples.get("fallwatch_edge_dead_letters_total") == len(bad)

            await until(scraped_all, "the metrics of the batch")
        return dead, samples

    dead, samples = asyncio.run(scenario())
    reasons = sorted(d.reason for d in dead)
    assert len(dead) == len(bad)
    assert sum("invalid Frame" in reason for reason in reasons) == 2  # not JSON, schema version 2
    assert {"JPEG could not be decoded", "empty JPEG", "unknown camera 'cam-x'"} <= set(reasons)
    assert any(re.fullmatch(r"frame of \d+ bytes exceeds 100000", reason) for reason in reasons)
    assert any(reason.startswith("the edge model cannot answer a frame of 600×16 pixels") for reason in reasons)
    assert "frame of 64×8 pixels is smaller than 16 pixels a side" in reasons
    assert all(d.service == "edge_workers" for d in dead)
    assert {v.frame_id for v in verdicts_for(settings, 1)} == {after.frame_id}, "the batch went on"
    assert samples["fallwatch_edge_dead_letters_total"] == len(bad)
    assert samples['fallwatch_edge_stage_seconds_count{stage="model"}'] >= 1
    assert samples['fallwatch_edge_stage_seconds_count{stage="produce"}'] >= 1
    assert samples["fallwatch_edge_switcher_score_count"] == 1
    assert any(name.startswith("fallwatch_edge_switcher_info{") for name in samples)


def test_a_model_that_answers_no_frame_stops_the_worker_and_dead_letters_nothing(
    stack_state, tmp_path: Path, tiny_models: ModelPaths, edge_model: EdgeModel
) -> None:
    registry = tmp_path / "switchers"
    registry_with_untrained(tiny_models, registry, threshold=0.0)
    settings = worker_settings(stack_state, tmp_path, tiny_models, registry)
    frames = make_frames("cam-m", 4)
    broken = load_edge_model(Settings(edge=tiny_models.settings_sections()["edge"]))
    # weights corrupted (as by a fault of the machine): every frame fails, none is to blame
    head = [module for module in broken.model.modules() if isinstance(module, torch.nn.Linear)][-1]
    head.weight = torch.nn.Parameter(torch.zeros(head.out_features, head.in_features + 1))

    async def scenario() -> list[Verdict]:
        await publish_frames(settings, frames)
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(EdgeWorker(settings, broken).run(asyncio.Event()), timeout=120)
        assert await read_all(settings, settings.kafka.topics.dead_letters, DeadLetter) == []
        lag = await consumer_group_lag(settings, settings.edge.group_id, settings.kafka.topics.frames)
        assert lag == len(frames), "nothing committed: the frames wait for a worker that works"
        async with running(EdgeWorker(settings, edge_model)):
            return await until_verdicts(settings, len(frames))

    verdicts = asyncio.run(scenario())
    assert {verdict.frame_id for verdict in verdicts} == {frame.frame_id for frame in frames}


def test_frames_larger_than_a_fetch_are_answered_amid_other_cameras(
    stack_state, tmp_path: Path, tiny_models: ModelPaths, edge_model: EdgeModel
) -> None:
    """The worker fetches FRAMES_FETCH_BYTES per partition; a larger frame on any partition is still answered."""
    registry = tmp_path / "switchers"
    registry_with_untrained(tiny_models, registry, threshold=0.0)  # nothing offloaded: one verdict per frame
    settings = worker_settings(stack_state, tmp_path, tiny_models, registry)
    noise = np.random.default_rng(0).integers(0, 256, size=(1000, 1000, 3), dtype=np.uint8)
    large_jpeg = encode_jpeg(noise, quality=95)
    assert FRAMES_FETCH_BYTES < len(large_jpeg) < settings.edge.max_frame_bytes
    frames: list[Frame] = []
    for index in range(8):  # eight cameras: every partition holds large frames between small ones
        small = make_frames(f"cam-{index}", 6, seed=index)
        frames += [*small[:3], small[3].model_copy(update={"jpeg": large_jpeg}), *small[4:]]

    # all in Kafka before the worker starts: its full fetches meet them
    assert {v.frame_id for v in answered_by_a_worker(settings, edge_model, frames)} == {f.frame_id for f in frames}


def test_sigkill_mid_stream_then_restart_every_frame_gets_a_final_verdict(
    stack_state, tmp_path: Path, tiny_models: ModelPaths
) -> None:
    registry = tmp_path / "switchers"
    registry_with_untrained(tiny_models, registry, threshold=0.0)
    settings = worker_settings(stack_state, tmp_path, tiny_models, registry, batch_size=2)
    first, second = make_frames("cam-g", 60), make_frames("cam-g", 60, first_seq=60)
    all_ids = {f.frame_id for f in first + second}

    asyncio.run(publish_frames(settings, first))
    with service_process("edge_workers", settings, tmp_path) as worker:
        asyncio.run(consume_until(settings, settings.kafka.topics.verdicts, Verdict, lambda m: len(m) >= 10))
        worker.send_signal(signal.SIGKILL)  # mid-stream: more frames keep coming while it is dead
        worker.wait(timeout=30)
    assert worker.returncode == -signal.SIGKILL
    asyncio.run(publish_frames(settings, second))
    with service_process("edge_workers", settings, tmp_path):
        verdicts = asyncio.run(
            consume_until(
                settings,
                settings.kafka.topics.verdicts,
                Verdict,
                lambda m: {v.frame_id for v in m if v.final} >= all_ids,
                timeout_s=180,
            )
        )

    assert {v.frame_id for v in verdicts if v.final} == all_ids, "every frame has a final verdict"
    frames = {f.frame_id: f for f in first + second}
    assert {v.frame_id for v in verdicts} == all_ids, "verdicts of these frames only"
    assert all(
        (v.camera_id, v.room, v.captured_at) == (frames[v.frame_id].camera_id, "101", frames[v.frame_id].captured_at)
        for v in verdicts
    )
    # At-least-once: a batch answered but not committed before the kill is answered again by the restarted
    # worker. Every copy of a frame's verdict must say the same, so a consumer may keep any one of them.
    copies: dict[str, list[Verdict]] = defaultdict(list)
    for verdict in verdicts:
        copies[verdict.frame_id].append(verdict)
    for frame_id, answers in copies.items():
        assert len({(a.source, a.final, a.decision, a.edge_model, a.switcher_version) for a in answers}) == 1, frame_id
        probabilities = [a.fall_probability for a in answers]
        assert max(probabilities) - min(probabilities) < 1e-4, frame_id  # batch composition moves only the last bits


def test_a_worker_joining_mid_stream_takes_partitions_without_losing_a_frame(
    stack_state, tmp_path: Path, tiny_models: ModelPaths, edge_model: EdgeModel
) -> None:
    """A second worker joins the group mid-stream, so partitions move while the first worker has batches in
    flight and records fetched ahead; every frame still gets a final verdict, and the group commits them all."""
    registry = tmp_path / "switchers"
    registry_with_untrained(tiny_models, registry, threshold=0.0)  # nothing offloaded: every verdict is final
    settings = worker_settings(stack_state, tmp_path, tiny_models, registry)
    cameras = [f"cam-r{index}" for index in range(8)]  # spread over every partition
    first = [frame for index, camera in enumerate(cameras) for frame in make_frames(camera, 15, seed=index)]
    second = [frame for index, camera in enumerate(cameras)
              for frame in make_frames(camera, 15, first_seq=15, seed=index)]  # fmt: skip
    all_ids = {frame.frame_id for frame in first + second}

    def answered(worker: EdgeWorker) -> float:
        return worker.metrics.registry.get_sample_value("fallwatch_edge_frames_total") or 0

    async def scenario() -> tuple[list[Verdict], float, float]:
        await publish_frames(settings, first)
        async with running(EdgeWorker(settings, edge_model)) as first_worker:
            await until(lambda: answered(first_worker) >= 20, "the first worker answering")
            # its own model: one `predict` at a time per instance
            async with running(EdgeWorker(settings, load_edge_model(settings))) as second_worker:
                # the second worker holds partitions: the second half is shared
                await until_group_stable_with(settings, settings.edge.group_id, 2)
                await publish_frames(settings, second)
                verdicts = await consume_until(
                    settings, settings.kafka.topics.verdicts, Verdict,
                    lambda m: {v.frame_id for v in m if v.final} >= all_ids, timeout_s=180,
                )  # fmt: skip
                # every frame's offset committed (or the test fails here)
                await until_caught_up(settings, settings.edge.group_id, settings.kafka.topics.frames, 60)
        return verdicts, answered(first_worker), answered(second_worker)

    verdicts, by_first, by_second = asyncio.run(scenario())
    assert {v.frame_id for v in verdicts if v.final} == all_ids
    assert by_first > 0 and by_second > 0, "the partitions were shared"
