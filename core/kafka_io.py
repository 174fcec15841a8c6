"""Kafka plumbing shared by the services: clients, topic specs, decoding with dead letters.

Delivery is at-least-once everywhere: producers use acks=all with idempotence,
consumers never auto-commit and commit a batch's offsets only after every output
of the batch is acked by the broker (see `commit_held_offsets`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    CommitFailedError,
    CoordinatorLoadInProgressError,
    GroupCoordinatorNotAvailableError,
    KafkaConnectionError,
    KafkaError,
    NotCoordinatorError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
    for_code,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import OffsetAndMetadata

from core.retry import retry_until_up
from core.settings import ConfigError, KafkaSettings, Settings
from schemas import DeadLetter, Message, SchemaError, decode, encode

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

MAX_MESSAGE_BYTES = 10 * 1024 * 1024
# A dead letter names its record and never carries it, so a reason is all that can make it long.
MAX_REASON_CHARS = 2000
# A record's key is kept in its dead letter (and keys it) only when it is a plausible camera id.
MAX_DEAD_LETTER_KEY_BYTES = 256
# What a broker answers while a group's coordinator is being created, loaded or moved: retried
COORDINATOR_ERRORS = (GroupCoordinatorNotAvailableError, CoordinatorLoadInProgressError, NotCoordinatorError)


def hours_ms(hours: float) -> str:
    return str(int(hours * 3600 * 1000))


# new topics: every partition has a leader well within this on a healthy cluster
TOPICS_LED_TIMEOUT_S = 60.0


def topic_specs(settings: Settings) -> dict[str, dict[str, str]]:
    """Every topic fallwatch uses, with its configs: `frames` (residents' images) and `dead-letters` expire."""
    kafka = settings.kafka
    specs: dict[str, dict[str, str]] = {name: {} for name in kafka.topics.all()}
    specs[kafka.topics.frames] = {"retention.ms": hours_ms(kafka.frames_retention_hours)}
    specs[kafka.topics.dead_letters] = {"retention.ms": hours_ms(kafka.dead_letters_retention_hours)}
    # the newest record of each camera is its person-down state: compaction keeps it however old
    specs[kafka.topics.person_down] = {"cleanup.policy": "compact"}
    return specs


def client_options(kafka: KafkaSettings) -> dict[str, object]:
    """Where the brokers are and how to authenticate: the options every aiokafka client of fallwatch gets."""
    options: dict[str, object] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.uses_tls:
        options["ssl_context"] = ssl_context(kafka)
    if kafka.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = kafka.password()
    return options


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    context = create_ssl_context(
        cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None,
        certfile=str(kafka.ssl_certfile) if kafka.ssl_certfile else None,
        keyfile=str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None,
    )
    context.check_hostname = kafka.ssl_check_hostname
    return context


def make_admin(settings: Settings, **overrides: object) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**{**client_options(settings.kafka), **overrides})


async def start_clients(
    settings: Settings, *clients: AIOKafkaProducer | AIOKafkaConsumer | AIOKafkaAdminClient
) -> None:
    """Start Kafka clients, retrying while the brokers are unreachable (`kafka.connect_timeout_s` at most)."""
    for client in clients:
        await start_client(settings.kafka, client)


async def start_client(kafka: KafkaSettings, client: AIOKafkaProducer | AIOKafkaConsumer | AIOKafkaAdminClient) -> None:
    """Start one client with `start_clients`' bounded retry (for callers holding only the Kafka settings).

    A broker that refuses the credentials or the certificate is one ConfigError at once: retrying cannot mend
    it, and aiokafka's start reports it as any other failure to connect."""

    async def attempt() -> None:
        try:
            await client.start()
        except KafkaConnectionError:
            refusal = await credentials_refused(kafka)
            if refusal is not None:
                raise ConfigError(f"Kafka at {kafka.bootstrap_servers}: {refusal}") from None
            raise

    await retry_until_up(
        attempt,
        f"Kafka at {kafka.bootstrap_servers} (kafka.bootstrap_servers)",
        kafka.connect_timeout_s,
        (KafkaConnectionError, OSError),
    )


