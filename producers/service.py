"""The camera producer: one process, one task per camera, frames to the `frames` topic."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaProducer

from fallwatch.kafka_io import make_producer, send
from fallwatch.settings import CameraSettings, Settings
from producers.video import SampledFrame, encode_jpeg, redact, sample_frames
from schemas import Frame

log = logging.getLogger(__name__)

ACK_WINDOW = 64  # frames in flight per camera before waiting for the broker's acks


async def stream_camera(
    producer: AIOKafkaProducer, settings: Settings, camera: CameraSettings, stop: asyncio.Event
) -> int:
    """Publish the camera's sampled frames until it ends (or `stop`); returns how many were acked."""
    frames: Iterator[SampledFrame] = sample_frames(camera.url, camera.fps, pace=camera.realtime)
    started_at = datetime.now(UTC)
    acks: list[asyncio.Future] = []
    seq = 0
    while not stop.is_set():
        # OpenCV blocks: read in a worker thread so the other cameras keep flowing
        sampled = await asyncio.to_thread(next, frames, None)
        if sampled is None:
            if not camera.loop:
                break
            frames = sample_frames(camera.url, camera.fps, pace=camera.realtime)
            started_at = datetime.now(UTC)
            continue
        captured_at = started_at + timedelta(seconds=sampled.position_s)
        height, width = sampled.image_bgr.shape[:2]
        frame = Frame(
            frame_id=Frame.make_id(camera.id, captured_at, seq),
            camera_id=camera.id,
            room=camera.room,
            seq=seq,
            captured_at=captured_at,
            width=width,
            height=height,
            jpeg=encode_jpeg(sampled.image_bgr, camera.jpeg_quality),
        )
        acks.append(await send(producer, settings.kafka.topics.frames, camera.id, frame))
        seq += 1
        if len(acks) >= ACK_WINDOW:
            await asyncio.gather(*acks)
            acks.clear()
    await asyncio.gather(*acks)
    log.info("camera %s (%s): %d frames published from %s", camera.id, camera.room, seq, redact(camera.url))
    return seq


async def run_producers(settings: Settings, stop: asyncio.Event) -> dict[str, int]:
    """Stream every enabled camera; returns frames published per camera id."""
    cameras = [camera for camera in settings.producers.cameras if camera.enabled]
    producer = make_producer(settings)
    await producer.start()
    try:
        counts = await asyncio.gather(*(stream_camera(producer, settings, camera, stop) for camera in cameras))
    finally:
        await producer.stop()
    return {camera.id: count for camera, count in zip(cameras, counts, strict=True)}
