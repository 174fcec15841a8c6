"""The camera producer: one process, many cameras, frames to the `frames` topic.

Per camera: a capture thread (producers.camera) → a bounded queue → a publisher task that sends
to Kafka (`acks=all`, idempotent, key = camera id, so one camera's frames stay in order). When
Kafka is slower than a live camera the queue drops its oldest frame (the newest matters) and
counts it; a video file played faster than real time waits instead, so it loses nothing.
A camera that fails never stops the others: its capture thread reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, OutOfOrderSequenceNumber, ProducerFenced

from core.kafka_io import make_producer, read_topic_partitions, send, start_clients
from core.retry import DependencyUnavailable
from core.settings import CameraSettings, ConfigError, ProducerSettings, Settings
from core.urls import redact, source_kind
from producers.camera import CameraCapture, CameraStats, CapturedFrame
from producers.metrics import serve_metrics
from producers.status import run_status_writer
from schemas import Frame

log = logging.getLogger(__name__)

ACK_WINDOW = 32  # frames in flight per camera before waiting for the broker's acks
SLOT_POLL_S = 0.5  # how often a capture thread waiting for queue room checks for shutdown
JOIN_MARGIN_S = 5.0  # beyond a capture's own timeouts, for its last frame and closing the source


# errors after which aiokafka's producer fails every later send too (its sender task has ended)
FATAL_PRODUCER_ERRORS = (OutOfOrderSequenceNumber, ProducerFenced)


class KafkaOutput:
    """The process's one Kafka producer, made anew when it broke for good: aiokafka's idempotent producer
    ends its sender on an OutOfOrderSequenceNumber (a batch of a partition without a leader expired), and
    then fails every send of every camera."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = make_producer(settings)
        self.renewing: asyncio.Task[None] | None = None
        self.renewals = 0

    async def start(self) -> None:
        """Start the first producer (retried while the brokers are unreachable) on a topic that exists; a
        refusal is one ConfigError, with the producer stopped."""
        settings = self.settings
        try:
            await start_clients(settings, self.producer)
            if not await read_topic_partitions(settings, settings.kafka.topics.frames):
                # every frame would fail, one by one, while the producer looks healthy
                raise ConfigError(
                    f"the topic {settings.kafka.topics.frames!r} does not exist on Kafka at "
                    f"{settings.kafka.bootstrap_servers} (create it: fallwatch topics create)"
                )
        except KafkaError as exc:  # a broker too old, say
            await self.producer.stop()
            raise ConfigError(f"cannot use Kafka at {settings.kafka.bootstrap_servers}: {exc}") from None
        except (DependencyUnavailable, ConfigError):
            await self.producer.stop()
            raise

    def renew(self, cause: BaseException) -> None:
        """Replace the producer in the background (once, however many cameras saw it fail)."""
        if self.renewing is not None and not self.renewing.done():
            return
        log.error("the Kafka producer broke for good (%s: %s): starting a new one", type(cause).__name__, cause)
        self.renewing = asyncio.get_running_loop().create_task(self._renew(self.producer))

    async def _renew(self, broken: AIOKafkaProducer) -> None:
        fresh = make_producer(self.settings)
        try:
            await start_clients(self.settings, fresh)
        except (KafkaError, DependencyUnavailable, asyncio.CancelledError) as exc:
            with contextlib.suppress(Exception):
                await fresh.stop()
            if isinstance(exc, asyncio.CancelledError):
                raise  # the service stops
            log.error("a new Kafka producer could not start (%s); tried again at the next failure", exc)
            return
        self.producer = fresh
        self.renewals += 1
        with contextlib.suppress(Exception):  # it has nothing left to send (TimeoutError included)
            await asyncio.wait_for(broken.stop(), self.settings.producers.drain_timeout_s)

    async def stop(self) -> None:
        if self.renewing is not None:  # a renewal may be retrying a broker that is down
            self.renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.renewing
        # a broker that is down would hold the stop as long as it stays down
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.producer.stop(), self.settings.producers.drain_timeout_s)


