"""The cloud worker on the real stack with the tiny LLaVA-NeXT-Video: batching, deadlines, fallbacks, restarts.

Requests are made with the edge worker's own claim check and request builder
(`fallwatch.devkit.cloud_requests.publish_requests`: the clip's frames to Redis, the last
one to `frames`, the request to `cloud-requests`); the worker runs
in this process (the model loads once) except in the restart test, which runs
`python -m cloud_workers` as a subprocess and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from aiokafka import AIOKafkaProducer

from cloud_workers.energy import CostMeter, RaplEnergyMeter
from cloud_workers.model import LlavaVideoCloudModel
from cloud_workers.service import CloudWorker, decode_clips, run_cloud_worker
from core.images import decode_jpeg_rgb, encode_jpeg_rgb
from core.kafka_io import consumer_group_lag, make_producer
from core.settings import Settings
from fallwatch.cli import main
from fallwatch.devkit.cloud_requests import publish_requests, synthetic_clip
from fallwatch.devkit.models import ModelPaths
from schemas import CloudRequest, DeadLetter, KafkaPosition, Verdict, encode, utc_now
from tests.conftest import (
    REPO,
    consume_until,
    read_all,
    running,
    settings_for,
    until_caught_up,
    until_group_stable_with,
    write_config,
)

NUM_FRAMES = 4
CLIP_FRAMES = 4
QUESTION = "Is the person falling or lying on the floor?"


def small_clip(seed: int) -> list[np.ndarray]:
    return synthetic_clip(seed, CLIP_FRAMES, height=96, width=128)


def worker_settings(stack_state, tmp_path: Path, tiny: ModelPaths, **cloud: object) -> Settings:
    settings = settings_for(
        stack_state, tmp_path, cloud={"model": str(tiny.cloud), "num_frames": NUM_FRAMES, "device": "cpu", **cloud}
    )
    # A consumer group of this test's own, so no other test's worker shares its rebalances.
    group_id = f"{settings.kafka.topics.cloud_requests}-workers"
    return settings.model_copy(update={"cloud": settings.cloud.model_copy(update={"group_id": group_id})})


def load_tiny_cloud_model(tiny: ModelPaths) -> LlavaVideoCloudModel:
    return LlavaVideoCloudModel.from_pretrained(str(tiny.cloud), QUESTION, num_frames=NUM_FRAMES, device="cpu")


@pytest.fixture(scope="module")
def cloud_model(tiny_models: ModelPaths) -> LlavaVideoCloudModel:
    return load_tiny_cloud_model(tiny_models)


def after_each_prepare(model: LlavaVideoCloudModel, then: Callable[[list[list[np.ndarray]]], None]) -> None:
    """`then(clips)` runs on the worker's thread after each batch of clips is pre-processed."""
    prepare = model.prepare

    def prepared(clips: list[list[np.ndarray]]) -> dict[str, torch.Tensor]:
        inputs = prepare(clips)
        then(clips)
        return inputs

    model.prepare = prepared  # type: ignore[method-assign]


class HeldForward:
    """Holds a model's forward until the test releases it: a hung GPU (there is no GPU here)."""

    def __init__(self, model: LlavaVideoCloudModel) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        model.model.register_forward_pre_hook(self.hold)

    def hold(self, module: torch.nn.Module, args: object) -> None:
        self.entered.set()
        self.release.wait()

    async def until_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 120), "the worker never took a batch"


async def wait_for_finals(settings: Settings, frame_ids: set[str], timeout_s: float = 120.0) -> list[Verdict]:
    """Every verdict read until each of `frame_ids` has a final one."""
    return await consume_until(
        settings, settings.kafka.topics.verdicts, Verdict,
        lambda m: frame_ids <= {v.frame_id for v in m if v.final}, timeout_s=timeout_s,
    )  # fmt: skip