async def credentials_refused(kafka: KafkaSettings) -> str | None:
    """What the first broker refused of this client's authentication, if that is why it cannot connect."""
    host, _, port = kafka.bootstrap_servers.split(",")[0].strip().rpartition(":")
    options = {name: value for name, value in client_options(kafka).items() if name != "bootstrap_servers"}
    try:
        connection = await create_conn(host, int(port), request_timeout_ms=10_000, **options)  # type: ignore[arg-type]
    except (SaslAuthenticationFailed, AuthenticationFailedError, UnsupportedSaslMechanismError) as exc:
        return f"the broker refused the credentials (kafka.sasl_username, kafka.sasl_password): {exc}"
    except ssl.SSLCertVerificationError as exc:
        return f"the broker's certificate does not verify with kafka.ssl_cafile ({exc.verify_message})"
    except (TimeoutError, OSError, KafkaError, ValueError):
        return None  # unreachable, or another failure: retried
    connection.close()
    return None


async def wait_for_kafka(settings: Settings) -> None:
    """Return once the brokers answer, retrying as `start_clients` does: for clients that do not retry (faust)."""
    admin = make_admin(settings)
    await start_clients(settings, admin)
    await admin.close()


@dataclass(frozen=True)
class TopicReport:
    """One topic after `create_topics`: created now, or found, and how it differs from the settings."""

    name: str
    partitions: int
    configs: dict[str, str]
    created: bool
    differences: list[str]


async def create_topics(kafka: KafkaSettings, topics: dict[str, dict[str, str]], partitions: int) -> list[TopicReport]:
    """Create the missing topics (idempotent), each with `partitions` partitions, `kafka.replication_factor`
    copies and its configs; the brokers may take `kafka.connect_timeout_s` to answer.

    Topics that exist are left as they are (changing partitions remaps keys to partitions; changing
    configs is the operator's call): their differences from the settings are reported. Returns once
    every partition has a leader, so the first clients do not meet NotLeader errors.
    """
    admin = AIOKafkaAdminClient(**client_options(kafka), request_timeout_ms=30000)
    await start_client(kafka, admin)
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, partitions, kafka.replication_factor, topic_configs=configs)
            for name, configs in topics.items()
            if name not in existing
        ]
        if missing:
            refused(await admin.create_topics(missing))
        deadline = time.monotonic() + TOPICS_LED_TIMEOUT_S
        while not all_partitions_led(descriptions := await admin.describe_topics(list(topics))):
            if time.monotonic() > deadline:
                raise ConfigError(f"topics {sorted(topics)} have partitions without a leader")
            await asyncio.sleep(0.1)  # polling the broker's metadata, not waiting blindly
        counts = {topic["topic"]: len(topic["partitions"]) for topic in descriptions}
        found = await topic_configs(admin, [name for name in topics if name in existing])
    finally:
        await admin.close()
    reports = []
    for name, configs in topics.items():
        differences = []
        if name in existing:
            if counts[name] != partitions:
                differences.append(f"{counts[name]} partitions, configured {partitions}")
            differences += [
                f"{key}={found[name].get(key)}, configured {value}"
                for key, value in configs.items()
                if found[name].get(key) != value
            ]
        reports.append(TopicReport(name, counts[name], configs, name not in existing, differences))
    return reports


def refused(response: Any) -> None:
    """A ConfigError naming each topic the brokers refused to create (aiokafka returns their errors): the
    topic must not be left to a client's auto-creation, with the broker's defaults instead of its configs."""
    problems = []
    for topic, code, *message in response.topic_errors:
        if code not in (0, TopicAlreadyExistsError.errno):  # created meanwhile by another command: reported
            reason = message[0] if message and message[0] else for_code(code).__name__
            problems.append(f"{topic}: {reason}")
    if problems:
        raise ConfigError("Kafka refused to create topics (kafka.replication_factor, partitions, configs?): "
                          + "; ".join(problems))  # fmt: skip


async def topic_configs(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, str]]:
    """The configs in effect of each topic (its own and the broker's defaults)."""
    if not names:
        return {}
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in names])
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for _error, _message, _type, name, entries in response.resources:
            configs[name] = {entry[0]: entry[1] for entry in entries}
    return configs


def all_partitions_led(descriptions: list[dict]) -> bool:
    return all(
        topic["error_code"] == 0 and topic["partitions"] and all(p["leader"] >= 0 for p in topic["partitions"])
        for topic in descriptions
    )


