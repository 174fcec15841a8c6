"""Camera status in Redis, written by the producers and read by `fallwatch cameras status`.

Each producer writes one key per camera, `<producers.status_key_prefix>:<camera id>`, every
`status_interval_s`, with a TTL of a few intervals: a producer that dies leaves no stale
"streaming" behind, and the command works from any machine that reaches Redis, however many
producer processes share the cameras. URLs are redacted before they are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from typing import Any

from redis.exceptions import RedisError

from core.redis_io import redis_client
from core.settings import CameraSettings, ConfigError, Settings
from core.urls import redact
from producers.camera import CameraStats

log = logging.getLogger(__name__)

STATUS_TTL_INTERVALS = 5


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def camera_status(camera: CameraSettings, stats: CameraStats) -> dict[str, Any]:
    return {
        "camera_id": camera.id,
        "room": camera.room,
        "url": redact(camera.url),
        "detect_url": None if camera.detect_url is None else redact(camera.detect_url),
        "decode": camera.decode,
        "state": stats.state,
        "fps_target": camera.fps,
        "fps_in": round(stats.fps_in.rate(), 2),
        "fps_sampled": round(stats.fps_sampled.rate(), 2),
        "fps_out": round(stats.fps_out.rate(), 2),
        "frames_in": stats.frames_in,
        "decoded": stats.decoded,
        "sampled": stats.sampled,
        "behind": stats.behind,
        "behind_for_s": round(stats.behind_for_s(), 1),
        "send_delay_s": rounded(stats.send_delay_s.mean()),
        "send_delay_max_s": rounded(stats.send_delay_s.max()),
        "published": stats.published,
        "skipped_motion": stats.skipped_motion,
        "heartbeats": stats.heartbeats,
        "dropped": stats.dropped,
        "failed": stats.failed,
        "reconnects": stats.reconnects,
        "stalls": stats.stalls,
        "last_frame_at": stats.last_frame_at,
        "last_error": stats.last_error,
        "producer": f"{socket.gethostname()}:{os.getpid()}",
        "updated_at": time.time(),
    }


def status_key(settings: Settings, camera_id: str) -> str:
    return f"{settings.producers.status_key_prefix}:{camera_id}"


async def run_status_writer(
    settings: Settings, cameras: list[CameraSettings], stats: dict[str, CameraStats], done: asyncio.Event
) -> None:
    """Write every camera's status until `done`, and once more after it (the final counts)."""
    redis = redis_client(settings.redis)
    interval_s = settings.producers.status_interval_s
    ttl_s = max(1, round(interval_s * STATUS_TTL_INTERVALS))
    failing = False
    try:
        while True:
            finished = done.is_set()
            try:
                async with redis.pipeline(transaction=False) as pipe:
                    for camera in cameras:
                        value = json.dumps(camera_status(camera, stats[camera.id]))
                        pipe.set(status_key(settings, camera.id), value, ex=ttl_s)
                    await pipe.execute()
                if failing:
                    log.info("camera status reaches Redis again")
                failing = False
            except (RedisError, OSError) as exc:
                # status is for people; the frames keep flowing without it
                if not failing:
                    log.warning("cannot write camera status to Redis (%s); frames still flow", exc)
                failing = True
            if finished:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), interval_s)
    finally:
        await redis.aclose()


async def read_statuses(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every camera status in Redis under the configured prefix, by camera id."""
    redis = redis_client(settings.redis)
    prefix = settings.producers.status_key_prefix
    try:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}:*")]
        values = await redis.mget(keys) if keys else []
    except (RedisError, OSError) as exc:
        raise ConfigError(f"cannot read camera status from Redis at {redact(settings.redis.url)}: {exc}") from None
    finally:
        await redis.aclose()
    statuses = [json.loads(value) for value in values if value is not None]
    return {status["camera_id"]: status for status in statuses}


def status_rows(settings: Settings, statuses: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configured camera (no status: its producer is not running) and per other reporting camera."""
    configured = {camera.id: camera for camera in settings.producers.cameras}
    rows: list[dict[str, Any]] = []
    for camera_id in [*configured, *sorted(set(statuses) - set(configured))]:
        status = statuses.get(camera_id)
        if status is None:
            camera = configured[camera_id]
            state = "disabled" if not camera.enabled else "no status (producer not running?)"
            rows.append({"camera_id": camera_id, "room": camera.room, "url": redact(camera.url), "state": state})
            continue
        last = status.get("last_frame_at")
        rows.append({**status, "last_frame_age_s": None if last is None else round(time.time() - last, 1)})
    return rows