def decoded(clip: list[np.ndarray]) -> list[np.ndarray]:
    """The clip as the worker sees it: through the JPEG round trip."""
    frames = [decode_jpeg_rgb(encode_jpeg_rgb(frame)) for frame in clip]
    assert all(frame is not None for frame in frames)
    return [frame for frame in frames if frame is not None]


def test_batches_fill_under_load(stack_state, tmp_path: Path, tiny_models, cloud_model) -> None:
    # 24 requests wait in the topic before the worker starts: every batch fills to 8 at once,
    # long before the generous 5 s window would close it.
    settings = worker_settings(stack_state, tmp_path, tiny_models, batch_size=8, batch_wait_ms=5000)
    clips = [small_clip(seed) for seed in range(24)]

    async def scenario() -> tuple[list[CloudRequest], list[Verdict], CloudWorker, int]:
        requests = await publish_requests(settings, clips)
        async with running(CloudWorker(settings, cloud_model)) as worker:
            verdicts = await wait_for_finals(settings, {r.frame_id for r in requests})
        lag = await consumer_group_lag(settings, settings.cloud.group_id, settings.kafka.topics.cloud_requests)
        return requests, verdicts, worker, lag

    requests, verdicts, worker, lag = asyncio.run(scenario())
    assert len(verdicts) == 24 and {v.frame_id for v in verdicts} == {r.frame_id for r in requests}
    assert {v.source for v in verdicts} == {"cloud"}
    assert [v.batch_size for v in verdicts] == [8] * 24
    assert all(v.timings_ms["collect"] < 5000 for v in verdicts), "full batches close on size, not on time"
    for verdict in verdicts:
        timings = verdict.timings_ms
        assert timings["model_per_request"] * 8 == pytest.approx(timings["preprocess"] + timings["model"])
        assert timings["worker"] >= timings["queue"] + timings["model"]
        assert (verdict.energy_j is None) == (worker.costs.energy is None)
        assert verdict.gpu_memory_mb is None, "a CPU model reports no GPU memory"
    assert worker.metrics.value("fallwatch_cloud_batch_size_count") == 3
    assert worker.metrics.value("fallwatch_cloud_batch_size_sum") == 24
    assert worker.metrics.value("fallwatch_cloud_requests_total", outcome="cloud") == 24
    assert lag == 0, "every offset committed after its verdict"

    # The verdict is the model's answer for that clip (after the JPEG round trip).
    by_frame = {v.frame_id: v for v in verdicts}
    expected = cloud_model.predict([decoded(clip) for clip in clips[:8]])
    answered = [by_frame[r.frame_id].fall_probability for r in requests[:8]]
    np.testing.assert_allclose(answered, expected, atol=1e-4)


def test_a_lone_request_is_answered_when_the_window_closes(
    stack_state, tmp_path: Path, tiny_models, cloud_model
) -> None:
    window_ms = 400
    settings = worker_settings(stack_state, tmp_path, tiny_models, batch_size=8, batch_wait_ms=window_ms)

    async def scenario() -> list[Verdict]:
        async with running(CloudWorker(settings, cloud_model)):
            answered: list[Verdict] = []
            for round_ in range(2):  # one at a time: each request alone in its batch
                [request] = await publish_requests(settings, [small_clip(100 + round_)], first_seq=round_)
                answered += [
                    v for v in await wait_for_finals(settings, {request.frame_id}) if v.frame_id == request.frame_id
                ]
            return answered

    verdicts = asyncio.run(scenario())
    assert len(verdicts) == 2
    for verdict in verdicts:
        assert verdict.source == "cloud" and verdict.batch_size == 1
        # It waited the whole window for company, and not much longer (scheduling on a busy CPU).
        assert window_ms <= verdict.timings_ms["queue"] < window_ms + 250
        assert verdict.timings_ms["collect"] == verdict.timings_ms["queue"]


