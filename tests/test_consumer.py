"""The batched at-least-once consumer (`core.consumer`) on the real broker.

Records are written to the test's `frames` topic; "answering" a batch is sending one record per
input to the test's `verdicts` topic (real acks), so every count runs end to end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition

from core.consumer import Arrival, Batch, BatchConsumer
from core.kafka_io import consumer_group_lag, make_admin, make_consumer, make_producer
from core.settings import Settings
from tests.conftest import settings_for, until, until_caught_up, until_group_stable_with

Position = tuple[int, int]  # partition, offset of an input record


def group() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


async def publish(settings: Settings, count: int, partition: int | None = None) -> set[Position]:
    """`count` records on `frames`, spread over every partition unless one is given; their positions."""
    producer = make_producer(settings)
    await producer.start()
    try:
        sent = [
            await producer.send(
                settings.kafka.topics.frames,
                key=None if partition is not None else f"key-{index}".encode(),
                value=f"record {index}".encode(),
                partition=partition,
            )
            for index in range(count)
        ]
        return {(metadata.partition, metadata.offset) for metadata in await asyncio.gather(*sent)}
    finally:
        await producer.stop()


async def answer(producer: AIOKafkaProducer, settings: Settings, batch: Batch) -> list[asyncio.Future]:
    """One output per record, naming the record it answers."""
    return [
        await producer.send(settings.kafka.topics.verdicts, value=f"{record.partition}:{record.offset}".encode())
        for record in batch.records
    ]


async def answered_positions(settings: Settings) -> Counter[Position]:
    """Every output on `verdicts` up to its end now, as the positions of the records they answer."""
    consumer = make_consumer(settings, settings.kafka.topics.verdicts, group_id=None)
    await consumer.start()
    try:
        topic = settings.kafka.topics.verdicts
        partitions = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        end = await consumer.end_offsets(partitions)
        outputs: list[ConsumerRecord] = []
        while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
            outputs += [r for records in (await consumer.getmany(timeout_ms=1000)).values() for r in records]
        return Counter(tuple(map(int, record.value.decode().split(":"))) for record in outputs)  # type: ignore[misc]
    finally:
        await consumer.stop()


async def committed_offsets(settings: Settings, group_id: str) -> dict[TopicPartition, int]:
    admin = make_admin(settings)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id)
        return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
    finally:
        await admin.close()


@pytest.fixture
def settings(stack_state, tmp_path) -> Iterator[Settings]:
    yield settings_for(stack_state, tmp_path)


def test_only_the_acked_head_of_the_answered_batches_is_committed(settings: Settings) -> None:
    """Three batches answered; the middle one's outputs not acked yet: only the first commits, then all."""
    group_id = group()

    async def scenario() -> tuple[int, int, int]:
        await publish(settings, 12, partition=0)
        batches = BatchConsumer(settings, settings.kafka.topics.frames, group_id)
        await batches.start()
        try:
            collected = [await batches.collect(4, max_wait_s=10, idle_wait_s=30) for _ in range(3)]
            first, middle, last = [batch for batch in collected if batch is not None]
            assert [len(b.arrivals) for b in (first, middle, last)] == [4, 4, 4], "batches fill to max_records"
            acked: asyncio.Future = asyncio.get_running_loop().create_future()
            acked.set_result(None)
            pending: asyncio.Future = asyncio.get_running_loop().create_future()
            batches.answered(first, [acked])
            batches.answered(middle, [pending])
            batches.answered(last, [acked])
            await batches.commit_acked()
            partition = TopicPartition(settings.kafka.topics.frames, 0)

            await until(lambda: batches.consumer.committed(partition), "the first commit")
            after_first = await batches.consumer.committed(partition)
            waiting = batches.in_flight()
            pending.set_result(None)
            await batches.drain()
            return after_first, waiting, await batches.consumer.committed(partition)
        finally:
            await batches.stop()

    after_first, waiting, after_all = asyncio.run(scenario())
    assert after_first == 4, "the acked head only: not past the batch still waiting for its acks"
    assert waiting == 2
    assert after_all == 12


def test_a_failed_output_is_never_committed_past(settings: Settings) -> None:
    group_id = group()

    async def scenario() -> tuple[str, dict[TopicPartition, int]]:
        await publish(settings, 8, partition=0)
        batches = BatchConsumer(settings, settings.kafka.topics.frames, group_id)
        await batches.start()
        try:
            first = await batches.collect(4, max_wait_s=10, idle_wait_s=30)
            second = await batches.collect(4, max_wait_s=10, idle_wait_s=30)
            assert first is not None and second is not None
            failed: asyncio.Future = asyncio.get_running_loop().create_future()
            failed.set_exception(RuntimeError("broker refused the output"))
            acked: asyncio.Future = asyncio.get_running_loop().create_future()
            acked.set_result(None)
            batches.answered(first, [failed])
            batches.answered(second, [acked])
            with pytest.raises(RuntimeError) as error:
                await batches.drain()
            for _ in range(2):  # again and again: the failed batch still blocks the one behind it
                with pytest.raises(RuntimeError):
                    await batches.commit_acked()
        finally:
            await batches.stop()
        return str(error.value), await committed_offsets(settings, group_id)

    message, committed = asyncio.run(scenario())
    assert message == "broker refused the output"
    assert committed == {}, "nothing committed: the acked second batch comes after the failed one"


