"""An alert's evidence snapshot: the JPEG of one evidence frame, read back from `frames`.

Verdicts carry no pixels, and `frames` is the source of truth, so the frame is
found there: its camera's partition (the producers' key is the camera id), the
first offset at or after its capture time (a record's timestamp is when it was
published, never before the capture), then forward until the frame id shows up.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from core.kafka_io import make_consumer, read_topic_partitions
from core.settings import Settings
from schemas import Frame, SchemaError, decode

log = logging.getLogger(__name__)

# a frame is published within seconds of its capture; records of this camera past that are not it
SEARCH_SPAN_S = 120.0


async def find_frame_jpeg(
    settings: Settings, camera_id: str, frame_id: str, captured_at: datetime, timeout_s: float = 10.0
) -> bytes | None:
    """The JPEG of `frame_id` from `frames`, or None when it is not there (any more) within `timeout_s`."""
    topic = settings.kafka.topics.frames
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        partitions = await read_topic_partitions(settings, topic)
        if not partitions:
            return None
        key = camera_id.encode()
        numbers = [tp.partition for tp in partitions]
        partition = TopicPartition(topic, DefaultPartitioner()(key, numbers, numbers))
        consumer.assign([partition])
        since_ms = int(captured_at.timestamp() * 1000)
        found = await consumer.offsets_for_times({partition: since_ms})
        if found[partition] is None:
            return None  # nothing published since the capture: the frame is not (or no longer) there
        consumer.seek(partition, found[partition].offset)
        end = (await consumer.end_offsets([partition]))[partition]
        deadline = asyncio.get_running_loop().time() + timeout_s
        while await consumer.position(partition) < end and asyncio.get_running_loop().time() < deadline:
            records = (await consumer.getmany(partition, timeout_ms=500)).get(partition, [])
            for record in records:
                if record.key != key:
                    continue
                if record.timestamp > since_ms + SEARCH_SPAN_S * 1000:
                    return None
                try:
                    frame = decode(Frame, record.value)
                except SchemaError:
                    continue  # a bad record in `frames` is the edge workers' dead letter, not ours
                if frame.frame_id == frame_id:
                    return frame.jpeg
        return None
    finally:
        await consumer.stop()