def test_deadlines_expired_clips_and_malformed_requests(stack_state, tmp_path: Path, tiny_models, cloud_model) -> None:
    settings = worker_settings(stack_state, tmp_path, tiny_models, batch_size=4, batch_wait_ms=200)
    topic = settings.kafka.topics.cloud_requests

    async def scenario() -> tuple[dict[str, list[CloudRequest]], list[Verdict], list[DeadLetter], CloudWorker]:
        groups = {
            "late": await publish_requests(settings, [small_clip(s) for s in (1, 2, 3)], deadline_s=-1.0),
            "no_clip": await publish_requests(
                settings, [small_clip(s) for s in (4, 5)], store_clips=False, first_seq=10
            ),
            "fresh": await publish_requests(settings, [small_clip(s) for s in (6, 7)], first_seq=20),
        }
        # A clip that expired and a frame that is not where the request says (retention
        # took it; here: the position of another frame): nothing to show the model.
        [lost] = await publish_requests(settings, [small_clip(8)], store_clips=False, first_seq=30, send_requests=False)
        other = groups["fresh"][0].frame_position
        lost = lost.model_copy(update={"frame_position": KafkaPosition(**other.model_dump())})
        producer: AIOKafkaProducer = make_producer(settings)
        await producer.start()
        await producer.send_and_wait(topic, key=b"cam-a", value=encode(lost))
        await producer.send_and_wait(topic, key=b"cam-a", value=b'{"not": "a request"}')
        # a position no consumer can seek to (no clip either): refused, not a crash on every restart
        nowhere = encode(lost).replace(f'"offset":{lost.frame_position.offset}'.encode(), b'"offset":-1')
        assert nowhere != encode(lost)
        await producer.send_and_wait(topic, key=b"cam-a", value=nowhere)
        await producer.stop()
        groups["lost"] = [lost]
        frame_ids = {r.frame_id for requests in groups.values() for r in requests}
        async with running(CloudWorker(settings, cloud_model)) as worker:
            verdicts = await wait_for_finals(settings, frame_ids)
            dead = await consume_until(settings, settings.kafka.topics.dead_letters, DeadLetter, lambda m: len(m) >= 2)
        return groups, verdicts, dead, worker

    groups, verdicts, dead, worker = asyncio.run(scenario())
    by_frame = {v.frame_id: v for v in verdicts}
    assert len(verdicts) == len(by_frame) == 8, "one final verdict per request, nothing else"
    for request in groups["late"] + groups["lost"]:
        verdict = by_frame[request.frame_id]
        assert verdict.source == "edge-fallback" and verdict.final
        assert verdict.fall_probability == request.edge.fall_probability and verdict.cloud_model is None
    for request in groups["fresh"] + groups["no_clip"]:
        assert by_frame[request.frame_id].source == "cloud"
    # An expired clip is answered from the frame alone, read back from `frames`.
    for request, seed in zip(groups["no_clip"], (4, 5), strict=True):
        frame_only = cloud_model.predict([decoded(small_clip(seed))[-1:]])[0]
        assert by_frame[request.frame_id].fall_probability == pytest.approx(frame_only, abs=1e-4)
    metrics = worker.metrics
    assert metrics.value("fallwatch_cloud_requests_total", outcome="deadline") == 3
    assert metrics.value("fallwatch_cloud_requests_total", outcome="no_clip") == 1
    assert metrics.value("fallwatch_cloud_requests_total", outcome="cloud") == 4
    assert metrics.value("fallwatch_cloud_requests_total", outcome="dead_letter") == 2
    assert metrics.value("fallwatch_cloud_clip_fallbacks_total") == 3
    assert len(dead) == 2 and {letter.service for letter in dead} == {"cloud_workers"}
    assert dead[0].size == len(b'{"not": "a request"}') and "invalid CloudRequest" in dead[0].reason
    assert "frame_position.offset: Input should be greater than or equal to 0" in dead[1].reason