def test_offsets_of_partitions_revoked_mid_batch_are_skipped_not_fatal(settings: Settings) -> None:
    """A batch answered while a rebalance took one of its partitions: the rest still commits, the worker lives."""

    async def scenario() -> int | None:
        await publish(settings, 4, partition=0)
        batches = BatchConsumer(settings, settings.kafka.topics.frames, group())
        await batches.start()
        try:
            batch = await batches.collect(4, max_wait_s=10, idle_wait_s=30)
            assert batch is not None
            kept = TopicPartition(settings.kafka.topics.frames, 0)
            assert kept in batches.consumer.assignment()
            stray = dataclasses.replace(batch.arrivals[0].record, topic=settings.kafka.topics.verdicts)  # not held
            held_and_not = Batch([*batch.arrivals, Arrival(stray, 0.0, 0)], 0.0, 0.0)
            acked: asyncio.Future = asyncio.get_running_loop().create_future()
            acked.set_result(None)
            batches.answered(held_and_not, [acked])
            await batches.drain()
            return await batches.consumer.committed(kept)
        finally:
            await batches.stop()

    assert asyncio.run(scenario()) == 4  # the partition still held is committed; no error for the other


async def answer_until_stopped(
    batches: BatchConsumer, settings: Settings, stop: asyncio.Event, answered: list[Batch]
) -> None:
    """A minimal worker: collect, answer, hand back, commit; drain when stopped."""
    producer = make_producer(settings)
    await producer.start()
    try:
        while not stop.is_set():
            batch = await batches.collect(8, max_wait_s=0.05, idle_wait_s=0.2)
            if batch is not None:
                batches.answered(batch, await answer(producer, settings, batch))
                answered.append(batch)
            await batches.commit_acked()
        await batches.drain()
    finally:
        await producer.stop()


def test_every_record_is_answered_and_committed_end_to_end(settings: Settings) -> None:
    group_id = group()

    async def scenario() -> tuple[set[Position], Counter[Position], int]:
        published = await publish(settings, 200)
        batches = BatchConsumer(settings, settings.kafka.topics.frames, group_id)
        await batches.start()
        stop = asyncio.Event()
        answered: list[Batch] = []
        worker = asyncio.create_task(answer_until_stopped(batches, settings, stop, answered))
        try:
            await until(lambda: sum(len(b.arrivals) for b in answered) >= len(published), "every record in a batch")
        finally:
            stop.set()
            await worker
            await batches.stop()
        lag = await consumer_group_lag(settings, group_id, settings.kafka.topics.frames)
        return published, await answered_positions(settings), lag

    published, outputs, lag = asyncio.run(scenario())
    assert len(published) == 200
    assert set(outputs) == published and set(outputs.values()) == {1}, "each record answered exactly once"
    assert lag == 0, "every answered record committed"


@asynccontextmanager
async def a_batch_held_when_a_second_member_joins(
    settings: Settings, group_id: str, count: int
) -> AsyncIterator[tuple[BatchConsumer, BatchConsumer, AIOKafkaProducer, set[Position], Batch]]:
    """`count` records published (their positions) and held in one batch of the first member when a second
    joins; the second's join, done by the clients in the background, shares the partitions between the two."""
    topic = settings.kafka.topics.frames
    published = await publish(settings, count)
    first, second = BatchConsumer(settings, topic, group_id), BatchConsumer(settings, topic, group_id)
    producer = make_producer(settings)
    await first.start()
    await producer.start()
    try:
        held = await first.collect(count, max_wait_s=10, idle_wait_s=30)
        assert held is not None
        await second.start()
        await until_group_stable_with(settings, group_id, 2)
        await until(lambda: first.revocations >= 1 and first.consumer.assignment(), "the first's new assignment")
        await until(lambda: second.consumer.assignment(), "the second's assignment")
        yield first, second, producer, published, held
    finally:
        await producer.stop()
        await first.stop()
        await second.stop()


