"""Kafka plumbing (`core.kafka_io`) on the real broker: topic partitions from public metadata, group lag."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import UnknownTopicOrPartitionError

from core.kafka_io import (
    consumer_group_lag,
    create_topics,
    make_admin,
    make_producer,
    read_topic_partitions,
    start_clients,
    topic_specs,
)
from core.settings import ConfigError, Settings
from fallwatch.stack import LocalStack
from tests.conftest import REPO


async def topic_names(settings: Settings) -> list[str]:
    admin = make_admin(settings)
    await admin.start()
    try:
        return await admin.list_topics()
    finally:
        await admin.close()


def test_a_topics_partitions_are_read_and_an_absent_topic_is_not_created(settings: Settings) -> None:
    topic = settings.kafka.topics.frames
    absent = f"absent-{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[list[TopicPartition], list[TopicPartition], list[str]]:
        partitions = await read_topic_partitions(settings, topic)
        missing = await read_topic_partitions(settings, absent)
        return partitions, missing, await topic_names(settings)

    partitions, missing, topics = asyncio.run(scenario())
    assert partitions == [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
    assert missing == [] and absent not in topics


def test_a_topic_the_broker_refuses_to_create_is_one_error_and_is_not_auto_created(settings: Settings) -> None:
    """Two copies asked of a one-broker cluster: the broker refuses; the topic must not then appear with the
    broker's defaults (a week's retention for residents' frames, say) through a client's auto-creation."""
    name = f"refused-{uuid.uuid4().hex[:8]}"
    two_copies = settings.kafka.model_copy(update={"replication_factor": 2})

    async def scenario() -> list[str]:
        with pytest.raises(ConfigError) as refusal:
            await create_topics(two_copies, {name: {"retention.ms": "3600000"}}, 2)
        assert str(refusal.value).startswith(f"Kafka refused to create topics (kafka.replication_factor, partitions, "
                                             f"configs?): {name}: ")  # fmt: skip
        assert "replication factor" in str(refusal.value).lower(), refusal.value
        return await topic_names(settings)

    assert name not in asyncio.run(scenario())


def test_the_local_broker_makes_no_topic_nobody_created(settings: Settings) -> None:
    """As the production broker (docker-compose.yml): a record for a topic `topics create` did not make is an
    error to its producer, never a topic with the broker's defaults, so the tests catch a topic left out."""
    name = f"never-created-{uuid.uuid4().hex[:8]}"

    async def scenario() -> list[str]:
        producer = make_producer(settings, request_timeout_ms=3000)
        await start_clients(settings, producer)
        try:
            with pytest.raises(UnknownTopicOrPartitionError):
                await producer.send_and_wait(name, b"a record for no topic")
        finally:
            await producer.stop()
        return await topic_names(settings)

    assert name not in asyncio.run(scenario())


def test_a_groups_lag_on_a_new_broker_waits_for_the_group_coordinator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a broker of its own, without `__consumer_offsets` yet: it creates that topic on the first
    # FindCoordinator and answers COORDINATOR_NOT_AVAILABLE until the coordinator is loaded
    stack = LocalStack(tmp_path / "stack", cache_dir=REPO / ".cache", partitions=1)
    settings = Settings(state_dir=tmp_path / "state")
    state = stack.up(topic_specs(settings))
    try:
        settings = settings.model_copy(
            update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": state.bootstrap_servers})}
        )
        topic = settings.kafka.topics.frames

        async def scenario() -> int:
            producer = make_producer(settings)
            await start_clients(settings, producer)
            try:
                await asyncio.gather(*[await producer.send(topic, b"{}") for _ in range(3)])
            finally:
                await producer.stop()
            return await consumer_group_lag(settings, "never-committed", topic)

        with caplog.at_level(logging.WARNING, logger="core.retry"):
            lag = asyncio.run(scenario())
    finally:
        stack.down()
    assert lag == 3, "a group that never committed has every record still to read"
    assert any(
        "the coordinator of consumer group never-committed not reachable" in r.getMessage() for r in caplog.records
    )