def test_a_model_that_answers_nan_leaves_the_edge_answers_final(stack_state, tmp_path: Path, tiny_models) -> None:
    settings = worker_settings(stack_state, tmp_path, tiny_models, batch_size=4, batch_wait_ms=100)
    model = load_tiny_cloud_model(tiny_models)
    with torch.no_grad():  # an overflow somewhere in the model: every logit NaN
        model.model.get_output_embeddings().weight.fill_(float("nan"))

    async def scenario() -> tuple[list[CloudRequest], list[Verdict], CloudWorker]:
        requests = await publish_requests(settings, [small_clip(seed) for seed in (1, 2, 3)])
        async with running(CloudWorker(settings, model)) as worker:
            verdicts = await wait_for_finals(settings, {request.frame_id for request in requests})
            await until_caught_up(settings, settings.cloud.group_id, settings.kafka.topics.cloud_requests)
        return requests, verdicts, worker

    requests, verdicts, worker = asyncio.run(scenario())
    by_frame = {verdict.frame_id: verdict for verdict in verdicts}
    assert len(verdicts) == len(by_frame) == len(requests)
    for request in requests:
        verdict = by_frame[request.frame_id]
        assert (verdict.source, verdict.fall_probability) == ("edge-fallback", request.edge.fall_probability)
    assert worker.metrics.value("fallwatch_cloud_requests_total", outcome="no_answer") == len(requests)


def test_a_stopped_worker_answers_every_live_request_after_restart(stack_state, tmp_path: Path, tiny_models) -> None:
    settings = worker_settings(stack_state, tmp_path, tiny_models, batch_size=4, batch_wait_ms=100)
    env = write_config(settings, tmp_path / "cloud.yaml")
    log_path = tmp_path / "cloud.log"

    def start() -> subprocess.Popen:
        with log_path.open("a") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "cloud_workers"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def stop(process: subprocess.Popen) -> int:
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=60)

    async def scenario() -> tuple[set[str], set[str], list[Verdict], int, int]:
        first = await publish_requests(settings, [small_clip(s) for s in range(12)])
        worker = start()
        try:
            await consume_until(settings, settings.kafka.topics.verdicts, Verdict, lambda m: len(m) >= 1, timeout_s=180)
        finally:
            first_exit = stop(worker)
        # While the worker is down: more requests, some of which expire before it returns.
        second = await publish_requests(settings, [small_clip(s) for s in range(12, 24)], first_seq=12)
        expired = await publish_requests(settings, [small_clip(s) for s in range(24, 27)], deadline_s=-1, first_seq=24)
        live = {r.frame_id for r in first + second}
        late = {r.frame_id for r in expired}
        worker = start()
        try:
            verdicts = await wait_for_finals(settings, live | late, timeout_s=180)
        finally:
            second_exit = stop(worker)
        lag = await consumer_group_lag(settings, settings.cloud.group_id, settings.kafka.topics.cloud_requests)
        assert lag == 0, "the restarted worker committed everything it answered"
        return live, late, verdicts, first_exit, second_exit

    live, late, verdicts, first_exit, second_exit = asyncio.run(scenario())
    assert (first_exit, second_exit) == (0, 0), log_path.read_text()[-3000:]
    sources = Counter((v.frame_id in live, v.source) for v in verdicts)
    cloud_answered = {v.frame_id for v in verdicts if v.source == "cloud"}
    assert cloud_answered == live, "every live request answered by the model, across the restart"
    assert {v.frame_id for v in verdicts if v.source == "edge-fallback"} == late
    assert sources[(True, "edge-fallback")] == 0