def test_a_rebalance_mid_batch_loses_nothing_and_the_old_owner_commits_no_revoked_partition(
    settings: Settings,
) -> None:
    """The first member holds a batch fetched from every partition when a second member joins; the batch is
    answered after the rebalance and committed for the partitions the first still holds only; both members
    then answer everything, and the group commits it all."""
    group_id = group()

    async def scenario() -> tuple[set[Position], Counter[Position], Batch, dict[str, set[int]], dict, dict]:
        joined = a_batch_held_when_a_second_member_joins(settings, group_id, 80)
        async with joined as (first, second, producer, published, held):
            holds = {
                name: {tp.partition for tp in member.consumer.assignment()}
                for name, member in (("first", first), ("second", second))
            }
            first.answered(held, await answer(producer, settings, held))
            await first.drain()
            committed_by_old_owner = await committed_offsets(settings, group_id)
            stop = asyncio.Event()
            done: dict[str, list[Batch]] = {"first": [], "second": []}
            workers = [
                asyncio.create_task(answer_until_stopped(member, settings, stop, done[name]))
                for name, member in (("first", first), ("second", second))
            ]
            try:
                await until_caught_up(settings, group_id, settings.kafka.topics.frames)
            finally:
                stop.set()
                await asyncio.gather(*workers)
        return published, await answered_positions(settings), held, holds, committed_by_old_owner, done

    published, outputs, held, holds, committed_by_old_owner, done = asyncio.run(scenario())
    assert {arrival.record.partition for arrival in held.arrivals} == set(range(settings.kafka.partitions))
    assert holds["first"] and holds["second"] and not holds["first"] & holds["second"], "the partitions were shared"
    expected = {tp: offset for tp, offset in held.next_offsets().items() if tp.partition in holds["first"]}
    assert committed_by_old_owner == expected, "the old owner committed the partitions it kept, no revoked one"
    assert set(outputs) == published, "nothing lost"
    assert all(outputs[p] == 2 for p in published if p[0] in holds["second"]), "moved: answered again, once"
    assert all(outputs[p] in (1, 2) for p in published if p[0] in holds["first"])
    assert done["second"], "the new owner answered its partitions"


def test_a_batch_answered_after_its_partitions_went_and_came_back_does_not_move_their_commit_back(
    settings: Settings,
) -> None:
    """The first member holds a batch when a second joins, takes some partitions, answers past the batch
    and leaves; the first answers its old batch holding every partition again: the partitions the second
    committed keep the second's offsets, the ones the first kept get the batch's."""
    group_id = group()

    async def scenario() -> tuple[Batch, set[int], dict[TopicPartition, int], dict[TopicPartition, int]]:
        joined = a_batch_held_when_a_second_member_joins(settings, group_id, 40)
        async with joined as (first, second, producer, _published, held):
            moved = {tp.partition for tp in second.consumer.assignment()}
            await publish(settings, 40)  # the second answers these too: its commits pass the held batch
            stop = asyncio.Event()
            answered: list[Batch] = []
            worker = asyncio.create_task(answer_until_stopped(second, settings, stop, answered))
            try:
                ends = await end_offsets(settings)

                async def second_caught_up() -> bool:
                    committed = await committed_offsets(settings, group_id)
                    return all(committed.get(tp) == ends[tp] for tp in ends if tp.partition in moved)

                await until(second_caught_up, "the second to commit its partitions to their end")
            finally:
                stop.set()
                await worker
            await second.stop()
            by_second = await committed_offsets(settings, group_id)
            await until(lambda: len(first.consumer.assignment()) == len(ends), "every partition back with the first")
            first.answered(held, await answer(producer, settings, held))
            await first.drain()
            return held, moved, by_second, await committed_offsets(settings, group_id)

    held, moved, by_second, committed = asyncio.run(scenario())
    assert moved and len(moved) < settings.kafka.partitions, "the partitions were shared"
    for partition, offset in held.next_offsets().items():
        if partition.partition in moved:
            assert committed[partition] == by_second[partition] > offset, "the second's commit stands"
        else:
            assert committed[partition] == offset, "a partition the first kept commits its batch"


async def end_offsets(settings: Settings) -> dict[TopicPartition, int]:
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        topic = settings.kafka.topics.frames
        return await consumer.end_offsets([TopicPartition(topic, p) for p in range(settings.kafka.partitions)])
    finally:
        await consumer.stop()


@pytest.mark.parametrize("keepalive", [True, False], ids=["paused-polls", "no-polls"])
def test_a_batch_slower_than_the_poll_interval_keeps_the_partitions_only_with_keepalive(
    settings: Settings, keepalive: bool
) -> None:
    """A batch twice as slow as max_poll_interval_ms: paused polls keep the member; without them it is
    evicted (the control: the check can fail)."""
    group_id = group()

    async def scenario() -> tuple[int, dict[TopicPartition, int]]:
        published = await publish(settings, 8)
        batches = BatchConsumer(settings, settings.kafka.topics.frames, group_id, max_poll_interval_ms=1000)
        producer = make_producer(settings)
        await batches.start()
        await producer.start()
        try:
            batch = await batches.collect(8, max_wait_s=10, idle_wait_s=30)
            assert batch is not None and len(batch.arrivals) == len(published)
            slow = asyncio.create_task(asyncio.to_thread(time.sleep, 2.5))  # a model forward
            if keepalive:
                await batches.while_paused(slow, keepalive_s=0.2, poll_until=time.monotonic() + 60)
            else:
                await slow
                await until(lambda: batches.revocations > 0, "the eviction's revocation")
            batches.answered(batch, await answer(producer, settings, batch))
            await batches.drain()
            return batches.revocations, await committed_offsets(settings, group_id)
        finally:
            await producer.stop()
            await batches.stop()

    revocations, committed = asyncio.run(scenario())
    if keepalive:
        assert revocations == 0, "no rebalance: the member kept its partitions"
        assert sum(committed.values()) == 8, "the slow batch committed"
    else:
        assert revocations >= 1, "evicted: its partitions were revoked"
