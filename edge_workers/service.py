"""The edge worker: a consumer group on `frames` that answers most frames itself.

Per batch: decode the JPEGs, one batched edge-model forward (fall probability
and hidden vector together), the switcher on the whole batch, then route each
frame: a final edge verdict when the switcher predicts agreement with the
large model, else a provisional verdict plus a `cloud-requests` record whose
clip goes to Redis by claim check. Offsets are committed only after every
output of the batch is acked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from aiokafka import AIOKafkaProducer, ConsumerRecord
from redis.asyncio import Redis

from edge_workers.model import EdgeModel
from edge_workers.switcher import Switcher, SwitcherMetadata, check_compatible, latest_version, load_switcher
from fallwatch.images import decode_jpeg_rgb
from fallwatch.kafka_io import (
    commit_after,
    decode_batch,
    make_consumer,
    make_producer,
    send,
    send_dead_letter,
)
from fallwatch.models import load_edge_model
from fallwatch.settings import ConfigError, Settings
from schemas import CloudRequest, EdgeOutput, Frame, KafkaPosition, Verdict, utc_now

log = logging.getLogger(__name__)

SERVICE = "edge_workers"
FRAME_KEY_PREFIX = "fallwatch:frame:"


@dataclass(frozen=True)
class BufferedFrame:
    frame_id: str
    captured_at: datetime
    jpeg: bytes


@dataclass(frozen=True)
class DecodedFrame:
    record: ConsumerRecord
    frame: Frame
    image_rgb: np.ndarray


class ClipBuffers:
    """A ring buffer of each camera's recent frames, for the clip of an offloaded frame."""

    def __init__(self, clip_frames: int, clip_seconds: float) -> None:
        self.clip_frames = clip_frames
        self.clip_span = timedelta(seconds=clip_seconds)
        self.by_camera: dict[str, deque[BufferedFrame]] = {}

    def add(self, frame: Frame) -> None:
        buffer = self.by_camera.setdefault(frame.camera_id, deque(maxlen=self.clip_frames))
        buffer.append(BufferedFrame(frame.frame_id, frame.captured_at, frame.jpeg))

    def clip_ending_at(self, frame: Frame) -> list[BufferedFrame]:
        """The buffered frames of the camera up to and including `frame`, within the clip span."""
        clip: list[BufferedFrame] = []
        for buffered in self.by_camera.get(frame.camera_id, ()):
            if frame.captured_at - self.clip_span <= buffered.captured_at <= frame.captured_at:
                clip.append(buffered)
            if buffered.frame_id == frame.frame_id:
                break
        return clip


def load_newest_switcher(settings: Settings, model: EdgeModel) -> tuple[Switcher, SwitcherMetadata]:
    newest = latest_version(settings.edge.switcher_registry)
    if newest is None:
        raise ConfigError(
            f"no switcher in {settings.edge.switcher_registry}: train one (fallwatch dmd) "
            "or create an untrained one (fallwatch models tiny / fallwatch models init-switcher)"
        )
    switcher, metadata = load_switcher(newest)
    check_compatible(metadata, model.name, model.hidden_size)
    return switcher, metadata


