"""The edge's side of the claim check: an offloaded frame's clip to Redis, its request to the cloud.

The request names the clip by Redis keys (the JPEGs stay out of Kafka) and the frame by its
position in `frames`, where the cloud worker reads it when the clip has expired.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from redis.asyncio import Redis

from core.clips import BufferedFrame
from schemas import CloudRequest, EdgeOutput, Frame, KafkaPosition, OffloadReason, utc_now

FRAME_KEY_PREFIX = "fallwatch:frame:"


def clip_key(frame_id: str) -> str:
    return FRAME_KEY_PREFIX + frame_id


async def store_clip(redis: Redis, clip: Sequence[BufferedFrame], ttl_s: int) -> bool:
    """The clip's JPEGs under their keys, expiring after `ttl_s` (True: for `RedisOutage.call`)."""
    async with redis.pipeline(transaction=False) as pipe:
        for frame in clip:
            pipe.set(clip_key(frame.frame_id), frame.jpeg, ex=ttl_s)
        await pipe.execute()
    return True


@dataclass(frozen=True)
class Offload:
    """What the edge concluded about a frame it offloads."""

    edge: EdgeOutput
    switcher_score: float
    switcher_version: str
    reason: OffloadReason
    deadline_s: float  # after this a cloud answer is no longer useful


def cloud_request(
    frame: Frame, position: KafkaPosition, clip: Sequence[BufferedFrame], offload: Offload
) -> CloudRequest:
    """The request for `frame`, whose clip (oldest first, ending with it) is stored; [] when it could not be."""
    return CloudRequest(
        frame_id=frame.frame_id,
        camera_id=frame.camera_id,
        room=frame.room,
        captured_at=frame.captured_at,
        frame_position=position,
        clip_keys=[clip_key(buffered.frame_id) for buffered in clip],
        clip_frame_ids=[buffered.frame_id for buffered in clip],
        edge=offload.edge,
        switcher_score=offload.switcher_score,
        switcher_version=offload.switcher_version,
        reason=offload.reason,
        deadline=utc_now() + timedelta(seconds=offload.deadline_s),
    )
