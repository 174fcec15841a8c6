"""Replay logged frames through both models and write DMD records (paper A.2).

For every frame in the `frames` topic (the source of truth), run the edge model
(fall probability + last hidden layer) and the cloud model on the frame's clip
(the camera's preceding frames, built exactly as the edge worker builds it),
and record whether the two models' fall predictions agree: `label = 1` when
they agree.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cloud_workers.model import CloudModel
from edge_workers.model import EdgeModel
from edge_workers.service import ClipBuffers
from fallwatch.images import decode_jpeg_rgb
from fallwatch.kafka_io import make_consumer, topic_partitions
from fallwatch.settings import Settings
from schemas import Frame, SchemaError, decode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DmdRecord:
    frame_id: str
    image_path: str  # where the input lives: kafka://topic/partition/offset for logged traffic
    camera_id: str
    last_hidden_layer: list[float]
    small_fall_probability: float
    small_prediction: int
    large_fall_probability: float
    large_prediction: int
    label: int  # 1 when the two models' fall predictions agree


@dataclass(frozen=True)
class PendingFrame:
    source: str
    frame: Frame
    image_rgb: np.ndarray
    clip_rgb: list[np.ndarray]


@dataclass
class ReplaySummary:
    frames: int = 0
    skipped: int = 0
    agreements: int = 0


async def logged_frames(settings: Settings) -> AsyncIterator[tuple[str, Frame]]:
    """Every frame in the `frames` topic up to its end at the start of the replay, partition by partition."""
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        topic = settings.kafka.topics.frames
        partitions = await topic_partitions(consumer, topic)
        end_offsets = await consumer.end_offsets(partitions)
        for partition in partitions:
            if end_offsets[partition] == 0:
                continue
            consumer.assign([partition])
            await consumer.seek_to_beginning(partition)
            while await consumer.position(partition) < end_offsets[partition]:
                batch = await consumer.getmany(partition, timeout_ms=1000)
                for record in batch.get(partition, []):
                    if record.offset >= end_offsets[partition]:
                        break
                    source = f"kafka://{topic}/{record.partition}/{record.offset}"
                    try:
                        yield source, decode(Frame, record.value)
                    except SchemaError as exc:
                        log.warning("skipping %s: %s", source, exc)
    finally:
        await consumer.stop()


async def replay_frames(
    settings: Settings, edge_model: EdgeModel, cloud_model: CloudModel, output: Path, batch_size: int = 8
) -> ReplaySummary:
    """Write one DMD record per logged frame to `output` (JSON lines); returns counts."""
    summary = ReplaySummary()
    clips = ClipBuffers(settings.cloud.num_frames, settings.edge.clip_seconds)
    output.parent.mkdir(parents=True, exist_ok=True)
    pending: list[PendingFrame] = []
    with output.open("w") as sink:

        def flush() -> None:
            if not pending:
                return
            edge = edge_model.predict([item.image_rgb for item in pending])
            large = cloud_model.predict([item.clip_rgb for item in pending])
            for item, small_p, hidden, large_p in zip(
                pending, edge.fall_probability, edge.hidden, large, strict=True
            ):
                small = int(small_p >= settings.edge.decision_threshold)
                big = int(large_p >= settings.cloud.decision_threshold)
                record = DmdRecord(
                    frame_id=item.frame.frame_id,
                    image_path=item.source,
                    camera_id=item.frame.camera_id,
                    last_hidden_layer=[float(v) for v in hidden],
                    small_fall_probability=float(small_p),
                    small_prediction=small,
                    large_fall_probability=float(large_p),
                    large_prediction=big,
                    label=int(small == big),
                )
                sink.write(json.dumps(asdict(record)) + "\n")
                summary.frames += 1
                summary.agreements += record.label
            pending.clear()

        async for source, frame in logged_frames(settings):
            image = decode_jpeg_rgb(frame.jpeg)
            if image is None:
                log.warning("skipping %s: JPEG could not be decoded", source)
                summary.skipped += 1
                continue
            clips.add(frame)
            clip = [decode_jpeg_rgb(buffered.jpeg) for buffered in clips.clip_ending_at(frame)]
            pending.append(PendingFrame(source, frame, image, [c for c in clip if c is not None]))
            if len(pending) >= batch_size:
                flush()
        flush()
    return summary