class EdgeWorker:
    def __init__(self, settings: Settings, model: EdgeModel) -> None:
        self.settings = settings
        self.model = model
        self.switcher, self.switcher_metadata = load_newest_switcher(settings, model)
        self.clips = ClipBuffers(settings.edge.clip_frames, settings.edge.clip_seconds)
        self.topics = settings.kafka.topics
        log.info(
            "edge worker: model %s (hidden %d), switcher %s (threshold %.3f%s)",
            model.name, model.hidden_size, self.switcher_metadata.version, self.switcher_metadata.threshold,
            "" if self.switcher_metadata.trained else ", UNTRAINED",
        )

    async def run(self, stop: asyncio.Event) -> None:
        consumer = make_consumer(self.settings, self.topics.frames, group_id=self.settings.edge.group_id)
        producer = make_producer(self.settings)
        redis = Redis.from_url(self.settings.redis.url)
        await producer.start()
        await consumer.start()
        try:
            while not stop.is_set():
                batches = await consumer.getmany(
                    timeout_ms=self.settings.edge.batch_wait_ms, max_records=self.settings.edge.batch_size
                )
                records = [record for partition in batches.values() for record in partition]
                if records:
                    acks = await self.handle_batch(records, producer, redis)
                    await commit_after(consumer, acks)
        finally:
            await consumer.stop()
            await producer.stop()
            await redis.aclose()

    async def handle_batch(
        self, records: list[ConsumerRecord], producer: AIOKafkaProducer, redis: Redis
    ) -> list[asyncio.Future]:
        started = time.perf_counter()
        decoded, acks = await self.decode(records, producer)
        if not decoded:
            return acks
        decode_ms = (time.perf_counter() - started) * 1000 / len(records)

        started = time.perf_counter()
        output = await asyncio.to_thread(self.model.predict, [item.image_rgb for item in decoded])
        model_ms = (time.perf_counter() - started) * 1000 / len(decoded)

        started = time.perf_counter()
        scores = self.switcher.agreement_probability(output.hidden)
        switcher_ms = (time.perf_counter() - started) * 1000 / len(decoded)

        timings = {"decode": decode_ms, "edge_model": model_ms, "switcher": switcher_ms}
        for item, probability, score in zip(decoded, output.fall_probability, scores, strict=True):
            self.clips.add(item.frame)
            acks.extend(await self.route(item, float(probability), float(score), timings, producer, redis))
        return acks

    async def decode(
        self, records: list[ConsumerRecord], producer: AIOKafkaProducer
    ) -> tuple[list[DecodedFrame], list[asyncio.Future]]:
        good, acks = await decode_batch(producer, self.settings, SERVICE, Frame, records)
        decoded: list[DecodedFrame] = []
        for record, frame in good:
            if len(frame.jpeg) > self.settings.edge.max_frame_bytes:
                reason = f"frame of {len(frame.jpeg)} bytes exceeds {self.settings.edge.max_frame_bytes}"
            elif (image := decode_jpeg_rgb(frame.jpeg)) is None:
                reason = "JPEG could not be decoded"
            else:
                decoded.append(DecodedFrame(record, frame, image))
                continue
            acks.append(await send_dead_letter(producer, self.settings, SERVICE, record, reason))
        return decoded, acks

    async def route(
        self,
        item: DecodedFrame,
        probability: float,
        score: float,
        timings: dict[str, float],
        producer: AIOKafkaProducer,
        redis: Redis,
    ) -> list[asyncio.Future]:
        frame = item.frame
        decision = probability >= self.settings.edge.decision_threshold
        offload = score < self.switcher_metadata.threshold
        verdict = Verdict(
            frame_id=frame.frame_id,
            camera_id=frame.camera_id,
            room=frame.room,
            captured_at=frame.captured_at,
            source="edge",
            final=not offload,
            fall_probability=probability,
            decision=decision,
            switcher_score=score,
            offload_reason="switcher" if offload else None,
            edge_model=self.model.name,
            switcher_version=self.switcher_metadata.version,
            timings_ms=timings,
        )
        acks = [await send(producer, self.topics.verdicts, frame.camera_id, verdict)]
        if offload:
            request = await self.cloud_request(item, probability, decision, score, redis)
            acks.append(await send(producer, self.topics.cloud_requests, frame.camera_id, request))
        return acks

    async def cloud_request(
        self, item: DecodedFrame, probability: float, decision: bool, score: float, redis: Redis
    ) -> CloudRequest:
        frame = item.frame
        clip = self.clips.clip_ending_at(frame)
        ttl_s = self.settings.edge.clip_ttl_s
        async with redis.pipeline(transaction=False) as pipe:
            for buffered in clip:
                pipe.set(FRAME_KEY_PREFIX + buffered.frame_id, buffered.jpeg, ex=ttl_s)
            await pipe.execute()
        return CloudRequest(
            frame_id=frame.frame_id,
            camera_id=frame.camera_id,
            room=frame.room,
            captured_at=frame.captured_at,
            frame_position=KafkaPosition(
                topic=item.record.topic, partition=item.record.partition, offset=item.record.offset
            ),
            clip_keys=[FRAME_KEY_PREFIX + buffered.frame_id for buffered in clip],
            clip_frame_ids=[buffered.frame_id for buffered in clip],
            edge=EdgeOutput(fall_probability=probability, decision=decision, model=self.model.name),
            switcher_score=score,
            switcher_version=self.switcher_metadata.version,
            reason="switcher",
            deadline=utc_now() + timedelta(seconds=self.settings.edge.cloud_deadline_s),
        )


async def run_edge_worker(settings: Settings, stop: asyncio.Event, model: EdgeModel | None = None) -> None:
    await EdgeWorker(settings, model or load_edge_model(settings)).run(stop)
