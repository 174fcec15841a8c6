"""An alert's evidence frames (its snapshot is the newest), read back from `frames` as JPEGs.

Verdicts carry no pixels, and `frames` is the source of truth, so the frame is
found there: its camera's partition (the producers' key is the camera id), the
first offset at or after its capture time (a record's timestamp is when it was
published, never before the capture), then forward until every frame id showed up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime

from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from core.kafka_io import make_consumer, read_topic_partitions
from core.settings import Settings
from schemas import Frame, SchemaError, decode

log = logging.getLogger(__name__)

# a frame is published within seconds of its capture; records of this camera past that are not it
SEARCH_SPAN_S = 120.0


async def find_frame_jpegs(
    settings: Settings, camera_id: str, frame_ids: Sequence[str], captured_at: datetime, timeout_s: float = 10.0
) -> dict[str, bytes]:
    """The JPEGs of those of `frame_ids` (captured at or after `captured_at`) found in `frames` within
    `timeout_s`, by frame id: one pass over the camera's partition for all of them."""
    topic = settings.kafka.topics.frames
    wanted = set(frame_ids)
    found: dict[str, bytes] = {}
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        partitions = await read_topic_partitions(settings, topic)
        if not partitions:
            return found
        key = camera_id.encode()
        numbers = [tp.partition for tp in partitions]
        partition = TopicPartition(topic, DefaultPartitioner()(key, numbers, numbers))
        consumer.assign([partition])
        since_ms = int(captured_at.timestamp() * 1000)
        start = (await consumer.offsets_for_times({partition: since_ms}))[partition]
        if start is None:
            return found  # nothing published since the capture: the frames are not (or no longer) there
        consumer.seek(partition, start.offset)
        end = (await consumer.end_offsets([partition]))[partition]
        deadline = asyncio.get_running_loop().time() + timeout_s
        while await consumer.position(partition) < end and asyncio.get_running_loop().time() < deadline:
            records = (await consumer.getmany(partition, timeout_ms=500)).get(partition, [])
            for record in records:
                if record.key != key:
                    continue
                if record.timestamp > since_ms + SEARCH_SPAN_S * 1000:
                    return found
                try:
                    frame = decode(Frame, record.value)
                except SchemaError:
                    continue  # a bad record in `frames` is the edge workers' dead letter, not ours
                if frame.frame_id in wanted:
                    found[frame.frame_id] = frame.jpeg
                    if len(found) == len(wanted):
                        return found
        return found
    finally:
        await consumer.stop()