def test_a_batch_slower_than_the_poll_interval_keeps_the_partitions(stack_state, tmp_path: Path, tiny_models) -> None:
    # Kafka evicts a member that has not polled for max.poll.interval.ms (1 s here), and every batch
    # takes 2 s in the model. The worker polls, partitions paused, while it waits, so it keeps its
    # partitions and answers each request once; evicted, its commit would be refused and the new
    # owner of the partitions would answer the batch again.
    settings = worker_settings(
        stack_state, tmp_path, tiny_models, batch_size=4, batch_wait_ms=100, keepalive_s=0.2, max_poll_interval_ms=1000
    )
    slow = load_tiny_cloud_model(tiny_models)
    # A GPU slower than the poll interval (there is no GPU here): the forward itself takes 2 s.
    slow.model.register_forward_pre_hook(lambda module, args: time.sleep(2.0))

    async def scenario() -> tuple[list[CloudRequest], list[Verdict], int]:
        # Four batches: the group checks a member's last poll only every few seconds.
        requests = await publish_requests(settings, [small_clip(seed) for seed in range(16)])
        async with running(CloudWorker(settings, slow)):
            await wait_for_finals(settings, {r.frame_id for r in requests})
        # The worker has stopped: everything it wrote is on the topic now.
        verdicts = await read_all(settings, settings.kafka.topics.verdicts, Verdict)
        lag = await consumer_group_lag(settings, settings.cloud.group_id, settings.kafka.topics.cloud_requests)
        return requests, verdicts, lag

    requests, verdicts, lag = asyncio.run(scenario())
    assert sorted(v.frame_id for v in verdicts) == sorted(r.frame_id for r in requests), "each answered once"
    assert {v.source for v in verdicts} == {"cloud"}
    assert min(v.timings_ms["model"] for v in verdicts) >= 2000, "every batch outlasted the poll interval"
    assert lag == 0, "every batch committed: the group never took the partitions away"


def test_a_batch_whose_frames_are_slow_to_read_back_keeps_the_partitions(
    stack_state, tmp_path: Path, tiny_models, cloud_model, caplog: pytest.LogCaptureFixture
) -> None:
    # No clip in Redis, and each frame's position on a partition `frames` does not have: every read back
    # waits frame_fetch_timeout_s, so a batch of 4 takes 2.4 s to prepare, past the 1 s poll interval.
    # Evicted, the worker would lose its partitions mid-batch (a second worker would answer it again).
    settings = worker_settings(
        stack_state, tmp_path, tiny_models, batch_size=4, batch_wait_ms=100,
        keepalive_s=0.2, max_poll_interval_ms=1000, frame_fetch_timeout_s=0.6,
    )  # fmt: skip
    topic = settings.kafka.topics.cloud_requests

    async def scenario() -> tuple[list[CloudRequest], list[Verdict], int]:
        clips = [small_clip(seed) for seed in range(12)]
        made = await publish_requests(settings, clips, store_clips=False, send_requests=False)
        requests = [
            r.model_copy(update={"frame_position": r.frame_position.model_copy(update={"partition": 999})})
            for r in made
        ]
        producer: AIOKafkaProducer = make_producer(settings)
        await producer.start()
        for request in requests:
            await producer.send_and_wait(topic, key=request.camera_id.encode(), value=encode(request))
        await producer.stop()
        async with running(CloudWorker(settings, cloud_model)):
            await wait_for_finals(settings, {r.frame_id for r in requests})
        verdicts = await read_all(settings, settings.kafka.topics.verdicts, Verdict)
        lag = await consumer_group_lag(settings, settings.cloud.group_id, topic)
        return requests, verdicts, lag

    with caplog.at_level(logging.INFO, logger="core.consumer"):
        requests, verdicts, lag = asyncio.run(scenario())
    assert sorted(v.frame_id for v in verdicts) == sorted(r.frame_id for r in requests), "each answered once"
    assert {v.source for v in verdicts} == {"edge-fallback"}, "no frame to show the model"
    assert lag == 0, "every batch committed"
    assert "revoked" not in caplog.text, "the group never took the partitions away"


