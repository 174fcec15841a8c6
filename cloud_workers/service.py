"""The cloud worker: a consumer group on `cloud-requests` running the large video model.

Per batch (up to `cloud.batch_size` requests, or `cloud.batch_wait_ms` after the first
arrived; see `core.consumer`): requests past their deadline (when read, when their turn in
the model comes, when answered) get the edge's answer as the final verdict (`edge-fallback`:
the alerting service has used it already, and the log still holds one final verdict per
frame); the others' clips are fetched from Redis
(claim check) — a clip that expired falls back to the frame itself, read back from
`frames` — and answered by one model forward for the whole batch. Each verdict carries
the batch size, the wall times of the batch's stages and of the request, its share of
the batch's energy and the batch's peak GPU memory.

While one batch is in the model the next is collected, its clips fetched (one MGET),
decoded (on a thread per core) and pre-processed (`CloudModel.prepare`); then the partitions
stay paused (polled, so the group keeps this worker) until the model is free, or until
`cloud.stuck_batch_s` after the batch went in: then the polls stop, and the group gives the
partitions of a worker with a hung GPU to another. Batches, commits (only after every output
of the batch is acked) and rebalances are `core.consumer`'s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from redis.asyncio import Redis

from cloud_workers.energy import BatchCost, CostMeter, open_energy_meter
from cloud_workers.loading import load_cloud_model
from cloud_workers.metrics import CloudMetrics
from cloud_workers.model import Clip, CloudModel
from core.consumer import Arrival, Batch, BatchConsumer
from core.images import decode_jpeg_rgb
from core.kafka_io import decode_batch, make_consumer, make_producer, send, start_clients
from core.redis_io import RedisOutage, redis_client
from core.settings import Settings
from schemas import CloudRequest, Frame, Verdict, decode, utc_now

log = logging.getLogger(__name__)

SERVICE = "cloud_workers"
# OpenCV releases the GIL while it decodes a JPEG: a batch's clip frames (64 at batch 8) decode on
# every core at once, while the model answers the batch before.
DECODE_THREADS = os.cpu_count() or 1


@dataclass(frozen=True)
class ClipJob:
    arrival: Arrival
    request: CloudRequest
    clip: Clip


@dataclass(frozen=True)
class PreparedBatch:
    batch: Batch
    jobs: list[ClipJob]  # the requests for the model
    inputs: object  # the jobs' clips through `CloudModel.prepare` (None without jobs)
    fetch_s: float
    preprocess_s: float
    acks: list[asyncio.Future]  # outputs already sent: dead letters, edge fallbacks


class FrameFetcher:
    """Reads a frame back from the `frames` topic by position: the fallback when its clip expired."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = make_consumer(settings, group_id=None)
        self.timeout_s = settings.cloud.frame_fetch_timeout_s

    async def stop(self) -> None:
        await self.consumer.stop()

    async def fetch(self, request: CloudRequest) -> Frame | None:
        """The request's own frame, or None when `frames` no longer holds it (retention) or it is unreadable."""
        position = request.frame_position
        partition = TopicPartition(position.topic, position.partition)
        try:
            self.consumer.assign([partition])
            self.consumer.seek(partition, position.offset)
            record = await asyncio.wait_for(self.consumer.getone(partition), timeout=self.timeout_s)
            frame = decode(Frame, record.value)
        except (TimeoutError, ValueError, KafkaError) as exc:  # SchemaError is a ValueError
            log.warning("frame of %s unreadable at %s: %s", request.frame_id, position, exc)
            return None
        # An offset already deleted by retention silently resets to the earliest record.
        if record.offset != position.offset or frame.frame_id != request.frame_id:
            log.warning("frame of %s is gone from %s", request.frame_id, position)
            return None
        return frame


