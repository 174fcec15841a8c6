"""The edge worker: a consumer group on `frames` that answers most frames itself.

Per batch (`getmany`, up to `edge.batch_size` records or `edge.batch_wait_ms`): decode
the JPEGs once, one batched edge-model forward (fall probability and hidden vector
together), the switcher on the whole batch, then the routing policy (threshold,
offload budget, exploration; `edge_workers.routing`) decides each frame: a final edge
verdict, or a provisional verdict plus a `cloud-requests` record whose clip goes to
Redis by claim check. Offsets are committed only after every output of the batch is
acked. A newly published switcher is swapped in between batches (`edge_workers.registry`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import simplejpeg
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from redis.asyncio import Redis

from core.clips import ClipBuffers
from core.images import decode_jpeg_rgb, keep_freed_image_memory
from core.kafka_io import (
    assigned_lag,
    commit_held_offsets,
    decode_batch,
    make_consumer,
    make_producer,
    send,
    send_dead_letter,
    start_clients,
)
from core.redis_io import RedisOutage, redis_client
from core.settings import Settings
from edge_workers.drift import DriftGuard
from edge_workers.metrics import EdgeMetrics
from edge_workers.model import CpuOptionCheck, EdgeModel, load_edge_model, torch_threads
from edge_workers.registry import ActiveSwitcher, LoadedPair, PairRegistry, SwitcherRegistry
from edge_workers.routing import RouteDecision, Router, RoutingPolicy
from schemas import CloudRequest, EdgeOutput, Frame, KafkaPosition, OffloadReason, Verdict, utc_now

log = logging.getLogger(__name__)

SERVICE = "edge_workers"
FRAME_KEY_PREFIX = "fallwatch:frame:"
# Batches answered while earlier ones wait for their acks; beyond this the worker waits (backpressure).
MAX_BATCHES_IN_FLIGHT = 4
# Per-partition fetch size of the `frames` consumer (the client's default). aiokafka asks a broker for more
# only once every partition it buffers from that broker is drained (or 100 ms old), so huge fetches make the
# worker idle while one refills; with ~50 kB frames, 1 MB fetches keep records flowing (plumbing bench:
# ~1,850 against ~1,300 frames/s with 10 MB; 2 and 4 MB are no better). A larger frame still arrives: the
# broker returns an oversized record whole when its partition comes first in a fetch, and an empty answer
# (never a truncated one) otherwise.
FRAMES_FETCH_BYTES = 1024 * 1024


@dataclass(frozen=True)
class DecodedFrame:
    record: ConsumerRecord
    frame: Frame
    image_rgb: np.ndarray


@dataclass(frozen=True)
class DecodingShare:
    """Frames handed to one decode thread, and the future of their images (or reasons) and decode seconds."""

    frames: list[tuple[ConsumerRecord, Frame]]
    images: asyncio.Future[tuple[list[np.ndarray | str], float]]


@dataclass
class FetchedBatch:
    """A batch as fetched: its frames (decoding, then decoded), the acks of its dead letters, where it ends."""

    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # the next offset of each partition
    count: int = 0  # records fetched, dead letters included
    decoding: list[DecodingShare] = field(default_factory=list)  # handed to the decode threads
    decoded: list[DecodedFrame] = field(default_factory=list)  # once `EdgeWorker.decoded` has run
    acks: list[asyncio.Future] = field(default_factory=list)
    decode_s: float = 0.0  # seconds the decode threads spent on it, summed over threads


@dataclass(frozen=True)
class EdgeAnswer:
    """What the edge concluded about one frame, before it is written anywhere."""

    item: DecodedFrame
    probability: float
    decision: bool
    score: float
    route: RouteDecision


class EdgeWorker:
    def __init__(self, settings: Settings, model: EdgeModel | None, cpu_options: Sequence[CpuOptionCheck] = ()) -> None:
        """`model` is None when the edge model comes from `edge.model_registry` with its switcher."""
        edge = settings.edge
        self.settings = settings
        self.registry: SwitcherRegistry | PairRegistry
        self.active: ActiveSwitcher
        self.drift = DriftGuard(edge.drift, None)
        if model is None:
            self.registry = pair_registry(settings)
            pair = self.registry.load_active()
            self.model, self.active = pair.model, pair.switcher
            self.drift.use_calibration(pair.version.calibration)
        else:
            self.model = model
            self.registry = SwitcherRegistry(
                edge.switcher_registry, model.name, model.hidden_size, edge.registry_poll_s, edge.registry_announce_key
            )
            self.active = self.registry.load_newest()
        self.router = Router(
            RoutingPolicy.from_settings(edge, self.active.metadata.threshold),
            rng=random.Random(edge.exploration_seed),
        )
        self.clips = ClipBuffers(edge.clip_frames, edge.clip_seconds)
        self.topics = settings.kafka.topics
        self.known_cameras = frozenset(edge.known_cameras)
        self.metrics = EdgeMetrics()
        self.redis_outage = RedisOutage(SERVICE, self.metrics.redis_failures.inc)
        self.decode_pool = ThreadPoolExecutor(edge.decode_threads, thread_name_prefix="edge-decode")
        # Records taken from the consumer, not yet in a batch (see `next_records`); dropped on a rebalance.
        self.taken: deque[ConsumerRecord] = deque()
        self.metrics.use_switcher(self.active.metadata.version)
        self.metrics.use_cpu_options(cpu_options)
        if edge.max_offload_ratio is not None:
            self.metrics.use_budget(edge.max_offload_ratio)
        metadata = self.active.metadata
        log.info(
            "edge worker: model %s (hidden %d), switcher %s (threshold %.3f%s)",
            self.model.name,
            self.model.hidden_size,
            metadata.version,
            self.router.policy.threshold,
            "" if metadata.trained else ", UNTRAINED",
        )

    async def run(self, stop: asyncio.Event) -> None:
        keep_freed_image_memory()
        consumer = make_consumer(
            self.settings, group_id=self.settings.edge.group_id, max_partition_fetch_bytes=FRAMES_FETCH_BYTES
        )
        producer = make_producer(self.settings)
        redis = redis_client(self.settings.redis)
        commits = CommitQueue(consumer)
        # Before a rebalance takes partitions away, commit what was answered on them.
        consumer.subscribe([self.topics.frames], listener=DrainOnRevoke(commits, self.taken))
        fetching: asyncio.Task[FetchedBatch] | None = None
        try:
            # first: a port in use is one line naming the setting, and the clients below are closed
            self.metrics.serve(self.settings.edge.metrics_port, "edge.metrics_port")
            await start_clients(self.settings, producer, consumer)  # retried while Kafka is unreachable
            fetching = asyncio.create_task(self.fetch_batch(consumer, producer))
            while fetching is not None:
                batch = await fetching
                # The next batch is fetched while this one is decoded and answered, and its frames queue up
                # behind this one's on the decode threads: neither the broker's round trip nor the decode
                # threads wait for the model and the produce.
                fetching = None if stop.is_set() else asyncio.create_task(self.fetch_batch(consumer, producer))
                await self.decoded(batch, producer)
                # Between batches, so each frame is answered by exactly one switcher.
                await self.reload_switcher(redis)
                if batch.offsets:
                    acks = await self.handle_batch(batch, producer, redis)
                    commits.add(AnsweredBatch(acks, batch.offsets))
                await commits.commit_acked(wait=commits.in_flight() > MAX_BATCHES_IN_FLIGHT)
                # records taken from the consumer but not yet in a batch are still waiting too
                self.metrics.consumer_lag.set(await assigned_lag(consumer) + len(self.taken))
            await commits.drain()
        finally:
            if fetching is not None:  # an error answering a batch: the next one is not answered either
                fetching.cancel()
            await consumer.stop()
            await producer.stop()
            await redis.aclose()
            self.metrics.close()
            self.decode_pool.shutdown()

    async def fetch_batch(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> FetchedBatch:
        """Up to `batch_size` records, waiting at most `batch_wait_ms` after the first one for the batch to fill.

        `getmany` returns as soon as anything is there; a model forward costs less per frame in a full
        batch, so a short wait for more records pays for itself. What has arrived is validated and handed
        to the decode threads at once, so decoding overlaps the wait (and the broker's next fetch) instead
        of following it; `decoded` collects the images.
        """
        edge = self.settings.edge
        batch = FetchedBatch()
        wait_ms = edge.batch_wait_ms
        deadline: float | None = None
        while batch.count < edge.batch_size and wait_ms > 0:
            records = await self.next_records(consumer, edge.batch_size - batch.count, wait_ms)
            if deadline is None:
                if not records:
                    break
                deadline = time.monotonic() + edge.batch_wait_ms / 1000
            batch.offsets.update(next_offsets(records))
            batch.count += len(records)
            good, dead_letter_acks = await decode_batch(producer, self.settings, SERVICE, Frame, records)
            batch.acks.extend(dead_letter_acks)
            batch.decoding.extend(self.start_decoding(good))
            wait_ms = int((deadline - time.monotonic()) * 1000)
        return batch

    async def decoded(self, batch: FetchedBatch, producer: AIOKafkaProducer) -> None:
        """Wait for the batch's images; a frame that could not be decoded goes to `dead-letters` with the reason."""
        for share in batch.decoding:
            images, seconds = await share.images
            batch.decode_s += seconds
            for (record, frame), image in zip(share.frames, images, strict=True):
                if isinstance(image, np.ndarray):
                    batch.decoded.append(DecodedFrame(record, frame, image))
                else:
                    batch.acks.append(await send_dead_letter(producer, self.settings, SERVICE, record, image))
        self.metrics.dead_letters.inc(batch.count - len(batch.decoded))

    async def next_records(self, consumer: AIOKafkaConsumer, limit: int, wait_ms: int) -> list[ConsumerRecord]:
        """Up to `limit` records, oldest first: those already taken from the consumer, else a new fetch's worth.

        `getmany` is asked for everything the consumer has buffered, not just `limit`: aiokafka sends its
        next fetch to a broker only once every partition it buffers from that broker is drained, so taking
        it all at once keeps that fetch in flight while this batch is decoded and answered (plumbing bench,
        when this was added: ~1,750 → ~1,850 frames/s).
        """
        if not self.taken:
            fetched = await consumer.getmany(timeout_ms=wait_ms)
            self.taken.extend(record for partition in fetched.values() for record in partition)
        return [self.taken.popleft() for _ in range(min(limit, len(self.taken)))]

    def start_decoding(self, good: list[tuple[ConsumerRecord, Frame]]) -> list[DecodingShare]:
        """Hand the frames to the decode threads (JPEG decoding releases the GIL), one contiguous share
        each, so the hand-off to a thread is paid once per share rather than once per frame."""
        loop = asyncio.get_running_loop()
        share = max(1, math.ceil(len(good) / self.settings.edge.decode_threads))
        return [
            DecodingShare(good[start : start + share], loop.run_in_executor(
                self.decode_pool, self.images_or_reasons, [frame for _record, frame in good[start : start + share]]
            ))
            for start in range(0, len(good), share)
        ]  # fmt: skip

    async def reload_switcher(self, redis: Redis) -> None:
        announced = self.registry.last_announced
        key = self.registry.announce_key
        if key is not None:
            announced = await self.redis_outage.call(
                "new switchers are found by the registry poll until it is back", lambda: redis.get(key), announced
            )
        loaded = await self.registry.refresh(self.active, announced)
        if loaded is None:
            return
        if isinstance(loaded, LoadedPair):  # edge model and switcher together, between batches
            self.model = loaded.model
            self.drift.use_calibration(loaded.version.calibration)
            self.metrics.camera_drift.clear()  # every camera is judged afresh against the new calibration
            loaded = loaded.switcher
        self.active = loaded
        if self.settings.edge.switcher_threshold is None:
            self.router.set_threshold(loaded.metadata.threshold)
        self.metrics.use_switcher(loaded.metadata.version)

    async def handle_batch(self, batch: FetchedBatch, producer: AIOKafkaProducer, redis: Redis) -> list[asyncio.Future]:
        """Answer a fetched batch; returns the ack futures of every output (dead letters included)."""
        self.metrics.batch_size.observe(batch.count)
        acks = batch.acks
        decoded = batch.decoded
        if not decoded:
            return acks
        decode_s = batch.decode_s / len(decoded)

        started = time.perf_counter()
        output = await asyncio.to_thread(self.model.predict, [item.image_rgb for item in decoded])
        model_s = (time.perf_counter() - started) / len(decoded)

        started = time.perf_counter()
        # One batch is too small to share across threads: on a busy 2-core machine the switcher took
        # 24 ms per 64 frames with torch's 2 threads against 1.8 ms with one.
        with torch_threads(1):
            scores = self.active.switcher.agreement_probability(output.hidden, output.fall_probability)
        switcher_s = (time.perf_counter() - started) / len(decoded)

        base_rate = self.router.policy.exploration_rate
        rates = [self.drift.exploration_rate(item.frame.camera_id, base_rate) for item in decoded]
        routes = self.router.route(scores.tolist(), rates)
        self.observe(decode_s, model_s, switcher_s, scores, routes)
        self.watch_drift(decoded, output.fall_probability, scores, routes)
        timings_ms = {"decode": decode_s * 1000, "edge_model": model_s * 1000, "switcher": switcher_s * 1000}
        started = time.perf_counter()
        for item, probability, score, route in zip(decoded, output.fall_probability, scores, routes, strict=True):
            self.clips.add(item.frame)
            probability = float(probability)
            answer = EdgeAnswer(
                item, probability, probability >= self.settings.edge.decision_threshold, float(score), route
            )
            acks.extend(await self.publish(answer, timings_ms, producer, redis))
        # the worker's own cost of producing (encoding, queueing, clips to Redis); acks are awaited later
        self.metrics.stage_seconds.labels("produce").observe((time.perf_counter() - started) / len(decoded))
        return acks

    def observe(
        self, decode_s: float, model_s: float, switcher_s: float, scores: np.ndarray, routes: list[RouteDecision]
    ) -> None:
        metrics = self.metrics
        metrics.frames.inc(len(routes))
        for stage, seconds in (("decode", decode_s), ("model", model_s), ("switcher", switcher_s)):
            metrics.stage_seconds.labels(stage).observe(seconds)
        for score in scores.tolist():
            metrics.switcher_score.observe(score)
        for route in routes:
            if route.offload is not None:
                metrics.offloads.labels(route.offload).inc()
            if route.over_budget:
                metrics.over_budget.inc()
        metrics.offload_ratio.set(self.router.budget.offload_ratio())

    def watch_drift(
        self, decoded: list[DecodedFrame], probabilities: np.ndarray, scores: np.ndarray, routes: list[RouteDecision]
    ) -> None:
        threshold = self.settings.edge.decision_threshold
        for item, probability, score, route in zip(decoded, probabilities, scores, routes, strict=True):
            camera = item.frame.camera_id
            check = self.drift.observe(camera, bool(probability >= threshold), float(score), route.offload is not None)
            if check is not None:
                self.metrics.camera_drift.labels(camera).set(1 if check.drifted else 0)

    def images_or_reasons(self, frames: list[Frame]) -> tuple[list[np.ndarray | str], float]:
        """Each frame's image or the reason it cannot be answered, and the seconds the share took."""
        started = time.perf_counter()
        return [self.image_or_reason(frame) for frame in frames], time.perf_counter() - started

    def image_or_reason(self, frame: Frame) -> np.ndarray | str:
        """The frame's RGB image, or the reason it cannot be answered."""
        edge = self.settings.edge
        if self.known_cameras and frame.camera_id not in self.known_cameras:
            return f"unknown camera {frame.camera_id!r}"
        # one frame from a clock gone wrong would move its camera's alert window past every real frame
        skew = self.settings.capture_time.problem(frame.captured_at, utc_now())
        if skew is not None:
            return skew
        if not frame.jpeg:
            return "empty JPEG"
        if len(frame.jpeg) > edge.max_frame_bytes:
            return f"frame of {len(frame.jpeg)} bytes exceeds {edge.max_frame_bytes}"
        size_problem = jpeg_size_problem(frame.jpeg, edge.min_frame_side, edge.max_frame_pixels)
        if size_problem is not None:
            return size_problem
        image = decode_jpeg_rgb(frame.jpeg)
        return "JPEG could not be decoded" if image is None else image

    async def publish(
        self, answer: EdgeAnswer, timings_ms: dict[str, float], producer: AIOKafkaProducer, redis: Redis
    ) -> list[asyncio.Future]:
        frame = answer.item.frame
        offload = answer.route.offload
        verdict = Verdict(
            frame_id=frame.frame_id,
            camera_id=frame.camera_id,
            room=frame.room,
            captured_at=frame.captured_at,
            source="edge",
            final=offload is None,
            fall_probability=answer.probability,
            decision=answer.decision,
            switcher_score=answer.score,
            offload_reason=offload,
            edge_model=self.model.name,
            switcher_version=self.active.metadata.version,
            timings_ms=timings_ms,
            routing=self.router.policy.record(answer.route.over_budget),
        )
        acks = [await send(producer, self.topics.verdicts, frame.camera_id, verdict)]
        if offload is not None:
            request = await self.cloud_request(answer, offload, redis)
            acks.append(await send(producer, self.topics.cloud_requests, frame.camera_id, request))
        return acks

    async def cloud_request(self, answer: EdgeAnswer, reason: OffloadReason, redis: Redis) -> CloudRequest:
        item = answer.item
        frame = item.frame
        clip = self.clips.clip_ending_at(frame)
        ttl_s = self.settings.edge.clip_ttl_s

        async def store_clip() -> bool:
            async with redis.pipeline(transaction=False) as pipe:
                for buffered in clip:
                    pipe.set(FRAME_KEY_PREFIX + buffered.frame_id, buffered.jpeg, ex=ttl_s)
                await pipe.execute()
            return True

        # Without Redis the request goes without its clip: the cloud worker reads the frame itself from
        # `frames` (its position is in the request), so the frame is still answered.
        if not await self.redis_outage.call("offloaded frames go without their clip", store_clip, False):
            clip = []
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
            edge=EdgeOutput(fall_probability=answer.probability, decision=answer.decision, model=self.model.name),
            switcher_score=answer.score,
            switcher_version=self.active.metadata.version,
            reason=reason,
            deadline=utc_now() + timedelta(seconds=self.settings.edge.cloud_deadline_s),
        )


