"""The chaos suite: the whole pipeline on the real stack, one fault per scenario, each ending with counts.

Edge worker, cloud worker and alerting run as `python -m <service>` (tiny models, every frame a fall, so each
camera opens one alert); the test publishes frames itself, so it knows every frame that must get an answer.
Each scenario uses cameras of its own and ends when every frame it published has a final verdict, then
checks: one alert per camera (no duplicate alert ids), each alert accepted once by the webhook receiver, every
service alive, every bad record dead-lettered with a reason. The scenarios end by those counts, not by
waiting a fixed time. `SCENARIOS` collects one row per scenario for the table printed at the end.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from aiokafka import TopicPartition

from core.images import encode_jpeg
from core.kafka_io import make_consumer, make_producer
from core.redis_io import sync_redis_client
from core.settings import Settings
from fallwatch.devkit.models import ModelPaths
from fallwatch.stack import LocalStack, StackState
from schemas import DeadLetter, FallEvent, Frame, Verdict, encode
from tests.alerting_helpers import WEBHOOK_SECRET, WebhookReceiver, wait_for
from tests.conftest import REPO, settings_for, write_config
from tests.test_edge_worker import make_frames

FRAMES_PER_CAMERA = 8
CAMERAS = 3
WAIT_S = 120.0
SERVICES = ("edge_workers", "cloud_workers", "alerting")


@dataclass
class Row:
    scenario: str
    frames_in: int
    final: int
    duplicates: int
    alerts: int
    dead_letters: int


SCENARIOS: list[Row] = []


@dataclass
class Pipeline:
    settings: Settings
    tmp_path: Path
    receiver: WebhookReceiver
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def start(self, service: str) -> None:
        env = write_config(self.settings, self.tmp_path / f"{service}.yaml")
        log_path = self.tmp_path / f"{service}-{uuid.uuid4().hex[:4]}.log"
        with log_path.open("wb") as log_file:
            self.processes[service] = subprocess.Popen(
                [sys.executable, "-m", service], cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        self.logs[service] = log_path

    def kill(self, service: str) -> None:
        process = self.processes[service]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def dead(self) -> dict[str, str]:
        """The services that exited, with the end of their logs."""
        return {
            name: self.logs[name].read_text()[-2000:]
            for name, process in self.processes.items()
            if process.poll() is not None
        }

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def pipeline(
    stack_state: StackState, tiny_models: ModelPaths, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    tmp_path = tmp_path_factory.mktemp("chaos")
    sections = tiny_models.settings_sections()
    with WebhookReceiver(WEBHOOK_SECRET).running() as receiver:
        settings = settings_for(
            stack_state,
            tmp_path,
            edge={
                **sections["edge"],
                "batch_size": 8,
                "batch_wait_ms": 20,
                "torch_threads": 1,
                "decision_threshold": 0.0,  # every frame a fall: each camera opens exactly one alert
                "switcher_threshold": 0.5,  # the untrained switcher offloads about half the frames
                "registry_announce_key": None,
            },
            cloud={
                **sections["cloud"],
                "batch_size": 8,
                "batch_wait_ms": 20,
                "torch_threads": 1,
                "device": "cpu",
                "decision_threshold": 0.0,
            },
            alerting={
                "k": 3,
                "n": 5,
                "down_for_s": 0.0,  # a camera's 8 frames span 1.75 s: the rule's mechanics, not its defaults
                "tick_s": 0.2,
                "cloud_wait_s": 3.0,  # a killed cloud worker's frames fall back to the edge's answer
                "webhook_urls": [f"{receiver.url}/alerts"],
                "webhook_secret": WEBHOOK_SECRET,
                "webhook_backoff_s": 0.2,
            },
        )
        settings.kafka.connect_timeout_s = 120.0  # longer than the broker scenario's outage
        running = Pipeline(settings, tmp_path, receiver)
        try:
            for service in SERVICES:
                running.start(service)
            yield running
        finally:
            running.stop()
            print_table()


def print_table() -> None:
    if not SCENARIOS:
        return
    header = f"{'scenario':<28} {'frames in':>9} {'final':>6} {'dup alerts':>10} {'alerts':>6} {'dead letters':>12}"
    lines = [header, "-" * len(header)]
    lines += [
        f"{r.scenario:<28} {r.frames_in:>9} {r.final:>6} {r.duplicates:>10} {r.alerts:>6} {r.dead_letters:>12}"
        for r in SCENARIOS
    ]
    print("\n" + "\n".join(lines))


# --- what the scenarios publish and count -----------------------------------------------------------


def scenario_frames(name: str) -> list[Frame]:
    return [
        frame
        for index in range(CAMERAS)
        for frame in make_frames(f"{name}-{index}-{uuid.uuid4().hex[:4]}", FRAMES_PER_CAMERA, seed=index)
    ]


async def publish(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> list[int]:
    """Send records and return their offsets once acked."""
    producer = make_producer(settings)
    await producer.start()
    try:
        acks = [await producer.send(topic, key=key, value=value) for key, value in records]
        return [(await ack).offset for ack in acks]
    finally:
        await producer.stop()


def publish_frames(settings: Settings, frames: list[Frame]) -> None:
    asyncio.run(publish(settings, settings.kafka.topics.frames, [(f.camera_id.encode(), encode(f)) for f in frames]))


async def read_topic(settings: Settings, topic: str, model: type) -> list:
    """Everything on `topic` up to its end now; records that are not `model` are skipped (bad records)."""
    consumer = make_consumer(settings, topic, group_id=None)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        end = await consumer.end_offsets(partitions)
        out = []
        while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    try:
                        out.append(model.model_validate_json(record.value))
                    except ValueError:
                        continue
        return out
    finally:
        await consumer.stop()


def final_frame_ids(settings: Settings) -> set[str]:
    verdicts = asyncio.run(read_topic(settings, settings.kafka.topics.verdicts, Verdict))
    return {verdict.frame_id for verdict in verdicts if verdict.final}


def until_answered(pipeline: Pipeline, frames: list[Frame], what: str) -> None:
    wanted = {frame.frame_id for frame in frames}

    def answered() -> bool:
        assert not pipeline.dead(), f"a service died during {what}: {pipeline.dead()}"
        return wanted <= final_frame_ids(pipeline.settings)

    wait_for(answered, f"a final verdict for every frame of {what}", WAIT_S)


def until_some_answered(pipeline: Pipeline, frames: list[Frame], what: str) -> None:
    wanted = {frame.frame_id for frame in frames}
    wait_for(lambda: wanted & final_frame_ids(pipeline.settings), f"the first verdicts of {what}", WAIT_S)


def finish(pipeline: Pipeline, name: str, frames: list[Frame], dead_letters: int = 0) -> Row:
    """The scenario's counts, once every frame has a final verdict, every alert is opened and delivered."""
    settings = pipeline.settings
    until_answered(pipeline, frames, name)
    cameras = {frame.camera_id for frame in frames}

    def alerts() -> list[FallEvent]:
        events = asyncio.run(read_topic(settings, settings.kafka.topics.fall_events, FallEvent))
        return [event for event in events if event.camera_id in cameras and event.state == "open"]

    wait_for(lambda: {event.camera_id for event in alerts()} == cameras, f"an alert for every camera of {name}", WAIT_S)
    opened = alerts()
    alert_ids = {event.alert_id for event in opened}

    def delivered() -> Counter[str]:
        return Counter(
            delivery.alert_id
            for delivery in pipeline.receiver.deliveries
            if delivery.status == 200 and delivery.alert_id in alert_ids
        )

    wait_for(lambda: set(delivered()) == alert_ids, f"the webhook of every alert of {name}", WAIT_S)
    final = {frame.frame_id for frame in frames} & final_frame_ids(settings)
    row = Row(name, len(frames), len(final), len(alert_ids) - len(cameras), len(alert_ids), dead_letters)
    SCENARIOS.append(row)
    assert row.final == row.frames_in, "every frame published has a final verdict"
    assert row.duplicates == 0, f"one alert id per camera, got {sorted(alert_ids)}"
    assert max(delivered().values()) == 1, f"each alert accepted once by the receiver: {delivered()}"
    assert not pipeline.dead(), f"every service alive: {pipeline.dead()}"
    return row


