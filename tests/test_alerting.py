"""Alerting: the k-of-n rule on its own, then the real worker on the real stack.

The integration tests share one `python -m alerting` subprocess (faust start-up
and the group join cost seconds); each test uses its own camera ids, so the
tests stay independent of each other and of their order.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from alerting.app import alert_key, open_alert_key
from alerting.rules import CameraState, alert_id_for
from fallwatch.kafka_io import make_consumer, make_producer
from fallwatch.settings import AlertingSettings, RedisSettings, Settings
from fallwatch.stack import StackState, free_port
from schemas import DeadLetter, FallEvent, Message, Verdict, decode, encode
from tests.conftest import REPO, settings_for, write_config

M = TypeVar("M", bound=Message)

RULE = AlertingSettings(k=3, n=5, window_s=30.0, cooldown_s=60.0)
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
WAIT_S = 30.0


def make_verdict(
    camera_id: str,
    seq: int,
    fall: bool,
    at_s: float | None = None,
    final: bool = True,
    fall_probability: float | None = None,
) -> Verdict:
    """Frame `seq` of a camera, captured `at_s` seconds after T0 (by default `seq` seconds: one frame a second)."""
    captured_at = T0 + timedelta(seconds=seq if at_s is None else at_s)
    probability = fall_probability if fall_probability is not None else (0.9 if fall else 0.1)
    return Verdict(
        frame_id=f"{camera_id}-{int(captured_at.timestamp() * 1000)}-{seq}",
        camera_id=camera_id,
        room=f"room-of-{camera_id}",
        captured_at=captured_at,
        source="edge",
        final=final,
        fall_probability=probability,
        decision=fall,
        edge_model="tiny-vilt",
    )


def observe_all(state: CameraState, verdicts: list[Verdict]) -> list[FallEvent]:
    return [alert for verdict in verdicts if (alert := state.observe(verdict)) is not None]


def new_state(camera_id: str = "cam") -> CameraState:
    return CameraState(rule=RULE, camera_id=camera_id)


# --- the rule ----------------------------------------------------------------------------------


def test_k_of_n_falls_open_one_alert_with_evidence() -> None:
    verdicts = [
        make_verdict("cam", 0, fall=False),
        make_verdict("cam", 1, fall=True, fall_probability=0.8),
        make_verdict("cam", 2, fall=False),
        make_verdict("cam", 3, fall=True, fall_probability=0.9),
        make_verdict("cam", 4, fall=True, fall_probability=1.0),
    ]
    alerts = observe_all(new_state(), verdicts)

    assert len(alerts) == 1
    alert = alerts[0]
    assert alert.state == "open"
    assert alert.camera_id == "cam"
    assert alert.room == "room-of-cam"
    assert alert.rule == "3 of 5"
    assert alert.evidence_frame_ids == [verdicts[1].frame_id, verdicts[3].frame_id, verdicts[4].frame_id]
    assert alert.first_fall_at == verdicts[1].captured_at
    assert alert.opened_at == verdicts[4].captured_at
    assert alert.confidence == pytest.approx(0.9)
    assert alert.alert_id == alert_id_for("cam", verdicts[1].frame_id)


def test_alert_id_is_the_same_on_replay() -> None:
    verdicts = [make_verdict("cam", seq, fall=True) for seq in range(3)]
    first, replayed = observe_all(new_state(), verdicts), observe_all(new_state(), verdicts)
    assert [a.alert_id for a in first] == [a.alert_id for a in replayed]
    assert first[0].model_dump(exclude={"updated_at"}) == replayed[0].model_dump(exclude={"updated_at"})


def test_fewer_than_k_falls_in_the_last_n_do_not_confirm() -> None:
    # falls at 0 and 1 leave the last five before the third fall arrives
    verdicts = [
        make_verdict("cam", 0, fall=True),
        make_verdict("cam", 1, fall=True),
        *(make_verdict("cam", seq, fall=False) for seq in range(2, 6)),
        make_verdict("cam", 6, fall=True),
    ]
    assert observe_all(new_state(), verdicts) == []


def test_verdicts_outside_the_window_do_not_count() -> None:
    state = new_state()
    alerts = observe_all(state, [
        make_verdict("cam", 0, fall=True, at_s=0),
        make_verdict("cam", 1, fall=True, at_s=10),
        make_verdict("cam", 2, fall=True, at_s=45),  # more than 30 s after the first two
        make_verdict("cam", 3, fall=True, at_s=12),  # a late verdict, older than the window
    ])
    assert alerts == []
    # two more falls inside the window of the one at 45 s confirm
    alerts = observe_all(state, [make_verdict("cam", seq, fall=True, at_s=42 + seq) for seq in (4, 5)])
    assert len(alerts) == 1
    assert alerts[0].first_fall_at == T0 + timedelta(seconds=45)


def test_late_verdicts_inside_the_window_count_by_capture_time() -> None:
    alerts = observe_all(new_state(), [
        make_verdict("cam", 2, fall=True),
        make_verdict("cam", 3, fall=True),
        make_verdict("cam", 1, fall=True),  # the cloud's verdict for an earlier frame arrives last
    ])
    assert len(alerts) == 1
    assert alerts[0].first_fall_at == T0 + timedelta(seconds=1)


def test_non_final_verdicts_are_ignored() -> None:
    provisional = [make_verdict("cam", seq, fall=True, final=False) for seq in range(5)]
    state = new_state()
    assert observe_all(state, provisional) == []
    assert state.window == []


def test_duplicate_verdicts_count_once() -> None:
    falls = [make_verdict("cam", seq, fall=True) for seq in range(3)]
    state = new_state()
    assert observe_all(state, [falls[0], falls[0], falls[0], falls[1], falls[1]]) == []
    alerts = observe_all(state, [falls[2]])
    assert len(alerts) == 1
    assert alerts[0].evidence_frame_ids == [verdict.frame_id for verdict in falls]


def test_a_redelivered_burst_opens_no_second_alert() -> None:
    burst = [make_verdict("cam", seq, fall=True) for seq in range(3)]
    state = new_state()
    (alert,) = observe_all(state, burst)
    state.close_alert(alert.alert_id)
    assert observe_all(state, burst) == []


def test_one_open_alert_per_camera() -> None:
    state = new_state()
    alerts = observe_all(state, [make_verdict("cam", seq, fall=True) for seq in range(10)])
    assert len(alerts) == 1
    assert state.open_alert_id == alerts[0].alert_id
    # other cameras have their own state
    assert len(observe_all(new_state("other"), [make_verdict("other", seq, fall=True) for seq in range(3)])) == 1


def test_cooldown_after_an_alert_closes() -> None:
    state = new_state()
    (first,) = observe_all(state, [make_verdict("cam", seq, fall=True) for seq in range(3)])
    state.close_alert(first.alert_id)
    # the alert opened at 2 s; falls until 61 s are within the 60 s cooldown
    assert observe_all(state, [make_verdict("cam", seq, fall=True) for seq in range(50, 62)]) == []
    (second,) = observe_all(state, [make_verdict("cam", 62, fall=True)])
    assert second.alert_id != first.alert_id
    assert second.evidence_frame_ids[-1] == make_verdict("cam", 62, fall=True).frame_id


def test_state_survives_a_json_round_trip() -> None:
    state = new_state()
    observe_all(state, [make_verdict("cam", 0, fall=True), make_verdict("cam", 1, fall=True)])
    restored = CameraState(rule=RULE, **state.model_dump(mode="json"))
    assert restored == state
    assert observe_all(restored, [make_verdict("cam", 1, fall=True)]) == []  # still remembers frame 1
    assert len(observe_all(restored, [make_verdict("cam", 2, fall=True)])) == 1


# --- the worker on the real stack --------------------------------------------------------------


def alerting_settings(stack_state: StackState, tmp_path: Path) -> Settings:
    # a fresh app id: its consumer group and its table's changelog topic are this test's alone
    rules = {**RULE.model_dump(), "app_id": f"alerting-{uuid.uuid4().hex[:8]}"}
    return settings_for(stack_state, tmp_path, alerting=rules)


@contextmanager
def alerting_worker(settings: Settings, tmp_path: Path) -> Iterator[None]:
    """`python -m alerting` with these settings; on exit SIGTERM it and check that it stopped cleanly."""
    env = write_config(settings, tmp_path / "cfg.yaml")
    log_path = tmp_path / f"alerting-{uuid.uuid4().hex[:4]}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "alerting"], cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    started_at = time.monotonic()
    try:
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        stopping_at = time.monotonic()
        try:
            returncode = process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        stop_s = time.monotonic() - stopping_at
        print(f"alerting ran {stopping_at - started_at:.1f} s, stopped {stop_s:.1f} s after SIGTERM")
        assert returncode == 0, log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def shared_settings(stack_state: StackState, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of one worker that the tests below share, each with its own cameras."""
    tmp_path = tmp_path_factory.mktemp("alerting")
    settings = alerting_settings(stack_state, tmp_path)
    with alerting_worker(settings, tmp_path):
        yield settings


