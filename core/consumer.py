"""The batched at-least-once consumer both workers read their topic with.

A batch closes when it holds `max_records` records or `max_wait_s` after its first record came,
whichever is first: under load batches fill at once, and a lone record waits at most `max_wait_s`
for company. Each `getmany` takes everything the client has buffered (`taken` keeps what one batch
does not use): aiokafka sends its next fetch to a broker only once every partition it buffers from
that broker is drained, so this keeps that fetch in flight while the batch is answered.

A batch is answered by its worker, handed back with the ack futures of its outputs (`answered`),
and committed once it and every batch answered before it are acked (offset of its last record + 1
per partition); one commit is in flight at a time, like the Java client's `commitAsync`, so the
worker does not idle for a round trip per batch. Only partitions still held are committed.

A rebalance (`RevokeListener`): before the partitions go, the answered batches are committed
(their acks come in milliseconds), and the records taken but not in a batch are dropped: the
partitions' next owner reads them again from the committed offsets. A batch fetched before the
rebalance is still answered; its commit then leaves out the partitions this member no longer holds,
and those it lost and got back since it was fetched: their other owner may have committed past it.

Slow is not stuck (`while_paused`): while a worker waits for its model, its partitions are paused
and the consumer polled every `keepalive_s`, so a batch slower than `max_poll_interval_ms` does not
get the member evicted and its batch answered again elsewhere; past `poll_until` (a hung GPU) the
polls stop, and the group hands the partitions to another member a poll interval later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition

from core.kafka_io import assigned_lag, commit_held_offsets, make_consumer, start_client
from core.settings import Settings

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arrival:
    record: ConsumerRecord
    at: float  # time.monotonic() when the record was taken into its batch (the worker's queue starts there)
    revocation: int  # the consumer's revocations before the record was fetched


@dataclass(frozen=True)
class Batch:
    arrivals: list[Arrival]
    opened_at: float  # time.monotonic() when its first record was taken
    closed_at: float  # time.monotonic() when it stopped taking records

    @property
    def records(self) -> list[ConsumerRecord]:
        return [arrival.record for arrival in self.arrivals]

    @property
    def open_s(self) -> float:
        """How long the batch waited for records after its first one."""
        return self.closed_at - self.opened_at

    def next_offsets(self) -> dict[TopicPartition, int]:
        """The offsets to commit once this batch is answered: one past its last record per partition."""
        offsets: dict[TopicPartition, int] = {}
        for arrival in self.arrivals:
            partition = TopicPartition(arrival.record.topic, arrival.record.partition)
            offsets[partition] = max(offsets.get(partition, 0), arrival.record.offset + 1)
        return offsets


@dataclass(frozen=True)
class AnsweredBatch:
    batch: Batch
    acks: list[asyncio.Future]


OnRecords = Callable[[list[ConsumerRecord]], Awaitable[None]]


class BatchConsumer:
    """One consumer group member on `topic`: batches in, offsets committed once their outputs are acked."""

    def __init__(self, settings: Settings, topic: str, group_id: str, **overrides: object) -> None:
        self.settings = settings
        self.consumer = make_consumer(settings, group_id=group_id, **overrides)
        self.consumer.subscribe([topic], listener=RevokeListener(self))
        self.revocations = 0  # rebalances that took this member's partitions
        # per held partition, the revocation count when it came to this member; one it kept through a
        # rebalance keeps its count
        self.held_since: dict[TopicPartition, int] = {}
        # taken from the client, not in a batch yet, with the revocations before their fetch
        self.taken: deque[tuple[ConsumerRecord, int]] = deque()
        self.answered_batches: deque[AnsweredBatch] = deque()  # oldest first, not committed yet
        self.acked_offsets: dict[TopicPartition, int] = {}  # acked, not yet sent in a commit
        self.committing: asyncio.Task[None] | None = None
        # told the member's whole assignment after each rebalance (state kept per partition's keys)
        self.on_assigned: Callable[[set[TopicPartition]], None] | None = None

    async def start(self) -> None:
        """Start the client, retried while Kafka is unreachable (`kafka.connect_timeout_s` at most)."""
        await start_client(self.settings.kafka, self.consumer)

    async def stop(self) -> None:
        await self.consumer.stop()

    async def collect(
        self, max_records: int, max_wait_s: float, idle_wait_s: float, on_records: OnRecords | None = None
    ) -> Batch | None:
        """Up to `max_records` records, closed `max_wait_s` after the first; None if none came in `idle_wait_s`.

        `on_records` sees each share of the batch as it is taken, so work on it (decoding) overlaps the wait.
        """
        arrivals = await self.take(max_records, idle_wait_s)
        if not arrivals:
            return None
        opened_at = arrivals[0].at
        closes_at = opened_at + max_wait_s
        if on_records is not None:
            await on_records([arrival.record for arrival in arrivals])
        while len(arrivals) < max_records:
            remaining_s = closes_at - time.monotonic()
            if remaining_s <= 0:
                break
            more = await self.take(max_records - len(arrivals), remaining_s)
            if more and on_records is not None:
                await on_records([arrival.record for arrival in more])
            arrivals += more
        return Batch(arrivals, opened_at, time.monotonic())

    async def take(self, limit: int, wait_s: float) -> list[Arrival]:
        """Up to `limit` records, oldest first: those already taken from the client, else a new fetch's worth."""
        if not self.taken:
            fetched = await self.consumer.getmany(timeout_ms=max(0, round(wait_s * 1000)))
            # the client drops what it fetched for an assignment a rebalance replaced: these are the current one's
            self.taken.extend((record, self.revocations) for records in fetched.values() for record in records)
        now = time.monotonic()
        taken = [self.taken.popleft() for _ in range(min(limit, len(self.taken)))]
        return [Arrival(record, now, revocation) for record, revocation in taken]

    def answered(self, batch: Batch, acks: list[asyncio.Future]) -> None:
        """Hand back an answered batch with the ack futures of its outputs; it is committed once they are acked."""
        self.answered_batches.append(AnsweredBatch(batch, acks))

    def in_flight(self) -> int:
        """Answered batches not committed yet."""
        return len(self.answered_batches)

    async def commit_acked(self, wait: bool = False) -> None:
        """Start committing the acked batches at the head of the queue (waiting for the oldest one's acks
        when `wait`); if the previous commit is still in flight, they go with the next one."""
        if wait and self.answered_batches:
            await asyncio.gather(*self.answered_batches[0].acks)
        while self.answered_batches and all(ack.done() for ack in self.answered_batches[0].acks):
            for ack in self.answered_batches[0].acks:
                # A failed send raises here, and its batch stays at the head: nothing is committed past it,
                # however often this is called again (by the worker, or the revoke listener before it).
                ack.result()
            self.acked_offsets.update(self.committable_offsets(self.answered_batches.popleft().batch))
        if self.committing is not None:
            if not self.committing.done():
                return
            self.committing.result()
        if self.acked_offsets:
            self.committing = asyncio.create_task(commit_held_offsets(self.consumer, self.acked_offsets))
            self.acked_offsets = {}

    def committable_offsets(self, batch: Batch) -> dict[TopicPartition, int]:
        """The batch's offsets, less those of partitions this member lost and got back since their records
        were fetched: another owner answered them meanwhile and may have committed past this batch."""
        offsets = batch.next_offsets()
        stale = {
            TopicPartition(arrival.record.topic, arrival.record.partition)
            for arrival in batch.arrivals
            if self.held_since.get(TopicPartition(arrival.record.topic, arrival.record.partition), 0)
            > arrival.revocation
        }
        if stale:
            log.info(
                "offsets of %d partition(s) another member held since their batch was fetched are not committed",
                len(stale),
            )
        return {partition: offset for partition, offset in offsets.items() if partition not in stale}

    async def drain(self) -> None:
        """Wait until every answered batch is acked and its offsets are committed."""
        while (
            self.answered_batches or self.acked_offsets or (self.committing is not None and not self.committing.done())
        ):
            if self.committing is not None:
                await asyncio.wait([self.committing])
            await self.commit_acked(wait=True)
        if self.committing is not None:
            self.committing.result()

    def on_revoke(self, revoked: list[TopicPartition]) -> None:
        """The partitions are going (the answered batches are committed): what is taken is the next owner's."""
        self.revocations += 1
        log.info("%d partition(s) revoked; %d record(s) taken ahead are dropped", len(revoked), len(self.taken))
        self.taken.clear()

    def on_assign(self, assigned: set[TopicPartition]) -> None:
        """The new assignment (the client reports each one, even empty): a partition held before this
        rebalance and assigned back was never another member's, so it keeps its count."""
        self.held_since = {partition: self.held_since.get(partition, self.revocations) for partition in assigned}
        if self.on_assigned is not None:
            self.on_assigned(assigned)

    async def lag(self) -> int:
        """Records behind the end of the held partitions, counting those taken but not in a batch yet."""
        return await assigned_lag(self.consumer) + len(self.taken)

    async def while_paused(self, work: asyncio.Task[T], keepalive_s: float, poll_until: float) -> T:
        """Wait for `work` with the partitions paused, polling every `keepalive_s` to stay in the group
        until `poll_until` (time.monotonic()); after that, without polling (see the module doc)."""
        consumer = self.consumer
        try:
            while not work.done():
                consumer.pause(*consumer.assignment())
                remaining_s = poll_until - time.monotonic()
                if remaining_s <= 0:
                    log.error(
                        "a batch has been in the model past its stuck limit (a hung GPU?); polling stops, so the "
                        "group hands this worker's partitions to another; it rejoins once the batch ends"
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


class RevokeListener(ConsumerRebalanceListener):
    def __init__(self, batches: BatchConsumer) -> None:
        self.batches = batches

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if not revoked:  # the first join of the group: nothing held yet
            return
        try:
            # Before the partitions go, commit what was answered on them.
            await self.batches.drain()
        finally:
            self.batches.on_revoke(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        """The group's committed offsets say where to start; the owner learns what it holds now."""
        self.batches.on_assign(set(assigned))
