"""Cloud requests made as the edge worker makes them, for the cloud worker's tests and benchmark.

Each clip becomes a camera's frames: every one of them to Redis under its claim-check key and the
last to `frames`, then the request built by the edge worker's own `edge_workers.requests`.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np

from cloud_workers.model import Clip
from core.clips import BufferedFrame
from core.images import encode_jpeg_rgb
from core.kafka_io import make_producer
from core.redis_io import redis_client
from core.settings import Settings
from edge_workers.requests import Offload, cloud_request, store_clip
from fallwatch.benchmarks.kit import CAMERA_SIZE, camera_frame
from schemas import CloudRequest, EdgeOutput, Frame, KafkaPosition, encode, utc_now

FRAME_INTERVAL = timedelta(milliseconds=250)  # between the frames of a clip
OFFLOAD = Offload(
    edge=EdgeOutput(fall_probability=0.25, decision=False, model="edge-bench"),
    switcher_score=0.3,
    switcher_version="bench",
    reason="switcher",
    deadline_s=120.0,
)


def synthetic_clip(seed: int, num_frames: int, height: int = CAMERA_SIZE[0], width: int = CAMERA_SIZE[1]) -> Clip:
    """A block falling over a background of the seed's colour with sensor-like noise, oldest first."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, 3)
    frames = []
    for step in range(num_frames):
        frame = np.clip(background + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        top = int(step * (height * 0.6) / max(1, num_frames - 1))
        frame[top : top + height // 3, width // 3 : width // 2] = 255 - background
        frames.append(frame)
    return frames


def camera_frames(camera: str, clip: Clip, first_seq: int) -> list[Frame]:
    """The clip as a camera's frames, oldest first, the last one captured now."""
    last_at = utc_now()
    frames = []
    for index, image in enumerate(clip):
        captured_at = last_at - (len(clip) - 1 - index) * FRAME_INTERVAL
        seq = first_seq + index
        frames.append(camera_frame(camera, f"room-{camera}", seq, captured_at, encode_jpeg_rgb(image), image.shape[:2]))
    return frames


async def publish_requests(
    settings: Settings,
    clips: list[Clip],
    deadline_s: float = OFFLOAD.deadline_s,
    store_clips: bool = True,
    cameras: tuple[str, ...] = ("cam-a", "cam-b", "cam-c"),
    first_seq: int = 0,
    send_requests: bool = True,
) -> list[CloudRequest]:
    """Do what an edge worker does for each clip: its frames to Redis, the last one to `frames`, a request.

    `store_clips=False` leaves the clip out of Redis, as if its TTL had run out (the request still
    names it); `send_requests=False` returns the requests without publishing them. Request `i` of a
    call is clip `i`, on camera `i % len(cameras)`; `first_seq` keeps the frames of calls apart.
    """
    topics = settings.kafka.topics
    offload = Offload(OFFLOAD.edge, OFFLOAD.switcher_score, OFFLOAD.switcher_version, OFFLOAD.reason, deadline_s)
    producer = make_producer(settings)
    redis = redis_client(settings.redis)
    await producer.start()
    requests = []
    try:
        for index, clip in enumerate(clips):
            camera = cameras[index % len(cameras)]
            frames = camera_frames(camera, clip, (first_seq + index) * len(clip))
            frame = frames[-1]
            buffered = [BufferedFrame(f.frame_id, f.captured_at, f.jpeg) for f in frames]  # as the edge buffers them
            if store_clips:
                await store_clip(redis, buffered, settings.edge.clip_ttl_s)
            sent = await producer.send_and_wait(topics.frames, key=camera.encode(), value=encode(frame))
            position = KafkaPosition(topic=sent.topic, partition=sent.partition, offset=sent.offset)
            request = cloud_request(frame, position, buffered, offload)
            if send_requests:
                await producer.send_and_wait(topics.cloud_requests, key=camera.encode(), value=encode(request))
            requests.append(request)
    finally:
        await producer.stop()
        await redis.aclose()
    return requests