def killed_mid_stream(pipeline: Pipeline, service: str) -> None:
    frames = scenario_frames(f"kill-{service}")
    half = len(frames) // 2
    publish_frames(pipeline.settings, frames[:half])
    until_some_answered(pipeline, frames[:half], f"kill -9 {service}")
    pipeline.kill(service)
    publish_frames(pipeline.settings, frames[half:])
    pipeline.start(service)
    finish(pipeline, f"kill -9 {service}", frames)


# --- the scenarios ------------------------------------------------------------------------------------


def test_every_frame_is_answered_on_a_calm_pipeline(pipeline: Pipeline) -> None:
    frames = scenario_frames("calm")
    publish_frames(pipeline.settings, frames)
    finish(pipeline, "no fault", frames)


@pytest.mark.parametrize("service", SERVICES)
def test_kill_9_mid_stream_loses_nothing(pipeline: Pipeline, service: str) -> None:
    killed_mid_stream(pipeline, service)


def test_broker_stop_start_and_a_worker_started_while_it_is_down(pipeline: Pipeline, local_stack: LocalStack) -> None:
    frames = scenario_frames("broker")
    half = len(frames) // 2
    publish_frames(pipeline.settings, frames[:half])
    until_some_answered(pipeline, frames[:half], "the broker stop")
    pipeline.kill("edge_workers")
    local_stack.stop_kafka()
    try:
        pipeline.start("edge_workers")  # a service started while Kafka is down retries instead of exiting
        log = pipeline.logs["edge_workers"]
        wait_for(lambda: "not reachable" in log.read_text(), "the edge worker's retry line")
        assert pipeline.processes["edge_workers"].poll() is None, log.read_text()[-2000:]
    finally:
        local_stack.start_kafka_again()
    publish_frames(pipeline.settings, frames[half:])
    finish(pipeline, "broker stop/start", frames)


