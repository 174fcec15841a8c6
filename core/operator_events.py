"""Operator events (topic `operator-events`): drift flags, learning mode, model versions.

Each is also a log line: the event carries that line, so an operator's tool reading the topic and
one reading the logs see the same words. Keyed by camera where there is one, else by service.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from core.kafka_io import make_producer, send
from core.settings import Settings
from schemas import OperatorEvent, OperatorEventKind

log = logging.getLogger(__name__)


def operator_event(
    logger: logging.Logger,
    level: int,
    kind: OperatorEventKind,
    service: str,
    message: str,
    camera_id: str | None = None,
    version: str | None = None,
) -> OperatorEvent:
    """Log `message` and return it as the event to send."""
    logger.log(level, "%s", message)
    return OperatorEvent(kind=kind, service=service, message=message, camera_id=camera_id, version=version)


async def send_operator_event(producer: AIOKafkaProducer, settings: Settings, event: OperatorEvent) -> asyncio.Future:
    return await send(producer, settings.kafka.topics.operator_events, event.camera_id or event.service, event)


def publish_operator_events(settings: Settings, events: list[OperatorEvent]) -> None:
    """For a command: send the events and wait for their acks. Kafka down is one warning: the log line stays.

    One attempt to connect, not a service's retries: the command's work is done, and its line is logged."""

    async def publish() -> None:
        producer = make_producer(settings)
        try:
            await producer.start()
            await asyncio.gather(*[await send_operator_event(producer, settings, event) for event in events])
        finally:
            await producer.stop()

    try:
        asyncio.run(publish())
    except (KafkaError, OSError) as exc:
        log.warning(
            "could not send %d operator event(s) to %s: %s", len(events), settings.kafka.topics.operator_events, exc
        )