async def produce(settings: Settings, records: list[tuple[str, bytes]]) -> None:
    """Send (key, value) records to the verdicts topic and wait until the broker acked them all."""
    producer = make_producer(settings)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(settings.kafka.topics.verdicts, key=key.encode(), value=value)
    finally:
        await producer.stop()


def as_records(verdicts: list[Verdict]) -> list[tuple[str, bytes]]:
    return [(verdict.camera_id, encode(verdict)) for verdict in verdicts]


async def read_until(
    settings: Settings, topic: str, model: type[M], done: Callable[[list[M]], bool], timeout_s: float = WAIT_S
) -> list[M]:
    """Read `topic` from the start until `done(messages so far)` holds; fails the test at the deadline."""
    consumer = make_consumer(settings, topic, group_id=None)
    await consumer.start()
    messages: list[M] = []
    try:
        deadline = time.monotonic() + timeout_s
        while not done(messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"timed out after {timeout_s:.0f} s reading {topic}; got {messages}")
            batches = await consumer.getmany(timeout_ms=int(min(remaining, 1.0) * 1000))
            messages += [decode(model, record.value) for records in batches.values() for record in records]
        return messages
    finally:
        await consumer.stop()


async def read_all(settings: Settings, topic: str, model: type[M]) -> list[M]:
    """Everything on `topic` up to its end offsets now."""
    consumer = make_consumer(settings, topic, group_id=None)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        end = await consumer.end_offsets(partitions)
        messages: list[M] = []
        while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
            batches = await consumer.getmany(timeout_ms=1000)
            messages += [decode(model, record.value) for records in batches.values() for record in records]
        return messages
    finally:
        await consumer.stop()


