"""Dynamic batching on a Kafka consumer, and keeping the group membership while a batch runs.

A batch closes when it holds `max_records` requests or `max_wait_s` after its first
request arrived, whichever comes first: under load batches fill at once, and a lone
request waits at most `max_wait_s` for company.

While the worker waits for the model to be free, every assigned partition is paused and
the consumer is polled every `keepalive_s`: a paused poll returns nothing but
tells the group coordinator this member is alive, so a forward slower than
`max_poll_interval_ms` on a slow GPU does not get the worker evicted, its partitions
handed to another worker and the same batch answered again (a rebalance spiral).
Slow is not stuck, though: once a batch has been in the model past `poll_until`
(`cloud.stuck_batch_s`: a hung GPU), the polls stop, and the member leaves the group
`max_poll_interval_ms` later, so that another worker answers its partitions instead of nobody.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arrival:
    record: ConsumerRecord
    at: float  # time.monotonic() when the record reached the worker


@dataclass(frozen=True)
class Batch:
    arrivals: list[Arrival]
    closed_at: float  # time.monotonic() when the batch stopped taking requests

    def next_offsets(self) -> dict[TopicPartition, int]:
        """The offsets to commit once this batch is answered: one past its last record per partition."""
        offsets: dict[TopicPartition, int] = {}
        for arrival in self.arrivals:
            partition = TopicPartition(arrival.record.topic, arrival.record.partition)
            offsets[partition] = max(offsets.get(partition, 0), arrival.record.offset + 1)
        return offsets

    @property
    def open_s(self) -> float:
        """How long the batch waited for requests after its first one arrived."""
        return self.closed_at - self.arrivals[0].at


async def collect_batch(
    consumer: AIOKafkaConsumer, max_records: int, max_wait_s: float, idle_wait_s: float
) -> Batch | None:
    """Up to `max_records` records, closed `max_wait_s` after the first; None if none came in `idle_wait_s`."""
    arrivals = await _poll(consumer, max_records, idle_wait_s)
    if not arrivals:
        return None
    closes_at = arrivals[0].at + max_wait_s
    while len(arrivals) < max_records:
        remaining_s = closes_at - time.monotonic()
        if remaining_s <= 0:
            break
        arrivals += await _poll(consumer, max_records - len(arrivals), remaining_s)
    return Batch(arrivals, time.monotonic())


async def _poll(consumer: AIOKafkaConsumer, max_records: int, timeout_s: float) -> list[Arrival]:
    by_partition = await consumer.getmany(timeout_ms=max(0, round(timeout_s * 1000)), max_records=max_records)
    now = time.monotonic()
    return [Arrival(record, now) for records in by_partition.values() for record in records]


async def while_paused(consumer: AIOKafkaConsumer, work: asyncio.Task[T], keepalive_s: float, poll_until: float) -> T:
    """Wait for `work` with the consumer's partitions paused, polling every `keepalive_s` to stay in
    the group until `poll_until` (time.monotonic()); after that, without polling (see the module doc)."""
    try:
        while not work.done():
            consumer.pause(*consumer.assignment())
            remaining_s = poll_until - time.monotonic()
            if remaining_s <= 0:
                log.error(
                    "a batch has been in the model longer than cloud.stuck_batch_s (a hung GPU?); polling stops, "
                    "so the group hands this worker's partitions to another; it rejoins once the batch ends"
                )
                await asyncio.wait({work})
                break
            await asyncio.wait({work}, timeout=min(keepalive_s, remaining_s))
            if work.done():
                break
            # Partitions assigned by a rebalance since the last pause are not paused yet; any
            # record this poll returns goes back, so it is consumed (and committed) only after
            # it has been answered.
            stray = await consumer.getmany(timeout_ms=0)
            for partition, records in stray.items():
                consumer.seek(partition, records[0].offset)
        return work.result()
    finally:
        consumer.resume(*consumer.assignment())
