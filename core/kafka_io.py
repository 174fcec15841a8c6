"""Kafka plumbing shared by the services: clients, topic specs, decoding with dead letters.

Delivery is at-least-once everywhere: producers use acks=all with idempotence,
consumers never auto-commit and commit a batch's offsets only after every output
of the batch is acked by the broker (see `commit_held_offsets`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError

from core.settings import Settings
from schemas import DeadLetter, Message, SchemaError, decode, encode

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

MAX_MESSAGE_BYTES = 10 * 1024 * 1024


def topic_specs(settings: Settings) -> dict[str, dict[str, str]]:
    """Every topic fallwatch uses, with its configs (the `frames` retention is kept short)."""
    topics = settings.kafka.topics
    retention_ms = str(int(settings.kafka.frames_retention_hours * 3600 * 1000))
    specs: dict[str, dict[str, str]] = {name: {} for name in topics.all()}
    specs[topics.frames] = {"retention.ms": retention_ms}
    # the newest record of each camera is its person-down state: compaction keeps it however old
    specs[topics.person_down] = {"cleanup.policy": "compact"}
    return specs


def make_producer(settings: Settings, **overrides: object) -> AIOKafkaProducer:
    options: dict[str, object] = {
        "bootstrap_servers": settings.kafka.bootstrap_servers,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_request_size": MAX_MESSAGE_BYTES,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(settings: Settings, *topics: str, group_id: str | None, **overrides: object) -> AIOKafkaConsumer:
    options: dict[str, object] = {
        "bootstrap_servers": settings.kafka.bootstrap_servers,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_bytes": 4 * MAX_MESSAGE_BYTES,
        "max_partition_fetch_bytes": MAX_MESSAGE_BYTES,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


async def send(producer: AIOKafkaProducer, topic: str, key: str, message: Message) -> asyncio.Future:
    """Queue one message; the returned future resolves when the broker has acked it."""
    return await producer.send(topic, key=key.encode(), value=encode(message))


class SourceRecord(Protocol):
    """What a dead letter keeps of a consumed record (aiokafka's ConsumerRecord, faust's Message)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def dead_letter_for(service: str, record: SourceRecord, reason: str) -> DeadLetter:
    return DeadLetter(
        service=service,
        reason=reason,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        key=record.key,
        raw=record.value or b"",
    )


async def send_dead_letter(
    producer: AIOKafkaProducer, settings: Settings, service: str, record: ConsumerRecord, reason: str
) -> asyncio.Future:
    log.warning("dead letter from %s partition %s offset %s: %s", record.topic, record.partition, record.offset, reason)
    return await producer.send(
        settings.kafka.topics.dead_letters,
        key=record.key,
        value=encode(dead_letter_for(service, record, reason)),
    )


async def decode_batch(
    producer: AIOKafkaProducer,
    settings: Settings,
    service: str,
    model: type[M],
    records: Iterable[ConsumerRecord],
) -> tuple[list[tuple[ConsumerRecord, M]], list[asyncio.Future]]:
    """Decode every record; the ones that fail go to `dead-letters` (their ack futures are returned)."""
    good: list[tuple[ConsumerRecord, M]] = []
    acks: list[asyncio.Future] = []
    for record in records:
        try:
            good.append((record, decode(model, record.value)))
        except SchemaError as exc:
            acks.append(await send_dead_letter(producer, settings, service, record, str(exc)))
    return good, acks


async def commit_held_offsets(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
    """Commit `offsets` of the partitions this consumer still holds, once their outputs are acked.

    A rebalance may have taken partitions while their batch was answered, or make the group
    refuse the commit: the partitions' owner then answers those records again from the last
    commit (at-least-once; consumers dedupe by frame id), so this is logged, not raised.
    """
    assigned = consumer.assignment()
    held = {partition: offset for partition, offset in offsets.items() if partition in assigned}
    if len(held) < len(offsets):
        log.warning(
            "offsets of %d revoked partition(s) not committed; their records will be answered again",
            len(offsets) - len(held),
        )
    if not held:
        return
    try:
        await consumer.commit(held)
    except CommitFailedError as exc:
        log.warning("offsets of a batch not committed (%s); its records will be answered again", exc)


async def consumer_group_lag(settings: Settings, group_id: str, topic: str) -> int:
    """Records of `topic` the group has not committed yet (all of them if it never committed)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    consumer = make_consumer(settings, group_id=None)
    await admin.start()
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic)
        end_offsets = await consumer.end_offsets(partitions)
        committed = await admin.list_consumer_group_offsets(group_id, partitions=partitions)
        return sum(
            end_offsets[tp] - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
            for tp in partitions
        )
    finally:
        await consumer.stop()
        await admin.close()


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions, from fresh cluster metadata (a new client's cache may be empty)."""
    # consumer.topics() fetches fresh metadata but does not store it in the client's cache, so
    # partitions_for_topic() after it still answers None: read the fetched metadata itself.
    cluster = await consumer._client.fetch_all_metadata()
    return [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]