def test_a_stuck_batch_hands_its_partitions_to_another_worker(
    stack_state, tmp_path: Path, tiny_models, cloud_model
) -> None:
    # The first worker's GPU hangs in its first batch: the forward blocks until the test lets it go.
    # Past stuck_batch_s the worker stops polling, the group evicts it a poll interval later, and a
    # second worker answers every request, the hung batch's included, while the first still hangs.
    settings = worker_settings(
        stack_state, tmp_path, tiny_models, batch_size=4, batch_wait_ms=100,
        keepalive_s=0.2, max_poll_interval_ms=1000, stuck_batch_s=1.0,
    )  # fmt: skip
    hung = load_tiny_cloud_model(tiny_models)
    held = HeldForward(hung)

    async def scenario() -> tuple[list[CloudRequest], list[Verdict], int]:
        requests = await publish_requests(settings, [small_clip(seed) for seed in range(8)])
        stop_hung = asyncio.Event()
        hung_worker = asyncio.create_task(CloudWorker(settings, hung).run(stop_hung))
        try:
            await held.until_entered()
            async with running(CloudWorker(settings, cloud_model)):
                verdicts = await wait_for_finals(settings, {r.frame_id for r in requests})
        finally:
            held.release.set()
            stop_hung.set()
            await hung_worker  # it answers its batch again, and its commit is refused: it survives that
        lag = await consumer_group_lag(settings, settings.cloud.group_id, settings.kafka.topics.cloud_requests)
        return requests, verdicts, lag

    requests, verdicts, lag = asyncio.run(scenario())
    assert {v.frame_id for v in verdicts if v.source == "cloud"} == {r.frame_id for r in requests}
    assert lag == 0, "the second worker committed every request"


def test_a_worker_joining_mid_batch_takes_partitions_and_the_first_survives(
    stack_state, tmp_path: Path, tiny_models, cloud_model
) -> None:
    # A second GPU worker joins while the first has a batch in the model; the rebalance moves some of
    # that batch's partitions to the newcomer. The first worker commits what it still holds and lives
    # on; the newcomer answers the moved requests again (at-least-once).
    settings = worker_settings(stack_state, tmp_path, tiny_models, batch_size=8, batch_wait_ms=100, keepalive_s=0.2)
    first_model = load_tiny_cloud_model(tiny_models)
    held = HeldForward(first_model)
    cameras = tuple(f"cam-j{index}" for index in range(8))  # spread over every partition

    async def scenario() -> tuple[list[CloudRequest], list[Verdict], int]:
        requests = await publish_requests(settings, [small_clip(seed) for seed in range(8)], cameras=cameras)
        try:
            async with running(CloudWorker(settings, first_model)):
                await held.until_entered()
                async with running(CloudWorker(settings, cloud_model)):
                    await until_group_stable_with(settings, settings.cloud.group_id, 2)
                    held.release.set()
                    verdicts = await wait_for_finals(settings, {r.frame_id for r in requests})
        finally:
            held.release.set()
        lag = await consumer_group_lag(settings, settings.cloud.group_id, settings.kafka.topics.cloud_requests)
        return requests, verdicts, lag

    requests, verdicts, lag = asyncio.run(scenario())  # a worker that failed re-raises here, on leaving `running`
    assert {v.frame_id for v in verdicts if v.source == "cloud"} == {r.frame_id for r in requests}
    assert lag == 0, "every request committed by one worker or the other"


def test_the_next_batch_is_pre_processed_while_one_is_in_the_model(stack_state, tmp_path: Path, tiny_models) -> None:
    # On a GPU machine the clips' CPU work (resizing, tokenizing) would otherwise leave the GPU idle.
    settings = worker_settings(stack_state, tmp_path, tiny_models, batch_size=4, batch_wait_ms=100)
    model = load_tiny_cloud_model(tiny_models)
    held = HeldForward(model)
    prepared_batches: list[int] = []
    second_prepared = threading.Event()

    def count(clips: list[list[np.ndarray]]) -> None:
        prepared_batches.append(len(clips))
        if len(prepared_batches) == 2:
            second_prepared.set()

    after_each_prepare(model, count)

    async def scenario() -> tuple[list[CloudRequest], list[Verdict], bool]:
        requests = await publish_requests(settings, [small_clip(seed) for seed in range(8)])
        try:
            async with running(CloudWorker(settings, model)):
                await held.until_entered()
                overlapped = await asyncio.to_thread(second_prepared.wait, 120)
                held.release.set()
                verdicts = await wait_for_finals(settings, {r.frame_id for r in requests})
        finally:
            held.release.set()
        return requests, verdicts, overlapped

    requests, verdicts, overlapped = asyncio.run(scenario())
    assert overlapped, "the second batch was pre-processed while the first was held in the model"
    assert sum(prepared_batches) == 8 and {v.frame_id for v in verdicts} == {r.frame_id for r in requests}
    assert all(v.timings_ms["preprocess"] > 0 for v in verdicts)


