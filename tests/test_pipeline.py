"""End to end on the real stack: producer → edge worker → cloud worker → verdicts, with counts.

The edge and cloud workers run as asyncio tasks in the test process (the model
loads once); Kafka and Redis are the real local servers.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaProducer
from redis import Redis

from cloud_workers.loading import load_cloud_model
from cloud_workers.service import CloudWorker
from core.images import decode_jpeg_rgb, encode_jpeg
from core.kafka_io import make_producer
from core.settings import CameraSettings, Settings
from edge_workers.model import load_edge_model
from edge_workers.service import EdgeWorker
from edge_workers.switcher import latest_version, load_switcher, save_switcher
from fallwatch.devkit.models import ModelPaths
from producers.service import run_producers
from schemas import CloudRequest, DeadLetter, FallEvent, Frame, Verdict, encode, utc_now
from tests.conftest import (
    consume_until,
    fall_saying_models,
    read_all,
    running,
    service_process,
    settings_for,
    until_caught_up,
)


def pipeline_settings(stack_state, tmp_path: Path, tiny: ModelPaths, clip: Path, registry: Path) -> Settings:
    sections = tiny.settings_sections()
    sections["edge"].update(switcher_registry=str(registry), batch_size=4)
    sections["cloud"].update(batch_size=4, num_frames=4)
    # every sampled frame, moving or not: these tests count frames through the pipeline, not motion gating
    camera = CameraSettings(id="cam-e2e", room="101", url=str(clip), fps=2.0, realtime=False, motion={"enabled": False})
    return settings_for(stack_state, tmp_path, producers={"cameras": [camera.model_dump()]}, **sections)


def switcher_with_median_threshold(settings: Settings, frames: list[Frame], source: Path) -> None:
    """Publish the untrained switcher of `source` with its threshold at the median score of these frames.

    Half the frames then go to the cloud and half stay at the edge, so both paths run.
    """
    newest = latest_version(source)
    assert newest is not None
    switcher, metadata = load_switcher(newest)
    model = load_edge_model(settings)
    hidden = model.predict([decode_jpeg_rgb(frame.jpeg) for frame in frames]).hidden
    scores = np.sort(switcher.agreement_probability(hidden))
    middle = len(scores) // 2
    threshold = float((scores[middle - 1] + scores[middle]) / 2)
    save_switcher(settings.edge.switcher_registry, switcher, metadata.model_copy(update={"threshold": threshold}))


def test_every_frame_gets_one_final_verdict(stack_state, tmp_path: Path, tiny_models, clip_path) -> None:
    registry = tmp_path / "switchers"
    settings = pipeline_settings(stack_state, tmp_path, tiny_models, clip_path, registry)

    async def scenario() -> tuple[list[Frame], list[Verdict], list[CloudRequest]]:
        published = await run_producers(settings, asyncio.Event())
        count = published["cam-e2e"]
        frames = await consume_until(settings, settings.kafka.topics.frames, Frame, lambda m: len(m) >= count)
        switcher_with_median_threshold(settings, frames, tiny_models.switcher_registry)
        async with (
            running(EdgeWorker(settings, load_edge_model(settings))),
            running(CloudWorker(settings, load_cloud_model(settings))),
        ):
            await consume_until(
                settings,
                settings.kafka.topics.verdicts,
                Verdict,
                lambda m: len({v.frame_id for v in m if v.final}) >= count,
            )
            # both groups committed everything, so no verdict is still to come: then read them all
            await until_caught_up(settings, settings.edge.group_id, settings.kafka.topics.frames)
            await until_caught_up(settings, settings.cloud.group_id, settings.kafka.topics.cloud_requests)
        verdicts = await read_all(settings, settings.kafka.topics.verdicts, Verdict)
        requests = await read_all(settings, settings.kafka.topics.cloud_requests, CloudRequest)
        return frames, verdicts, requests

    frames, verdicts, requests = asyncio.run(scenario())
    frame_ids = {frame.frame_id for frame in frames}
    assert len(frames) >= 8, "a 4 s clip at 2 fps gives at least 8 frames"
    assert [f.seq for f in frames] == list(range(len(frames))), "one camera's frames stay in order"

    finals = Counter(v.frame_id for v in verdicts if v.final)
    assert set(finals) == frame_ids and set(finals.values()) == {1}, "exactly one final verdict per frame"
    offloaded = {v.frame_id for v in verdicts if not v.final}
    assert 0 < len(offloaded) < len(frames), "the median threshold sends some frames to the cloud, not all"
    for verdict in verdicts:
        if verdict.final:
            assert verdict.source == ("cloud" if verdict.frame_id in offloaded else "edge")
    assert {r.frame_id for r in requests} == offloaded
    for request in requests:
        assert request.clip_keys and request.clip_frame_ids[-1] == request.frame_id
        assert request.switcher_score < load_switcher(latest_version(registry))[1].threshold


def test_malformed_frames_are_dead_lettered_and_the_worker_goes_on(
    stack_state, tmp_path: Path, tiny_models, clip_path
) -> None:
    settings = pipeline_settings(stack_state, tmp_path, tiny_models, clip_path, tiny_models.switcher_registry)
    topic = settings.kafka.topics.frames
    good = Frame(
        frame_id="cam-x-1-0",
        camera_id="cam-x",
        room="1",
        seq=0,
        captured_at=utc_now() - timedelta(hours=1),  # within the workers' capture-time bounds, whatever the date
        width=64,
        height=48,
        jpeg=_jpeg(),
    )
    corrupt = good.model_copy(update={"frame_id": "cam-x-2-1", "seq": 1, "jpeg": b"\xff\xd8 truncated"})
    oversized = good.model_copy(update={"frame_id": "cam-x-3-2", "seq": 2, "jpeg": b"\xff" * 5_000_000})
    after = good.model_copy(update={"frame_id": "cam-x-4-3", "seq": 3})

    async def scenario() -> tuple[list[DeadLetter], list[Verdict]]:
        producer: AIOKafkaProducer = make_producer(settings)
        await producer.start()
        for value in (b"not json at all", encode(corrupt), encode(oversized), encode(good)[:-9], encode(after)):
            await producer.send_and_wait(topic, key=b"cam-x", value=value)
        await producer.stop()
        async with (
            running(EdgeWorker(settings, load_edge_model(settings))),
            running(CloudWorker(settings, load_cloud_model(settings))),
        ):
            verdicts = await consume_until(
                settings, settings.kafka.topics.verdicts, Verdict, lambda m: any(v.final for v in m)
            )
            dead = await consume_until(settings, settings.kafka.topics.dead_letters, DeadLetter, lambda m: len(m) >= 4)
        return dead, verdicts

    dead, verdicts = asyncio.run(scenario())
    reasons = {d.source_offset: d.reason for d in dead}
    assert len(dead) == 4 and set(reasons) == {0, 1, 2, 3}, "one dead letter per bad record, by offset"
    assert "invalid Frame" in reasons[0] and "invalid Frame" in reasons[3]
    assert reasons[1] == "JPEG could not be decoded"
    assert "exceeds" in reasons[2]
    assert all(d.service == "edge_workers" and d.source_topic == topic for d in dead)
    assert next(d for d in dead if d.source_offset == 0).size == len(b"not json at all"), "by reference"
    assert {v.frame_id for v in verdicts if v.final} == {"cam-x-4-3"}


def _jpeg() -> bytes:
    image = np.zeros((48, 64, 3), np.uint8)
    image[10:30, 20:40] = (90, 160, 220)
    return encode_jpeg(image)


def test_falls_in_the_verdicts_raise_one_alert(stack_state, tmp_path: Path, tiny_models, clip_path) -> None:
    fall = fall_saying_models(tiny_models, tmp_path / "fall-models")
    settings = pipeline_settings(stack_state, tmp_path, fall, clip_path, fall.switcher_registry)

    async def scenario() -> tuple[int, list[Verdict], list[FallEvent]]:
        published = (await run_producers(settings, asyncio.Event()))["cam-e2e"]
        async with (
            running(EdgeWorker(settings, load_edge_model(settings))),
            running(CloudWorker(settings, load_cloud_model(settings))),
        ):
            verdicts = await consume_until(
                settings,
                settings.kafka.topics.verdicts,
                Verdict,
                lambda m: len({v.frame_id for v in m if v.final}) >= published,
            )
        events = await consume_until(settings, settings.kafka.topics.fall_events, FallEvent, lambda m: len(m) >= 1)
        return published, verdicts, events

    with service_process("alerting", settings, tmp_path):
        published, verdicts, events = asyncio.run(scenario())
        redis = Redis.from_url(settings.redis.url)
        stored = redis.get(f"fallwatch:alert:{events[0].alert_id}")
        redis.close()

    finals = [v for v in verdicts if v.final]
    assert len({v.frame_id for v in finals}) == published and all(v.decision for v in finals)
    assert len(events) == 1, "one open alert per camera however many fall frames follow"
    event = events[0]
    assert (event.camera_id, event.room, event.state) == ("cam-e2e", "101", "open")
    # k of n falls confirm, or two falls with a sure cloud verdict (the fall-saying cloud model here is sure)
    assert len(event.evidence_frame_ids) >= (2 if event.rule.startswith("cloud") else settings.alerting.k)
    assert set(event.evidence_frame_ids) <= {v.frame_id for v in finals}
    assert stored is not None and FallEvent.model_validate_json(stored).alert_id == event.alert_id