class CloudWorker:
    def __init__(self, settings: Settings, model: CloudModel) -> None:
        self.settings = settings
        self.cloud = settings.cloud
        self.model = model
        self.topics = settings.kafka.topics
        self.metrics = CloudMetrics()
        self.costs = CostMeter(model.device, open_energy_meter(model.device, model.gpu_indices))
        self.decode_pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="cloud-decode")
        self.redis_outage = RedisOutage(SERVICE, self.metrics.redis_failures.inc)

    async def run(self, stop: asyncio.Event) -> None:
        batches = BatchConsumer(
            self.settings,
            self.topics.cloud_requests,
            self.cloud.group_id,
            max_poll_interval_ms=self.cloud.max_poll_interval_ms,
        )
        producer = make_producer(self.settings)
        fetcher = FrameFetcher(self.settings)
        redis = redis_client(self.settings.redis)
        # The batch in the model. The next one is collected and its clips fetched and decoded
        # meanwhile, so the model never waits for Kafka, Redis or JPEG decoding; at most these
        # two batches are in flight.
        answering: asyncio.Task[None] | None = None
        stuck_at = 0.0  # time.monotonic() from which the batch in the model counts as stuck
        try:
            # first: a port in use is one line naming the setting, and the clients below are closed
            self.metrics.serve(self.cloud.metrics_port, "cloud.metrics_port")
            await start_clients(self.settings, producer, fetcher.consumer)  # retried while Kafka is down
            await batches.start()
            while not stop.is_set():
                if answering is not None:
                    if answering.done():
                        answering.result()  # raises what went wrong in it
                        answering = None
                    elif time.monotonic() >= stuck_at:
                        # Stuck: no more polls, not even for the next batch, so the group can
                        # hand the partitions to another worker (see BatchConsumer.while_paused).
                        await batches.while_paused(answering, self.cloud.keepalive_s, stuck_at)
                        continue
                batch = await batches.collect(
                    max_records=self.cloud.batch_size,
                    max_wait_s=self.cloud.batch_wait_ms / 1000,
                    idle_wait_s=self.cloud.poll_idle_ms / 1000,
                )
                # what GPU capacity is decided on: requests waiting behind this worker's position
                self.metrics.consumer_lag.set(await batches.lag())
                if batch is None:
                    continue
                # reading clips back from `frames` can take a while (frame_fetch_timeout_s each): polled
                # meanwhile, partitions paused, or the group would take them away mid-prepare
                preparing = asyncio.create_task(self.prepare(batch, producer, fetcher, redis))
                prepared = await batches.while_paused(
                    preparing, self.cloud.keepalive_s, time.monotonic() + self.cloud.stuck_batch_s
                )
                if answering is not None:
                    await batches.while_paused(answering, self.cloud.keepalive_s, stuck_at)
                answering = asyncio.create_task(self.answer_and_commit(prepared, batches, producer))
                stuck_at = time.monotonic() + self.cloud.stuck_batch_s
            if answering is not None:
                await batches.while_paused(answering, self.cloud.keepalive_s, stuck_at)
        finally:
            if answering is not None and not answering.done():
                await asyncio.wait({answering})  # it uses the clients stopped below
            self.metrics.close()
            await batches.stop()
            await fetcher.stop()
            await producer.stop()
            await redis.aclose()
            self.decode_pool.shutdown()

    async def prepare(
        self, batch: Batch, producer: AIOKafkaProducer, fetcher: FrameFetcher, redis: Redis
    ) -> PreparedBatch:
        """Decode the requests and fetch their clips; answer at once those the model cannot help."""
        self.metrics.batch_seconds.labels(stage="collect").observe(batch.open_s)
        arrival_of = {(a.record.partition, a.record.offset): a for a in batch.arrivals}
        good, acks = await decode_batch(
            producer, self.settings, SERVICE, CloudRequest, [a.record for a in batch.arrivals]
        )
        self.metrics.count("dead_letter", len(acks))
        now = utc_now()
        live: list[tuple[Arrival, CloudRequest]] = []
        for record, request in good:
            if request.deadline <= now:
                acks.append(await self.past_deadline(request, producer))
            else:
                live.append((arrival_of[(record.partition, record.offset)], request))
        fetch_started = time.monotonic()
        clips = await self.fetch_clips([request for _, request in live], fetcher, redis)
        jobs: list[ClipJob] = []
        for (arrival, request), clip in zip(live, clips, strict=True):
            if clip is None:
                self.metrics.count("no_clip")
                acks.append(await send(producer, self.topics.verdicts, request.camera_id, fallback(request)))
            else:
                jobs.append(ClipJob(arrival, request, clip))
        fetch_s = time.monotonic() - fetch_started
        self.metrics.batch_seconds.labels(stage="fetch").observe(fetch_s)
        inputs: object = None
        preprocess_s = 0.0
        if jobs:
            # The model's CPU work on the clips (sampling, resizing, tokenizing), done here while the
            # previous batch is in the model: on a GPU machine it would otherwise leave the GPU idle.
            preprocess_started = time.monotonic()
            inputs = await asyncio.to_thread(self.model.prepare, [job.clip for job in jobs])
            preprocess_s = time.monotonic() - preprocess_started
            self.metrics.batch_seconds.labels(stage="preprocess").observe(preprocess_s)
        return PreparedBatch(batch, jobs, inputs, fetch_s, preprocess_s, acks)

    async def answer_and_commit(
        self, prepared: PreparedBatch, batches: BatchConsumer, producer: AIOKafkaProducer
    ) -> None:
        """One forward for the batch, its verdicts, then its offsets once every output is acked."""
        acks = prepared.acks
        if prepared.jobs:
            acks += await self.answer(prepared, producer)
        # This batch's offsets only: the next batch is already consumed but not answered yet.
        batches.answered(prepared.batch, acks)
        await batches.drain()

    async def fetch_clips(self, requests: list[CloudRequest], fetcher: FrameFetcher, redis: Redis) -> list[Clip | None]:
        """Each request's clip as RGB frames (oldest first); None where neither clip nor frame can be read."""
        keys = [key for request in requests for key in request.clip_keys]
        missing: list[bytes | None] = [None] * len(keys)
        values = (
            await self.redis_outage.call(
                "clips are read as single frames from Kafka", lambda: redis.mget(keys), missing
            )
            if keys
            else []
        )
        clips_jpegs: list[list[bytes]] = []
        start = 0
        for request in requests:
            end = start + len(request.clip_keys)
            clips_jpegs.append([jpeg for jpeg in values[start:end] if jpeg is not None])
            start = end
        for request, jpegs in zip(requests, clips_jpegs, strict=True):
            if not jpegs:
                log.info("clip of %s not in Redis; using the frame itself from Kafka", request.frame_id)
                self.metrics.clip_fallbacks.inc()
                frame = await fetcher.fetch(request)
                if frame is not None:
                    jpegs.append(frame.jpeg)
        return await asyncio.to_thread(decode_clips, clips_jpegs, self.decode_pool)

    async def past_deadline(self, request: CloudRequest, producer: AIOKafkaProducer) -> asyncio.Future:
        """Send the edge's answer as final: alerting has used it already, and a cloud verdict now would be
        a second final verdict of the frame."""
        log.info("request for %s missed its deadline; the edge answer is final", request.frame_id)
        self.metrics.count("deadline")
        return await send(producer, self.topics.verdicts, request.camera_id, fallback(request))

    async def answer(self, prepared: PreparedBatch, producer: AIOKafkaProducer) -> list[asyncio.Future]:
        jobs, batch = prepared.jobs, prepared.batch
        # The batch waited for the one before it in the model: its requests may have expired meanwhile.
        if all(job.request.deadline <= utc_now() for job in jobs):
            return [await self.past_deadline(job.request, producer) for job in jobs]
        model_started = time.monotonic()
        probabilities, cost = await asyncio.to_thread(self.predict_measured, prepared.inputs)
        model_s = time.monotonic() - model_started
        self.record_batch(len(jobs), model_s, cost)
        acks = []
        for job, probability in zip(jobs, probabilities, strict=True):
            request = job.request
            worker_s = time.monotonic() - job.arrival.at
            self.metrics.request_seconds.observe(worker_s)
            if not np.isfinite(probability):  # an overflow in the model: no answer, not a crash on every restart
                log.error(
                    "the cloud model gave P(fall) = %s for %s; the edge answer is final", probability, request.frame_id
                )
                self.metrics.count("no_answer")
                acks.append(await send(producer, self.topics.verdicts, request.camera_id, fallback(request)))
                continue
            if request.deadline <= utc_now():  # expired in the model
                acks.append(await self.past_deadline(request, producer))
                continue
            self.metrics.count("cloud")
            verdict = Verdict.for_request(
                request,
                "cloud",
                float(probability),
                bool(probability >= self.cloud.decision_threshold),
                cloud_model=self.model.name,
                timings_ms={
                    "queue": (batch.closed_at - job.arrival.at) * 1000,  # waiting for the batch to close
                    "collect": batch.open_s * 1000,
                    "fetch": prepared.fetch_s * 1000,
                    "preprocess": prepared.preprocess_s * 1000,
                    "model": model_s * 1000,
                    # the large model's cost per request, as the offline evaluation counts it
                    "model_per_request": (prepared.preprocess_s + model_s) * 1000 / len(jobs),
                    "worker": worker_s * 1000,  # arrival in the worker → verdict sent
                    "since_request": (utc_now() - request.requested_at) / timedelta(milliseconds=1),
                },
                energy_j=cost.energy_j / len(jobs) if cost.energy_j is not None else None,
                batch_size=len(jobs),
                gpu_memory_mb=cost.gpu_memory_mb,
            )
            acks.append(await send(producer, self.topics.verdicts, request.camera_id, verdict))
        return acks

    def predict_measured(self, inputs: object) -> tuple[np.ndarray, BatchCost]:
        self.costs.start()
        probabilities = self.model.predict_prepared(inputs)
        return probabilities, self.costs.stop()

    def record_batch(self, size: int, model_s: float, cost: BatchCost) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.labels(stage="model").observe(model_s)
        if cost.energy_j is not None:
            self.metrics.energy_joules.inc(cost.energy_j)
        if cost.gpu_memory_mb is not None:
            self.metrics.gpu_memory_bytes.set(cost.gpu_memory_mb * 2**20)