def test_requests_that_expire_waiting_for_the_model_or_in_it_get_the_edge_answer(
    stack_state, tmp_path: Path, tiny_models, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A forward slower than the deadlines (a hung GPU): the batch in the model and the one prepared
    # behind it both expire. Alerting stopped waiting for them, so neither may get a cloud verdict.
    settings = worker_settings(stack_state, tmp_path, tiny_models, batch_size=4, batch_wait_ms=100)
    model = load_tiny_cloud_model(tiny_models)
    held = HeldForward(model)
    forwards: list[int] = []
    model.model.register_forward_pre_hook(lambda module, args: forwards.append(len(forwards)))
    second_prepared = threading.Event()

    def behind_the_held_batch(clips: list[list[np.ndarray]]) -> None:
        if held.entered.is_set():
            second_prepared.set()

    after_each_prepare(model, behind_the_held_batch)

    async def scenario() -> tuple[list[CloudRequest], list[Verdict], CloudWorker]:
        requests = await publish_requests(settings, [small_clip(seed) for seed in range(8)])
        try:
            async with running(CloudWorker(settings, model)) as worker:
                await held.until_entered()
                assert await asyncio.to_thread(second_prepared.wait, 120), "no batch was prepared behind the held one"
                # the worker's clock, past every deadline
                monkeypatch.setattr("cloud_workers.service.utc_now", lambda: utc_now() + timedelta(hours=1))
                held.release.set()
                await wait_for_finals(settings, {r.frame_id for r in requests})
                await until_caught_up(settings, settings.cloud.group_id, settings.kafka.topics.cloud_requests)
        finally:
            held.release.set()
        return requests, await read_all(settings, settings.kafka.topics.verdicts, Verdict), worker

    requests, verdicts, worker = asyncio.run(scenario())
    assert sorted(v.frame_id for v in verdicts) == sorted(r.frame_id for r in requests), "one verdict per request"
    by_frame = {verdict.frame_id: verdict for verdict in verdicts}
    for request in requests:
        verdict = by_frame[request.frame_id]
        assert (verdict.source, verdict.final) == ("edge-fallback", True)
        assert verdict.fall_probability == request.edge.fall_probability
    assert len(forwards) == 1, "the batch whose requests expired waiting for the model skipped the forward"
    assert worker.metrics.value("fallwatch_cloud_requests_total", outcome="deadline") == len(requests)
    assert worker.metrics.value("fallwatch_cloud_requests_total", outcome="cloud") == 0


def test_clips_decode_in_order_without_their_undecodable_frames() -> None:
    jpegs = [encode_jpeg_rgb(small_clip(seed)[0]) for seed in range(3)]
    frames = [decode_jpeg_rgb(jpeg) for jpeg in jpegs]
    with ThreadPoolExecutor(2) as pool:
        clips = decode_clips([[jpegs[0], b"not a jpeg", jpegs[1]], [b"\xff\xd8 torn"], [jpegs[2]]], pool)
    first, lost, last = clips
    assert first is not None and len(first) == 2
    assert np.array_equal(first[0], frames[0]) and np.array_equal(first[1], frames[1])
    assert lost is None, "no frame left: the frame fallback answers it"
    assert last is not None and len(last) == 1 and np.array_equal(last[0], frames[2])


def test_rapl_meter_sums_packages_and_survives_wrap_around(tmp_path: Path) -> None:
    # The powercap layout of a two-socket machine; a sub-zone (cores) must not count twice.
    for name, energy in (("intel-rapl:0", 1_000_000), ("intel-rapl:1", 5_000_000), ("intel-rapl:0:0", 7)):
        zone = tmp_path / name
        zone.mkdir()
        (zone / "energy_uj").write_text(f"{energy}\n")
        (zone / "max_energy_range_uj").write_text("10000000\n")
    meter = RaplEnergyMeter.from_powercap(tmp_path)
    assert meter is not None and len(meter.zones) == 2
    start = meter.read_joules()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("3000000\n")  # +2 J
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("500000\n")  # wrapped: +5.5 J
    assert meter.read_joules() - start == pytest.approx(7.5)
    costs = CostMeter(torch.device("cpu"), meter)
    costs.start()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("4250000\n")  # +1.25 J during the "batch"
    cost = costs.stop()
    assert cost.energy_j == pytest.approx(1.25) and cost.gpu_memory_mb is None
    assert RaplEnergyMeter.from_powercap(tmp_path / "absent") is None


def test_bench_cloud_prints_its_tables(local_stack, stack_state, tmp_path: Path) -> None:
    # The smallest run of every part; it uses the session's stack through its state directory.
    settings = settings_for(stack_state, tmp_path).model_copy(update={"state_dir": local_stack.state_dir})
    env = write_config(settings, tmp_path / "bench.yaml")
    options = {
        "--batch-sizes": "1,2", "--frames": "2", "--repeats": "1", "--generate-tokens": "2",
        "--agreement-clips": "4", "--worker-requests": "6", "--worker-batch": "2", "--worker-rounds": "1",
    }  # fmt: skip
    command = [sys.executable, "-m", "fallwatch", "bench", "cloud", *(x for kv in options.items() for x in kv)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "model alone" in out and "one forward vs generate writing exactly 2 new tokens" in out
    assert "worker on Kafka + Redis" in out and "worker vs the model's own batched throughput" in out
    model_table = out.split("worker on Kafka + Redis")[0]
    for batch_size in (1, 2):  # a row per batch size in the first table, with its requests/s
        assert re.search(rf"^│\s+{batch_size} │\s+[\d.]+ │\s+[\d.]+ │\s+[\d.]+ │", model_table, re.MULTILINE), out
    agreement = re.search(r"^agreement, .*: (\d+)/(\d+) clips", out, re.MULTILINE)
    assert agreement is not None and agreement.groups() == ("4", "4"), "the restricted copy says Yes iff P(Yes) > 0.5"
    worker_row = re.search(r"^│\s+1 │\s+6 │\s+2 │\s+([\d.]+) │", out, re.MULTILINE)
    assert worker_row is not None, out
    assert 1.0 <= float(worker_row.group(1)) <= 2.0, "mean batch formed, at most the worker's batch size"
    for baseline in ("JPEG clips in memory", "decoded clips in memory", "pre-processed tensors in memory"):
        ratio = re.search(rf"^│\s+{baseline} → .* │\s+[\d.]+ \([\d.]+\) │\s+([\d.]+) │$", out, re.MULTILINE)
        assert ratio is not None and float(ratio.group(1)) > 0, out


def test_bench_cloud_rejects_a_bad_option_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "cloud", "--model", "gpt"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: Invalid value for '--model': 'gpt' is not one of 'tiny', 'configured', 'random-7b'. "
        "(see fallwatch bench cloud --help)"
    )


def test_cloud_torch_threads_sets_the_cpu_threads(stack_state, tmp_path: Path, tiny_models, cloud_model) -> None:
    settings = worker_settings(stack_state, tmp_path, tiny_models, torch_threads=1)
    stop = asyncio.Event()
    stop.set()  # start, apply the settings, stop at once
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        asyncio.run(run_cloud_worker(settings, stop, cloud_model))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