class CameraPublisher:
    """The queue between one camera's capture thread and Kafka, and the task that drains it."""

    def __init__(
        self,
        camera: CameraSettings,
        settings: Settings,
        output: KafkaOutput,
        loop: asyncio.AbstractEventLoop,
        thread_stop: threading.Event,
    ) -> None:
        self.camera = camera
        self.settings = settings
        self.output = output
        self.loop = loop
        self.thread_stop = thread_stop
        self.stats = CameraStats()
        self.queue: asyncio.Queue[tuple[int, CapturedFrame] | None] = asyncio.Queue()
        self.capacity = settings.producers.queue_size
        live = source_kind(camera.sampled_url) != "file" or camera.realtime
        # a file read faster than real time waits for room instead of dropping (nothing is lost)
        self.slots = None if live else threading.Semaphore(self.capacity)
        self.next_seq = 0  # touched only by the capture thread
        # on every frame, so the edge (which reads no camera config) knows where to locate the person
        self.no_alert_zones = [zone.polygon for zone in camera.zones if not zone.alerts]
        # the outage and the dropping spell in progress: each is logged when it begins and when it ends
        self.failed_in_outage = 0
        self.dropped_in_spell = 0
        self.in_flight: set[asyncio.Future] = set()  # sent, not acknowledged yet
        self.closed = False

    # --- capture thread side -----------------------------------------------------------------
    def emit(self, frame: CapturedFrame) -> None:
        """Called by the capture thread: number the frame and queue it for Kafka."""
        if self.slots is not None:
            while not self.slots.acquire(timeout=SLOT_POLL_S):
                if self.thread_stop.is_set():
                    return
        item = (self.next_seq, frame)
        self.next_seq += 1
        self.to_loop(self.offer, item)

    def capture(self) -> None:
        """The capture thread's body; the end of the source closes the queue."""
        try:
            CameraCapture(self.camera, self.settings.producers, self.stats, self.emit, self.thread_stop).run()
        finally:
            self.to_loop(self.close)

    def to_loop(self, callback: Callable[..., None], *args: object) -> None:
        # RuntimeError: the event loop has closed, the producer shut down while this capture was blocked
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(callback, *args)

    # --- event loop side ---------------------------------------------------------------------
    def offer(self, item: tuple[int, CapturedFrame]) -> None:
        if self.slots is None and self.queue.qsize() >= self.capacity:
            self.queue.get_nowait()
            self.stats.dropped += 1
            self.dropped_in_spell += 1
            if self.dropped_in_spell == 1:
                log.warning(
                    "camera %s: %d frames queued for Kafka, the most kept: dropping the oldest", self.camera.id,
                    self.capacity,
                )  # fmt: skip
        self.queue.put_nowait(item)
        self.stats.queued = self.queue.qsize()

    def close(self) -> None:
        self.closed = True
        self.queue.put_nowait(None)

    async def publish(self) -> None:
        """Send queued frames until the queue is closed; every ack or failure is counted."""
        topic = self.settings.kafka.topics.frames
        while (item := await self.queue.get()) is not None:
            if self.slots is not None:
                self.slots.release()
            self.stats.queued = self.queue.qsize()
            if self.dropped_in_spell and self.queue.empty():
                log.warning("camera %s: the queue for Kafka drained, %d frames dropped", self.camera.id,
                            self.dropped_in_spell)  # fmt: skip
                self.dropped_in_spell = 0
            seq, captured = item
            frame = Frame(
                frame_id=Frame.make_id(self.camera.id, captured.captured_at, seq),
                camera_id=self.camera.id,
                room=self.camera.room,
                seq=seq,
                captured_at=captured.captured_at,
                width=captured.width,
                height=captured.height,
                jpeg=captured.jpeg,
                no_alert_zones=self.no_alert_zones,
            )
            try:
                ack = await send(self.output.producer, topic, self.camera.id, frame)
            except Exception as exc:  # KafkaError, or a bug: one frame is lost, the camera goes on
                self.on_failure(seq, exc)
                continue
            ack.add_done_callback(functools.partial(self.on_ack, seq, captured.captured_at))
            self.in_flight.add(ack)
            if len(self.in_flight) >= ACK_WINDOW:
                _, self.in_flight = await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)
        if self.in_flight:
            await asyncio.wait(self.in_flight)

    def unsent(self) -> int:
        """Frames queued or sent and not acknowledged."""
        queued = max(0, self.queue.qsize() - self.closed)  # the end-of-queue mark is no frame
        return queued + sum(1 for ack in self.in_flight if not ack.done())

    def on_ack(self, seq: int, captured_at: datetime, ack: asyncio.Future) -> None:
        if ack.cancelled() or ack.exception() is not None:
            self.on_failure(seq, ack.exception() or asyncio.CancelledError())
            return
        self.stats.published += 1
        if self.failed_in_outage:
            log.warning("camera %s: Kafka accepts frames again, %d not accepted", self.camera.id, self.failed_in_outage)
            self.failed_in_outage = 0
        self.stats.fps_out.mark()
        self.stats.send_delay_s.mark((datetime.now(UTC) - captured_at).total_seconds())

    def on_failure(self, seq: int, exc: BaseException) -> None:
        self.stats.failed += 1
        self.failed_in_outage += 1
        if isinstance(exc, FATAL_PRODUCER_ERRORS):
            self.output.renew(exc)
        # the first of an outage, then every 100th: an outage long ago does not quieten this one
        if self.failed_in_outage == 1 or self.failed_in_outage % 100 == 0:
            log.warning(
                "camera %s: Kafka did not accept frame %d (%d in this outage): %s",
                self.camera.id, seq, self.failed_in_outage, exc,
            )  # fmt: skip