def decode_clips(clips_jpegs: list[list[bytes]], pool: Executor) -> list[Clip | None]:
    """Decode each clip's JPEGs on `pool`, dropping undecodable ones; None for a clip left with no frame."""
    # The whole batch's frames in one map, so every thread of the pool has work until the end.
    images = list(pool.map(decode_jpeg_rgb, [jpeg for jpegs in clips_jpegs for jpeg in jpegs]))
    clips: list[Clip | None] = []
    start = 0
    for jpegs in clips_jpegs:
        frames = [image for image in images[start : start + len(jpegs)] if image is not None]
        start += len(jpegs)
        if len(frames) < len(jpegs):
            log.warning("%d of %d clip frames undecodable", len(jpegs) - len(frames), len(jpegs))
        clips.append(frames or None)
    return clips


def fallback(request: CloudRequest) -> Verdict:
    """The edge's answer as the final verdict of a request the cloud can no longer answer in time."""
    return Verdict.for_request(request, "edge-fallback", request.edge.fall_probability, request.edge.decision)


async def run_cloud_worker(settings: Settings, stop: asyncio.Event, model: CloudModel | None = None) -> None:
    if settings.cloud.torch_threads is not None:
        # on a CPU shared with other work, torch's thread team waits on itself: a batch of 8 tiny clips
        # took 160–1,700 ms with 2 threads on 2 busy cores instead of ~40 ms with one
        torch.set_num_threads(settings.cloud.torch_threads)
    await CloudWorker(settings, model or load_cloud_model(settings)).run(stop)