async def wait_until_consumed(settings: Settings, timeout_s: float = WAIT_S) -> None:
    """Wait until the app's group committed every verdict sent so far.

    faust flushes what the agent sent for a record before it commits the
    record's offset, so afterwards every alert those verdicts caused is on
    `fall-events`: a missing alert is really missing, not late.
    """
    topic = settings.kafka.topics.verdicts
    consumer = make_consumer(settings, topic, group_id=None)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await consumer.start()
    await admin.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        end = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout_s
        while True:
            committed = await admin.list_consumer_group_offsets(settings.alerting.app_id, partitions=partitions)
            behind = {tp: end[tp] - committed[tp].offset for tp in partitions if end[tp] > 0}
            behind = {tp: lag for tp, lag in behind.items() if committed[tp].offset < 0 or lag > 0}
            if not behind:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"alerting did not commit the verdicts within {timeout_s:.0f} s: {behind}")
            await asyncio.sleep(0.2)  # polling interval of the committed offsets, not a synchronisation
    finally:
        await admin.close()
        await consumer.stop()


def alerts_for(events: list[FallEvent], camera_id: str) -> list[FallEvent]:
    return [event for event in events if event.camera_id == camera_id]


def unique_camera(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def test_falls_open_one_alert_and_other_cameras_none(shared_settings: Settings) -> None:
    settings = shared_settings
    falling, calm, provisional = unique_camera("falling"), unique_camera("calm"), unique_camera("provisional")
    fall_verdicts = [make_verdict(falling, seq, fall=seq >= 1) for seq in range(5)]
    asyncio.run(produce(settings, as_records([
        *fall_verdicts,
        *(make_verdict(calm, seq, fall=False) for seq in range(6)),
        *(make_verdict(provisional, seq, fall=True, final=False) for seq in range(6)),
    ])))

    topic = settings.kafka.topics.fall_events
    events = asyncio.run(read_until(settings, topic, FallEvent, lambda got: bool(alerts_for(got, falling))))
    asyncio.run(wait_until_consumed(settings))
    events = asyncio.run(read_all(settings, topic, FallEvent))

    (alert,) = alerts_for(events, falling)
    assert alert.state == "open"
    assert alert.room == f"room-of-{falling}"
    assert alert.evidence_frame_ids == [v.frame_id for v in fall_verdicts[1:4]]
    assert alerts_for(events, calm) == []
    assert alerts_for(events, provisional) == []

    store = redis.Redis.from_url(settings.redis.url)
    try:
        assert decode(FallEvent, store.get(alert_key(alert.alert_id))) == alert
        assert store.get(open_alert_key(falling)) == alert.alert_id.encode()
        assert store.get(open_alert_key(calm)) is None
    finally:
        store.close()


def test_redelivered_verdicts_open_one_alert(shared_settings: Settings) -> None:
    settings = shared_settings
    camera = unique_camera("twice")
    burst = as_records([make_verdict(camera, seq, fall=True) for seq in range(4)])
    asyncio.run(produce(settings, burst + burst))

    topic = settings.kafka.topics.fall_events
    asyncio.run(read_until(settings, topic, FallEvent, lambda got: bool(alerts_for(got, camera))))
    asyncio.run(wait_until_consumed(settings))
    assert len(alerts_for(asyncio.run(read_all(settings, topic, FallEvent)), camera)) == 1


def test_malformed_record_goes_to_dead_letters_and_the_stream_goes_on(shared_settings: Settings) -> None:
    settings = shared_settings
    camera = unique_camera("after-garbage")
    asyncio.run(produce(settings, [
        (camera, b"not json"),
        *as_records([make_verdict(camera, seq, fall=True) for seq in range(3)]),
    ]))

    dead_letters = asyncio.run(read_until(
        settings, settings.kafka.topics.dead_letters, DeadLetter,
        lambda got: any(d.key == camera.encode() for d in got),
    ))
    (dead,) = [d for d in dead_letters if d.key == camera.encode()]
    assert dead.service == "alerting"
    assert dead.source_topic == settings.kafka.topics.verdicts
    assert dead.raw == b"not json"
    assert "invalid Verdict" in dead.reason

    asyncio.run(read_until(
        settings, settings.kafka.topics.fall_events, FallEvent, lambda got: bool(alerts_for(got, camera))
    ))



def test_camera_state_survives_a_restart(stack_state: StackState, tmp_path: Path) -> None:
    settings = alerting_settings(stack_state, tmp_path)
    camera = unique_camera("restart")
    burst = as_records([make_verdict(camera, seq, fall=True) for seq in range(3)])
    topic = settings.kafka.topics.fall_events
    with alerting_worker(settings, tmp_path):
        asyncio.run(produce(settings, burst))
        asyncio.run(read_until(settings, topic, FallEvent, lambda got: bool(alerts_for(got, camera))))

    # the new worker recovers the camera's open alert and seen frames from the table's changelog
    with alerting_worker(settings, tmp_path):
        asyncio.run(produce(settings, burst + as_records([make_verdict(camera, 3, fall=True)])))
        asyncio.run(wait_until_consumed(settings))
    assert len(alerts_for(asyncio.run(read_all(settings, topic, FallEvent)), camera)) == 1


def test_alerts_reach_fall_events_while_redis_is_down(stack_state: StackState, tmp_path: Path) -> None:
    settings = alerting_settings(stack_state, tmp_path)
    settings = settings.model_copy(update={"redis": RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0")})
    camera = unique_camera("no-redis")
    with alerting_worker(settings, tmp_path):
        asyncio.run(produce(settings, as_records([make_verdict(camera, seq, fall=True) for seq in range(3)])))
        asyncio.run(read_until(
            settings, settings.kafka.topics.fall_events, FallEvent, lambda got: bool(alerts_for(got, camera))
        ))