def check_cameras(settings: ProducerSettings) -> list[CameraSettings]:
    """The enabled cameras; every start-up problem becomes one line of one ConfigError."""
    cameras = [camera for camera in settings.cameras if camera.enabled]
    problems = []
    if not cameras:
        problems.append("no enabled cameras under producers.cameras")
    if len(cameras) > settings.max_cameras:
        problems.append(f"{len(cameras)} enabled cameras, more than producers.max_cameras ({settings.max_cameras})")
    for camera in cameras:
        path = Path(camera.sampled_url.removeprefix("file://"))
        if source_kind(camera.sampled_url) == "file" and not path.is_file():
            problems.append(f"camera {camera.id}: video file {redact(camera.sampled_url)} does not exist")
    if problems:
        raise ConfigError("\n  ".join(["camera configuration:", *problems]))
    return cameras


def start_captures(publishers: list[CameraPublisher]) -> list[threading.Thread]:
    threads = []
    for publisher in publishers:
        name = f"capture-{publisher.camera.id}"
        # daemon: a capture that never returns from the decoder must not keep the process alive
        threads.append(threading.Thread(target=publisher.capture, name=name, daemon=True))
        threads[-1].start()
        log.info(
            "camera %s (%s): %s at %g fps, decode %s",
            publisher.camera.id,
            publisher.camera.room,
            redact(publisher.camera.sampled_url),
            publisher.camera.fps,
            publisher.camera.decode,
        )
    return threads


def join_captures(threads: list[threading.Thread], settings: ProducerSettings) -> None:
    """Wait for the capture threads; a blocked read gives up after the stall (or open) timeout."""
    deadline = time.monotonic() + max(settings.open_timeout_s, settings.stall_timeout_s) + JOIN_MARGIN_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:
        log.warning("capture threads still running at shutdown: %s", ", ".join(stuck))


async def drain(publishing: asyncio.Future[Any], publishers: list[CameraPublisher], timeout_s: float) -> bool:
    """After a stop, wait `timeout_s` for Kafka to acknowledge what is queued; what it has not by then is lost,
    and each camera says how much (a broker that is down would otherwise hold the stop for as long). False
    when the publishers were cut short."""
    done, _ = await asyncio.wait({publishing}, timeout=timeout_s)
    if done:
        return True
    for publisher in publishers:
        if unsent := publisher.unsent():
            log.warning("camera %s: %d frames not acknowledged by Kafka within %g s of the stop: lost",
                        publisher.camera.id, unsent, timeout_s)  # fmt: skip
    publishing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await publishing
    return False


async def run_producers(settings: Settings, stop: asyncio.Event) -> dict[str, int]:
    """Stream every enabled camera until `stop` (or until every camera is a file that ended).

    Returns the frames Kafka acked per camera id.
    """
    cameras = check_cameras(settings.producers)
    output = KafkaOutput(settings)
    loop = asyncio.get_running_loop()
    thread_stop = threading.Event()
    publishers = [CameraPublisher(camera, settings, output, loop, thread_stop) for camera in cameras]
    stats = {p.camera.id: p.stats for p in publishers}
    try:
        # before Kafka: a port in use is one line naming the setting, with nothing started yet
        metrics = serve_metrics(settings.producers, cameras, stats)
    except ConfigError:
        await output.producer.stop()
        raise
    try:
        await output.start()
    except (DependencyUnavailable, ConfigError):
        metrics.close()
        raise
    status_done = asyncio.Event()
    status_writer = asyncio.create_task(run_status_writer(settings, cameras, stats, status_done))
    threads = start_captures(publishers)
    publishing = asyncio.gather(*(p.publish() for p in publishers))
    stopping = asyncio.create_task(stop.wait())
    try:
        waiting: set[asyncio.Future[Any]] = {publishing, stopping}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        drained = True
        if stop.is_set():
            thread_stop.set()
            for publisher in publishers:
                publisher.close()  # what is queued still goes out, if Kafka takes it in time
            drained = await drain(publishing, publishers, settings.producers.drain_timeout_s)
        if drained:
            await publishing  # a publisher's error, if any, is raised here
    finally:
        thread_stop.set()
        stopping.cancel()
        # joined before the interpreter exits: one still inside the decoder then aborts the process
        await asyncio.to_thread(join_captures, threads, settings.producers)
        status_done.set()
        await status_writer
        metrics.close()
        await output.stop()
    for publisher in publishers:
        log.info(
            "camera %s (%s): %d frames published, %d dropped, %d skipped by motion, %d reconnects",
            publisher.camera.id,
            publisher.camera.room,
            publisher.stats.published,
            publisher.stats.dropped,
            publisher.stats.skipped_motion,
            publisher.stats.reconnects,
        )
    return {camera_id: camera_stats.published for camera_id, camera_stats in stats.items()}