def jpeg_size_problem(jpeg: bytes, min_side: int, max_pixels: int) -> str | None:
    """Why a JPEG's dimensions (read from its header, before decoding) are unusable, or None.

    Not a JPEG, or one whose header simplejpeg cannot read, is left to the decoder to judge.
    """
    try:
        height, width, _colorspace, _subsampling = simplejpeg.decode_jpeg_header(jpeg)
    except ValueError:
        return None
    if min(width, height) < min_side:
        return f"frame of {width}×{height} pixels is smaller than {min_side} pixels a side"
    if width * height > max_pixels:
        return f"frame of {width}×{height} pixels exceeds {max_pixels} pixels"
    return None


@dataclass(frozen=True)
class AnsweredBatch:
    acks: list[asyncio.Future]
    offsets: dict[TopicPartition, int]  # the next offset of each partition once the batch is committed


def next_offsets(records: list[ConsumerRecord]) -> dict[TopicPartition, int]:
    """The offset after the last of `records` in each of their partitions (records of a partition come in order)."""
    return {TopicPartition(record.topic, record.partition): record.offset + 1 for record in records}


class CommitQueue:
    """Answered batches, oldest first; each one's offsets are committed once it and all before it are acked.

    The next batch is fetched and answered while the broker acks the previous one's outputs, and while
    it stores their offsets (one commit in flight at a time, like the Java client's `commitAsync`), so
    the worker does not idle for a round trip per batch. At-least-once holds because a batch's offsets
    are committed only after its outputs, and those of every batch before it, are acked.
    """

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self.batches: deque[AnsweredBatch] = deque()
        self.acked_offsets: dict[TopicPartition, int] = {}  # acked, not yet sent in a commit
        self.committing: asyncio.Task[None] | None = None

    def add(self, batch: AnsweredBatch) -> None:
        self.batches.append(batch)

    def in_flight(self) -> int:
        return len(self.batches)

    async def commit_acked(self, wait: bool = False) -> None:
        """Start committing the acked batches at the head of the queue (waiting for the oldest one's acks
        when `wait`); if the previous commit is still in flight, they go with the next one."""
        if wait and self.batches:
            await asyncio.gather(*self.batches[0].acks)
        while self.batches and all(ack.done() for ack in self.batches[0].acks):
            batch = self.batches.popleft()
            for ack in batch.acks:
                ack.result()  # a failed send raises here, before anything is committed past it
            self.acked_offsets.update(batch.offsets)
        if self.committing is not None:
            if not self.committing.done():
                return
            self.committing.result()
        if self.acked_offsets:
            self.committing = asyncio.create_task(commit_held_offsets(self.consumer, self.acked_offsets))
            self.acked_offsets = {}

    async def drain(self) -> None:
        """Wait until every answered batch is acked and its offsets are committed."""
        while self.batches or self.acked_offsets or (self.committing is not None and not self.committing.done()):
            if self.committing is not None:
                await asyncio.wait([self.committing])
            await self.commit_acked(wait=True)
        if self.committing is not None:
            self.committing.result()


class DrainOnRevoke(ConsumerRebalanceListener):
    def __init__(self, commits: CommitQueue, taken: deque[ConsumerRecord]) -> None:
        self.commits = commits
        self.taken = taken

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.commits.drain()
        # Whoever gets these partitions next (this worker too) fetches them again from the committed offsets.
        self.taken.clear()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        """Nothing to do: the group's committed offsets say where to start."""


def pair_registry(settings: Settings) -> PairRegistry:
    edge = settings.edge
    if edge.model_registry is None:
        raise ValueError("edge.model_registry is not set")
    return PairRegistry(
        edge.model_registry,
        lambda directory: load_edge_model(settings, directory),
        edge.registry_poll_s,
        edge.registry_announce_key,
    )


async def run_edge_worker(settings: Settings, stop: asyncio.Event, model: EdgeModel | None = None) -> None:
    if settings.edge.torch_threads is not None:
        torch.set_num_threads(settings.edge.torch_threads)
    if model is None and settings.edge.model_registry is not None:
        await EdgeWorker(settings, None).run(stop)
    elif model is None:
        loaded = load_edge_model(settings)
        await EdgeWorker(settings, loaded, loaded.cpu_options).run(stop)
    else:
        await EdgeWorker(settings, model).run(stop)
