"""The cloud worker: a consumer group on `cloud-requests` running the large video model.

Requests are batched (up to `batch_size` or `batch_wait_ms`), their clips fetched
from Redis (claim check), answered with one forward pass per batch, and each
answer published as the frame's final verdict. A request past its deadline is
not sent to the model: its edge answer becomes the final verdict
(`edge-fallback`), so every frame still gets exactly one final answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from redis.asyncio import Redis

from cloud_workers.model import CloudModel
from fallwatch.images import decode_jpeg_rgb
from fallwatch.kafka_io import (
    commit_after,
    decode_batch,
    make_consumer,
    make_producer,
    send,
    send_dead_letter,
)
from fallwatch.models import load_cloud_model
from fallwatch.settings import Settings
from schemas import CloudRequest, Frame, KafkaPosition, Verdict, decode, utc_now

log = logging.getLogger(__name__)

SERVICE = "cloud_workers"


@dataclass(frozen=True)
class ClipJob:
    record: ConsumerRecord
    request: CloudRequest
    frames_rgb: list[np.ndarray]


class FrameFetcher:
    """Reads a frame back from the `frames` topic by position: the fallback when its clip expired."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = make_consumer(settings, group_id=None)

    async def start(self) -> None:
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()

    async def fetch(self, position: KafkaPosition) -> Frame:
        partition = TopicPartition(position.topic, position.partition)
        self.consumer.assign([partition])
        self.consumer.seek(partition, position.offset)
        record = await asyncio.wait_for(self.consumer.getone(partition), timeout=10.0)
        return decode(Frame, record.value)


class CloudWorker:
    def __init__(self, settings: Settings, model: CloudModel) -> None:
        self.settings = settings
        self.model = model
        self.topics = settings.kafka.topics

    async def run(self, stop: asyncio.Event) -> None:
        consumer = make_consumer(
            self.settings, self.topics.cloud_requests, group_id=self.settings.cloud.group_id
        )
        producer = make_producer(self.settings)
        fetcher = FrameFetcher(self.settings)
        redis = Redis.from_url(self.settings.redis.url)
        await producer.start()
        await fetcher.start()
        await consumer.start()
        try:
            while not stop.is_set():
                await self.poll_once(consumer, producer, fetcher, redis)
        finally:
            await consumer.stop()
            await fetcher.stop()
            await producer.stop()
            await redis.aclose()

    async def poll_once(
        self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, fetcher: FrameFetcher, redis: Redis
    ) -> None:
        batches = await consumer.getmany(
            timeout_ms=self.settings.cloud.batch_wait_ms, max_records=self.settings.cloud.batch_size
        )
        records = [record for partition in batches.values() for record in partition]
        if not records:
            return
        good, acks = await decode_batch(producer, self.settings, SERVICE, CloudRequest, records)
        jobs: list[ClipJob] = []
        now = utc_now()
        for record, request in good:
            if request.deadline <= now:
                log.info("request for %s missed its deadline; the edge answer is final", request.frame_id)
                acks.append(await send(producer, self.topics.verdicts, request.camera_id, fallback(request)))
                continue
            frames = await self.fetch_clip(request, fetcher, redis)
            if frames is None:
                acks.append(await send_dead_letter(producer, self.settings, SERVICE, record, "clip undecodable"))
                continue
            jobs.append(ClipJob(record, request, frames))
        if jobs:
            acks.extend(await self.answer(jobs, producer))
        await commit_after(consumer, acks)

    async def fetch_clip(
        self, request: CloudRequest, fetcher: FrameFetcher, redis: Redis
    ) -> list[np.ndarray] | None:
        jpegs = [jpeg for jpeg in await redis.mget(request.clip_keys) if jpeg is not None]
        if not jpegs:
            log.info("clip of %s expired from Redis; using the frame itself from Kafka", request.frame_id)
            jpegs = [(await fetcher.fetch(request.frame_position)).jpeg]
        frames = [decode_jpeg_rgb(jpeg) for jpeg in jpegs]
        if any(frame is None for frame in frames):
            return None
        return [frame for frame in frames if frame is not None]

    async def answer(self, jobs: list[ClipJob], producer: AIOKafkaProducer) -> list[asyncio.Future]:
        started = time.perf_counter()
        probabilities = await asyncio.to_thread(self.model.predict, [job.frames_rgb for job in jobs])
        model_ms = (time.perf_counter() - started) * 1000 / len(jobs)
        acks = []
        for job, probability in zip(jobs, probabilities, strict=True):
            request = job.request
            verdict = Verdict(
                frame_id=request.frame_id,
                camera_id=request.camera_id,
                room=request.room,
                captured_at=request.captured_at,
                source="cloud",
                final=True,
                fall_probability=float(probability),
                decision=bool(probability >= self.settings.cloud.decision_threshold),
                switcher_score=request.switcher_score,
                offload_reason=request.reason,
                edge_model=request.edge.model,
                cloud_model=self.model.name,
                switcher_version=request.switcher_version,
                timings_ms={"cloud_model": model_ms, "batch_size": float(len(jobs))},
            )
            acks.append(await send(producer, self.topics.verdicts, request.camera_id, verdict))
        return acks


def fallback(request: CloudRequest) -> Verdict:
    """The edge's answer as the final verdict of a request the cloud can no longer answer in time."""
    return Verdict(
        frame_id=request.frame_id,
        camera_id=request.camera_id,
        room=request.room,
        captured_at=request.captured_at,
        source="edge-fallback",
        final=True,
        fall_probability=request.edge.fall_probability,
        decision=request.edge.decision,
        switcher_score=request.switcher_score,
        offload_reason=request.reason,
        edge_model=request.edge.model,
        switcher_version=request.switcher_version,
    )


async def run_cloud_worker(settings: Settings, stop: asyncio.Event, model: CloudModel | None = None) -> None:
    await CloudWorker(settings, model or load_cloud_model(settings)).run(stop)
