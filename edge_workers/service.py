"""The edge worker: a consumer group on `frames` that answers most frames itself.

Per batch (`getmany`, up to `edge.batch_size` records or `edge.batch_wait_ms`): decode
the JPEGs once, one batched edge-model forward (fall probability and hidden vector
together), the switcher on the whole batch, then the routing policy (threshold,
offload budget, exploration; `edge_workers.routing`) decides each frame: a final edge
verdict, or a provisional verdict plus a `cloud-requests` record whose clip goes to
Redis by claim check. Batches, commits (only after every output of the batch is acked)
and rebalances are `core.consumer`'s. A newly published switcher is swapped in between
batches (`between_batches`, `edge_workers.registry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import simplejpeg
import torch
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from redis.asyncio import Redis

from core.clips import ClipBuffers
from core.consumer import Batch, BatchConsumer
from core.images import decode_jpeg_rgb, keep_freed_image_memory
from core.kafka_io import decode_batch, make_producer, send, send_dead_letter, start_clients
from core.operator_events import send_operator_event
from core.pose import Pose, PoseEstimator, inside_any, person_location
from core.redis_io import RedisOutage, redis_client
from core.settings import ConfigError, Settings
from edge_workers.drift import DriftGuard
from edge_workers.metrics import EdgeMetrics
from edge_workers.model import CpuOptionCheck, EdgeBatch, EdgeModel, load_edge_model, torch_threads
from edge_workers.registry import ActiveSwitcher, LoadedPair, PairRegistry, SwitcherRegistry
from edge_workers.requests import Offload, cloud_request, store_clip
from edge_workers.routing import RouteDecision, Router, RoutingPolicy
from edge_workers.shared_budget import SharedOffloadBudget
from edge_workers.switcher import CameraHistory
from schemas import CloudRequest, EdgeOutput, Frame, KafkaPosition, OffloadReason, Verdict, utc_now

log = logging.getLogger(__name__)

SERVICE = "edge_workers"
# Batches answered while earlier ones wait for their acks; beyond this the worker waits (backpressure).
MAX_BATCHES_IN_FLIGHT = 4
# Per-partition fetch size of the `frames` consumer (the client's default). aiokafka asks a broker for more
# only once every partition it buffers from that broker is drained (or 100 ms old), so huge fetches make the
# worker idle while one refills; with ~50 kB frames, 1 MB fetches keep records flowing (plumbing bench:
# ~1,850 against ~1,300 frames/s with 10 MB; 2 and 4 MB are no better). A larger frame still arrives: the
# broker returns an oversized record whole when its partition comes first in a fetch, and an empty answer
# (never a truncated one) otherwise.
FRAMES_FETCH_BYTES = 1024 * 1024
# A frame refused by the model is dead-lettered only while the model still answers a plain frame this size.
PLAIN_FRAME_SIDE = 384


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
    """A batch as fetched: its frames (decoding, then decoded), the acks of its dead letters."""

    batch: Batch | None = None  # None: nothing came within `edge.batch_wait_ms`
    decoding: list[DecodingShare] = field(default_factory=list)  # handed to the decode threads
    decoded: list[DecodedFrame] = field(default_factory=list)  # once `EdgeWorker.decoded` has run
    acks: list[asyncio.Future] = field(default_factory=list)
    decode_s: float = 0.0  # seconds the decode threads spent on it, summed over threads

    @property
    def count(self) -> int:
        """Records fetched, dead letters included."""
        return 0 if self.batch is None else len(self.batch.arrivals)


@dataclass(frozen=True)
class EdgeAnswer:
    """What the edge concluded about one frame, before it is written anywhere."""

    item: DecodedFrame
    probability: float
    decision: bool
    score: float
    route: RouteDecision
    person_at: tuple[float, float] | None = None  # located on a zoned camera's frames that may be falls


class EdgeWorker:
    def __init__(self, settings: Settings, model: EdgeModel | None, cpu_options: Sequence[CpuOptionCheck] = ()) -> None:
        """`model` is None when the edge model comes from `edge.model_registry` with its switcher."""
        edge = settings.edge
        self.settings = settings
        self.registry: SwitcherRegistry | PairRegistry
        self.active: ActiveSwitcher
        self.drift = DriftGuard(edge.drift, None)
        self.history = CameraHistory()  # the cameras' last edge probabilities, for a history switcher
        # each camera's `frames` partition, and the partitions this worker holds (None: all, before a rebalance)
        self.camera_partitions: dict[str, int] = {}
        self.held_partitions: set[int] | None = None
        if model is None:
            self.registry = pair_registry(settings)
            pair = self.registry.load_active()
            self.model, self.active = pair.model, pair.switcher
            self.drift.use_calibration(pair.version.calibration, pair.version.version)
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
        self.shared_budget: SharedOffloadBudget | None = None  # with `edge.offload_budget_key`, once Redis is made
        self.clips = ClipBuffers(edge.clip_frames, edge.clip_seconds)
        self.pose: Callable[[np.ndarray], Pose | None] | None = None  # see `estimator`
        self.topics = settings.kafka.topics
        self.known_cameras = frozenset(edge.known_cameras)
        self.metrics = EdgeMetrics()
        self.redis_outage = RedisOutage(SERVICE, self.metrics.redis_failures.inc)
        self.decode_pool = ThreadPoolExecutor(edge.decode_threads, thread_name_prefix="edge-decode")
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
        batches = BatchConsumer(
            self.settings, self.topics.frames, self.settings.edge.group_id, max_partition_fetch_bytes=FRAMES_FETCH_BYTES
        )
        batches.on_assigned = self.keep_cameras_of
        producer = make_producer(self.settings)
        redis = redis_client(self.settings.redis)
        if self.settings.edge.offload_budget_key is not None:
            self.shared_budget = SharedOffloadBudget(redis, self.settings.edge.offload_budget_key)
        fetching: asyncio.Task[FetchedBatch] | None = None
        try:
            # first: a port in use is one line naming the setting, and the clients below are closed
            self.metrics.serve(self.settings.edge.metrics_port, "edge.metrics_port")
            await start_clients(self.settings, producer)  # retried while Kafka is unreachable
            await batches.start()
            fetching = asyncio.create_task(self.fetch_batch(batches, producer))
            while fetching is not None:
                fetched = await fetching
                # The next batch is fetched while this one is decoded and answered, and its frames queue up
                # behind this one's on the decode threads: neither the broker's round trip nor the decode
                # threads wait for the model and the produce.
                fetching = None if stop.is_set() else asyncio.create_task(self.fetch_batch(batches, producer))
                await self.decoded(fetched, producer)
                await self.between_batches(redis)
                if fetched.batch is not None:
                    acks = await self.handle_batch(fetched, producer, redis)
                    batches.answered(fetched.batch, acks + await self.operator_events(producer))
                else:  # idle: a refused version is still told at once
                    await asyncio.gather(*await self.operator_events(producer))
                await batches.commit_acked(wait=batches.in_flight() > MAX_BATCHES_IN_FLIGHT)
                self.metrics.consumer_lag.set(await batches.lag())
            await batches.drain()
        finally:
            if fetching is not None:  # an error answering a batch: the next one is not answered either
                fetching.cancel()
            await self.registry.stop()
            await batches.stop()
            await producer.stop()
            await redis.aclose()
            self.metrics.close()
            self.decode_pool.shutdown()
            if isinstance(self.pose, PoseEstimator):  # MediaPipe's graph holds its threads and memory
                self.pose.close()
            self.pose = None

    async def fetch_batch(self, batches: BatchConsumer, producer: AIOKafkaProducer) -> FetchedBatch:
        """Up to `batch_size` records, waiting at most `batch_wait_ms` after the first one for the batch to fill.

        `getmany` returns as soon as anything is there; a model forward costs less per frame in a full
        batch, so a short wait for more records pays for itself. What has arrived is validated and handed
        to the decode threads at once, so decoding overlaps the wait (and the broker's next fetch) instead
        of following it; `decoded` collects the images.
        """
        edge = self.settings.edge
        fetched = FetchedBatch()

        async def start_decoding(records: list[ConsumerRecord]) -> None:
            good, dead_letter_acks = await decode_batch(producer, self.settings, SERVICE, Frame, records)
            fetched.acks.extend(dead_letter_acks)
            fetched.decoding.extend(self.start_decoding(good))

        wait_s = edge.batch_wait_ms / 1000
        fetched.batch = await batches.collect(edge.batch_size, wait_s, wait_s, on_records=start_decoding)
        return fetched

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

    async def operator_events(self, producer: AIOKafkaProducer) -> list[asyncio.Future]:
        """The drift guard's and the registry's events since the last call, sent to `operator-events`."""
        events = [*self.drift.events, *self.registry.events]
        self.drift.events.clear()
        self.registry.events.clear()
        return [await send_operator_event(producer, self.settings, event) for event in events]

    async def between_batches(self, redis: Redis) -> None:
        """What changes the worker does between two batches, so each frame is answered by one model state."""
        await self.reload_switcher(redis)

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
            self.drift.use_calibration(loaded.version.calibration, loaded.version.version)
            self.metrics.camera_drift.clear()  # every camera is judged afresh against the new calibration
            loaded = loaded.switcher
        self.active = loaded
        self.history.clear()
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
        try:
            output = await asyncio.to_thread(self.model.predict, [item.image_rgb for item in decoded])
        except (ValueError, RuntimeError):
            answered = await self.without_unanswerable(batch, producer)
            if answered is None:
                return acks
            decoded, output = batch.decoded, answered
        model_s = (time.perf_counter() - started) / len(decoded)

        started = time.perf_counter()
        # One batch is too small to share across threads: on a busy 2-core machine the switcher took
        # 24 ms per 64 frames with torch's 2 threads against 1.8 ms with one.
        switcher = self.active.switcher
        cameras = [item.frame.camera_id for item in decoded]
        history = self.history.rows(cameras, output.fall_probability, switcher.history)
        with torch_threads(1):
            scores = switcher.agreement_probability(output.hidden, output.fall_probability, history)
        switcher_s = (time.perf_counter() - started) / len(decoded)

        routes = await self.route(decoded, scores.tolist())
        self.watch_drift(decoded, output.fall_probability, scores)
        self.observe(decode_s, model_s, switcher_s, scores, routes)
        timings_ms = {"decode": decode_s * 1000, "edge_model": model_s * 1000, "switcher": switcher_s * 1000}
        threshold = self.settings.edge.decision_threshold
        answers = [
            EdgeAnswer(item, float(probability), float(probability) >= threshold, float(score), route)
            for item, probability, score, route in zip(decoded, output.fall_probability, scores, routes, strict=True)
        ]
        if any(answer.item.frame.no_alert_zones for answer in answers):
            answers = await asyncio.to_thread(self.locate_people, answers)
        started = time.perf_counter()
        for answer in answers:
            if self.answers(answer.item):
                self.clips.add(answer.item.frame)
            acks.extend(await self.publish(answer, timings_ms, producer, redis))
        # the worker's own cost of producing (encoding, queueing, clips to Redis); acks are awaited later
        self.metrics.stage_seconds.labels("produce").observe((time.perf_counter() - started) / len(decoded))
        return acks

    async def route(self, decoded: Sequence[DecodedFrame], scores: list[float]) -> list[RouteDecision]:
        """The batch's routes: learning mode's exploration, within this worker's budget and the shared one."""
        base_rate = self.router.policy.exploration_rate
        rates = [
            self.drift.exploration_rate(item.frame.camera_id, base_rate) if self.answers(item) else base_rate
            for item in decoded
        ]
        policy, shared = self.router.policy, self.shared_budget
        if shared is None or (policy.max_offload_ratio is None and policy.max_offload_fps is None):
            return self.router.route(scores, rates)
        reservation = await self.redis_outage.call(
            "each worker keeps its own offload budget until it is back",
            lambda: shared.reserve(policy, len(scores)),
            None,
        )
        routes = self.router.route(scores, rates, None if reservation is None else reservation.slots)
        if reservation is not None:
            used = sum(route.offload is not None for route in routes)
            await self.redis_outage.call(
                "slots not handed back expire with the window", lambda: shared.release(reservation, used), None
            )
        return routes

    async def without_unanswerable(self, batch: FetchedBatch, producer: AIOKafkaProducer) -> EdgeBatch | None:
        """After the model refused the batch: each frame is tried alone, one it refuses (a shape its
        pre-processing cannot take) goes to `dead-letters` with the reason, and the others are answered
        (None: none left). Otherwise that frame would fail its batch again on every restart. A model that
        refuses a plain frame too is broken (weights, memory, the machine): that error is raised."""
        answerable = []
        model_works: bool | None = None
        for item in batch.decoded:
            try:
                await asyncio.to_thread(self.model.predict, [item.image_rgb])
            except (ValueError, RuntimeError) as exc:
                if model_works is None:
                    model_works = await self.answers_a_plain_frame()
                if not model_works:
                    # the model or the machine, not this frame: nothing is dead-lettered, nothing committed,
                    # and the batch is answered again after the restart
                    raise
                height, width = item.image_rgb.shape[:2]
                reason = f"the edge model cannot answer a frame of {width}×{height} pixels ({exc})"
                log.warning("camera %s: %s", item.frame.camera_id, reason)
                batch.acks.append(await send_dead_letter(producer, self.settings, SERVICE, item.record, reason))
                self.metrics.dead_letters.inc()
            else:
                answerable.append(item)
        batch.decoded = answerable
        if not answerable:
            return None
        return await asyncio.to_thread(self.model.predict, [item.image_rgb for item in answerable])

    async def answers_a_plain_frame(self) -> bool:
        """Whether the model still answers a frame any camera could send (a grey one of PLAIN_FRAME_SIDE)."""
        plain = np.full((PLAIN_FRAME_SIDE, PLAIN_FRAME_SIDE, 3), 128, np.uint8)
        try:
            await asyncio.to_thread(self.model.predict, [plain])
        except (ValueError, RuntimeError) as exc:
            log.error("the edge model cannot answer a plain %d-pixel frame either: %s", PLAIN_FRAME_SIDE, exc)
            return False
        return True

    def locate_people(self, answers: list[EdgeAnswer]) -> list[EdgeAnswer]:
        """The person's place on the frames of cameras with no-alert zones that may open an alert: the
        falls, and the offloaded frames (the cloud may call them falls). Other frames cost nothing."""
        located = []
        for answer in answers:
            if answer.item.frame.no_alert_zones and (answer.decision or answer.route.offload is not None):
                started = time.perf_counter()
                pose = self.estimator()(answer.item.image_rgb)
                answer = replace(answer, person_at=None if pose is None else person_location(pose))
                self.metrics.stage_seconds.labels("locate").observe(time.perf_counter() - started)
                self.metrics.people_located.labels("found" if pose is not None else "not_found").inc()
            located.append(answer)
        return located

    def estimator(self) -> Callable[[np.ndarray], Pose | None]:
        """BlazePose, loaded at the first zoned frame; without MediaPipe nobody is located (so alerts open)."""
        if self.pose is None:
            try:
                self.pose = PoseEstimator()
            except ConfigError as exc:
                log.error("no-alert zones are ignored: %s", exc)
                self.pose = lambda _image: None
        return self.pose

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

    def answers(self, item: DecodedFrame) -> bool:
        """Whether this worker still holds the frame's partition (one fetched before a rebalance may be answered
        after it): the camera's state belongs to the worker that answers it now."""
        return self.held_partitions is None or item.record.partition in self.held_partitions

    def keep_cameras_of(self, assigned: set[TopicPartition]) -> None:
        """After a rebalance: the cameras of partitions gone to another worker leave this one's drift
        guard, gauge, history and clip buffers, or the gauge would keep a stale flag beside the new owner's,
        and every camera ever answered would keep its frames here."""
        self.held_partitions = {tp.partition for tp in assigned if tp.topic == self.topics.frames}
        gone = [camera for camera, partition in self.camera_partitions.items() if partition not in self.held_partitions]
        self.drift.forget(gone)
        for camera in gone:
            del self.camera_partitions[camera]
            self.history.forget(camera)
            self.clips.forget(camera)
            with contextlib.suppress(KeyError):  # never flagged or cleared here: no gauge
                self.metrics.camera_drift.remove(camera)

    def watch_drift(self, decoded: list[DecodedFrame], probabilities: np.ndarray, scores: np.ndarray) -> None:
        fall_threshold, switcher_threshold = self.settings.edge.decision_threshold, self.router.policy.threshold
        for item, probability, score in zip(decoded, probabilities, scores, strict=True):
            if not self.answers(item):
                continue  # answered while its partition went: the new owner watches the camera
            camera = item.frame.camera_id
            self.camera_partitions[camera] = item.record.partition
            check = self.drift.observe(camera, bool(probability >= fall_threshold), float(score), switcher_threshold)
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
        header_problem = jpeg_size_problem(frame.jpeg, edge.min_frame_side, edge.max_frame_pixels)
        if header_problem is not None:
            return header_problem
        image = decode_jpeg_rgb(frame.jpeg)
        if image is None:
            return "JPEG could not be decoded"
        # what the header check could not read (another image format) is judged by what was decoded
        height, width = image.shape[:2]
        return size_problem(width, height, edge.min_frame_side, edge.max_frame_pixels) or image

    async def publish(
        self, answer: EdgeAnswer, timings_ms: dict[str, float], producer: AIOKafkaProducer, redis: Redis
    ) -> list[asyncio.Future]:
        frame = answer.item.frame
        offload = answer.route.offload
        verdict = Verdict.for_frame(
            frame,
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
            person_at=answer.person_at,
            in_no_alert_zone=answer.person_at is not None and inside_any(answer.person_at, frame.no_alert_zones),
        )
        acks = [await send(producer, self.topics.verdicts, frame.camera_id, verdict)]
        if offload is not None:
            request = await self.cloud_request(answer, offload, redis)
            acks.append(await send(producer, self.topics.cloud_requests, frame.camera_id, request))
        return acks

    async def cloud_request(self, answer: EdgeAnswer, reason: OffloadReason, redis: Redis) -> CloudRequest:
        record, frame = answer.item.record, answer.item.frame
        clip = self.clips.clip_ending_at(frame)
        ttl_s = self.settings.edge.clip_ttl_s
        # Without Redis the request goes without its clip: the cloud worker reads the frame itself from
        # `frames` (its position is in the request), so the frame is still answered.
        if not await self.redis_outage.call(
            "offloaded frames go without their clip", lambda: store_clip(redis, clip, ttl_s), False
        ):
            clip = []
        offload = Offload(
            edge=EdgeOutput(fall_probability=answer.probability, decision=answer.decision, model=self.model.name),
            switcher_score=answer.score,
            switcher_version=self.active.metadata.version,
            reason=reason,
            deadline_s=self.settings.edge.cloud_deadline_s,
        )
        position = KafkaPosition(topic=record.topic, partition=record.partition, offset=record.offset)
        return cloud_request(frame, position, clip, offload)


def jpeg_size_problem(jpeg: bytes, min_side: int, max_pixels: int) -> str | None:
    """Why a JPEG's dimensions (read from its header, before decoding) are unusable, or None.

    Not a JPEG, or one whose header simplejpeg cannot read, is left to the decoder to judge.
    """
    try:
        height, width, _colorspace, _subsampling = simplejpeg.decode_jpeg_header(jpeg)
    except ValueError:
        return None
    return size_problem(width, height, min_side, max_pixels)


def size_problem(width: int, height: int, min_side: int, max_pixels: int) -> str | None:
    if min(width, height) < min_side:
        return f"frame of {width}×{height} pixels is smaller than {min_side} pixels a side"
    if width * height > max_pixels:
        return f"frame of {width}×{height} pixels exceeds {max_pixels} pixels"
    return None


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