def test_redis_restarted_empty_is_waited_out_and_rebuilt(pipeline: Pipeline, local_stack: LocalStack) -> None:
    frames = scenario_frames("redis")
    third = len(frames) // 3
    publish_frames(pipeline.settings, frames[:third])
    until_some_answered(pipeline, frames[:third], "the Redis stop")
    local_stack.stop_redis()
    try:
        publish_frames(pipeline.settings, frames[third : 2 * third])  # answered while Redis is away
        until_some_answered(pipeline, frames[third : 2 * third], "the Redis outage")
    finally:
        local_stack.start_redis_again()
    publish_frames(pipeline.settings, frames[2 * third :])
    finish(pipeline, "Redis stop/start (empty)", frames)
    # every alert still open on fall-events is back in Redis, those opened before the restart too
    events = asyncio.run(read_topic(pipeline.settings, pipeline.settings.kafka.topics.fall_events, FallEvent))
    opened = {event.alert_id for event in events if event.state == "open"}
    with sync_redis_client(pipeline.settings.redis) as redis:
        wait_for(
            lambda: opened <= {m.decode() for m in redis.smembers("fallwatch:active-alerts")},
            "the active alerts rebuilt from fall-events",
        )
        for event in events:
            assert redis.get(f"fallwatch:open-alert:{event.camera_id}") == event.alert_id.encode()


def jpeg_of(width: int, height: int) -> bytes:
    return encode_jpeg(np.full((height, width, 3), 128, np.uint8))