def make_producer(settings: Settings, **overrides: object) -> AIOKafkaProducer:
    options: dict[str, object] = {
        **client_options(settings.kafka),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_request_size": MAX_MESSAGE_BYTES,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(settings: Settings, *topics: str, group_id: str | None, **overrides: object) -> AIOKafkaConsumer:
    options: dict[str, object] = {
        **client_options(settings.kafka),
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
    """A dead letter *by reference*: where the record is and why it was refused, never its bytes.

    Frames are residents' images, and a copy of a record could exceed the size limit that made it a
    dead letter; the record itself stays readable at its position for the topic's retention.
    """
    key = record.key if record.key is not None and len(record.key) <= MAX_DEAD_LETTER_KEY_BYTES else None
    return DeadLetter(
        service=service,
        reason=reason[:MAX_REASON_CHARS],
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        key=key,
        size=len(record.value or b""),
    )


def log_dead_letter(letter: DeadLetter) -> None:
    log.warning(
        "dead letter from %s partition %s offset %s (%d bytes): %s",
        letter.source_topic,
        letter.source_partition,
        letter.source_offset,
        letter.size,
        letter.reason,
    )


async def send_dead_letter(
    producer: AIOKafkaProducer, settings: Settings, service: str, record: ConsumerRecord, reason: str
) -> asyncio.Future:
    letter = dead_letter_for(service, record, reason)
    log_dead_letter(letter)
    return await producer.send(settings.kafka.topics.dead_letters, key=letter.key, value=encode(letter))


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


async def assigned_lag(consumer: AIOKafkaConsumer) -> int:
    """Records behind the end of this consumer's partitions, from what the last fetches reported."""
    lag = 0
    for partition in consumer.assignment():
        highwater = consumer.highwater(partition)
        if highwater is not None:
            lag += max(0, highwater - await consumer.position(partition))
    return lag


class GroupLag:
    """Records of a topic a consumer group has not committed yet, read with clients kept open.

    The lag from the broker's view, as Kafka's own tools report it: what a group (faust's
    alerting app, any worker) still has to answer, whichever member holds the partitions.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clients: tuple[AIOKafkaAdminClient, AIOKafkaConsumer] | None = None

    async def stop(self) -> None:
        if self.clients is not None:
            admin, consumer = self.clients
            self.clients = None
            await consumer.stop()
            await admin.close()

    async def lag(self, group_id: str, topic: str) -> int:
        """All of the topic's records if the group never committed; the clients start on the first call."""
        if self.clients is None:
            # made here, inside the event loop (aiokafka's clients must be)
            admin = make_admin(self.settings)
            consumer = make_consumer(self.settings, group_id=None)
            await admin.start()
            await consumer.start()
            self.clients = admin, consumer
        admin, consumer = self.clients
        partitions = await topic_partitions(admin, topic)
        end_offsets = await consumer.end_offsets(partitions)

        async def offsets() -> dict[TopicPartition, OffsetAndMetadata]:
            return await admin.list_consumer_group_offsets(group_id, partitions=partitions)

        committed = await retry_until_up(
            offsets,
            f"the coordinator of consumer group {group_id}",
            self.settings.kafka.connect_timeout_s,
            COORDINATOR_ERRORS,
        )
        return sum(
            end_offsets[tp] - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
            for tp in partitions
        )


async def consumer_group_lag(settings: Settings, group_id: str, topic: str) -> int:
    """Records of `topic` the group has not committed yet (all of them if it never committed)."""
    reader = GroupLag(settings)
    try:
        return await reader.lag(group_id, topic)
    finally:
        await reader.stop()


async def topic_partitions(admin: AIOKafkaAdminClient, topic: str) -> list[TopicPartition]:
    """The topic's partitions, from fresh cluster metadata; none when the topic does not exist."""
    # every topic's metadata: asking for this one by name could make a broker create it (auto.create.topics)
    for description in await admin.describe_topics():
        if description["topic"] == topic and description["error_code"] == 0:
            return sorted(TopicPartition(topic, partition["partition"]) for partition in description["partitions"])
    return []


async def read_topic_partitions(settings: Settings, topic: str) -> list[TopicPartition]:
    """`topic_partitions` with an admin client of its own, for a caller that holds none."""
    admin = make_admin(settings)
    await admin.start()
    try:
        return await topic_partitions(admin, topic)
    finally:
        await admin.close()
