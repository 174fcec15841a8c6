"""Kafka plumbing (`core.kafka_io`) on the real broker: topic partitions from public metadata."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import TopicPartition

from core.kafka_io import make_admin, read_topic_partitions
from core.settings import Settings


def test_a_topics_partitions_are_read_and_an_absent_topic_is_not_created(settings: Settings) -> None:
    topic = settings.kafka.topics.frames
    absent = f"absent-{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[list[TopicPartition], list[TopicPartition], list[str]]:
        partitions = await read_topic_partitions(settings, topic)
        missing = await read_topic_partitions(settings, absent)
        admin = make_admin(settings)
        await admin.start()
        try:
            return partitions, missing, await admin.list_topics()
        finally:
            await admin.close()

    partitions, missing, topics = asyncio.run(scenario())
    assert partitions == [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
    assert missing == [] and absent not in topics