def test_bad_records_are_dead_lettered_and_nothing_stops(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    frames = scenario_frames("bad")
    template = frames[0]
    future = datetime(2100, 1, 1, tzinfo=UTC)
    rng = np.random.default_rng(0)

    def frame_like(seq: int, **update: object) -> bytes:
        return encode(template.model_copy(update={"seq": seq, "frame_id": f"{template.frame_id}-bad{seq}", **update}))

    bad_frames = {
        "random bytes": rng.bytes(3000),
        "wrong schema": encode(  # a verdict where a frame belongs
            Verdict(
                frame_id="x",
                camera_id=template.camera_id,
                room="r",
                captured_at=template.captured_at,
                source="edge",
                final=True,
                fall_probability=0.5,
                decision=False,
                edge_model="m",
            )
        ),
        "NaN": frame_like(900).replace(b'"width":64', b'"width":NaN'),
        "1x1 JPEG": frame_like(901, jpeg=jpeg_of(1, 1), width=1, height=1),
        "8000x8000 JPEG": frame_like(902, jpeg=jpeg_of(8000, 8000), width=8000, height=8000),
        "frame record of 7.6 MB": frame_like(903, jpeg=rng.bytes(5_700_000)),
        "captured in 2100": frame_like(904, captured_at=future),
    }
    key = template.camera_id.encode()
    frame_offsets = asyncio.run(
        publish(settings, settings.kafka.topics.frames, [(key, v) for v in bad_frames.values()])
    )
    verdict = Verdict(
        frame_id=f"{template.frame_id}-v", camera_id=template.camera_id, room=template.room,
        captured_at=template.captured_at, source="edge", final=False, fall_probability=0.5, decision=True,
        edge_model="m",
    )  # fmt: skip
    bad_verdicts = {
        "verdict of 1.2 MB": encode(
            verdict.model_copy(update={"timings_ms": {f"stage-{i:06d}": float(i) for i in range(60_000)}})
        ),
        "P(fall) 1.0000001": encode(verdict).replace(b'"fall_probability":0.5', b'"fall_probability":1.0000001'),
        "verdict captured in 2100": encode(verdict.model_copy(update={"captured_at": future, "final": True})),
    }
    assert len(bad_verdicts["verdict of 1.2 MB"]) > 1_200_000
    verdict_offsets = asyncio.run(
        publish(settings, settings.kafka.topics.verdicts, [(key, v) for v in bad_verdicts.values()])
    )
    publish_frames(settings, frames)
    position = {name: (settings.kafka.topics.frames, o) for name, o in zip(bad_frames, frame_offsets, strict=True)}
    position |= {
        name: (settings.kafka.topics.verdicts, o) for name, o in zip(bad_verdicts, verdict_offsets, strict=True)
    }
    expected = set(position.values())

    def dead_letters() -> dict[tuple[str, int], DeadLetter]:
        letters = asyncio.run(read_topic(settings, settings.kafka.topics.dead_letters, DeadLetter))
        return {(d.source_topic, d.source_offset): d for d in letters if d.key == key and d.source_offset is not None}

    wait_for(lambda: expected <= set(dead_letters()), "a dead letter for every bad record", WAIT_S)
    letters = dead_letters()
    reasons = {name: letters[at].reason for name, at in position.items()}
    assert all(reason for reason in reasons.values()), reasons
    assert "in the future" in reasons["captured in 2100"] and "in the future" in reasons["verdict captured in 2100"]
    assert "pixels" in reasons["1x1 JPEG"] and "pixels" in reasons["8000x8000 JPEG"]
    assert "exceeds" in reasons["frame record of 7.6 MB"] and "exceeds" in reasons["verdict of 1.2 MB"]
    assert all(letters[k].size > 0 for k in expected), "dead letters by reference: the size, not the bytes"
    finish(pipeline, "bad records", frames, dead_letters=len(expected))
