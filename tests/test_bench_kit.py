"""The benchmark kit (fallwatch.benchmarks.kit): inputs, timers, the verdict reader and tables."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import psutil
import pytest
from rich.console import Console

from core.images import decode_known_jpeg_rgb
from core.kafka_io import make_consumer, make_producer
from core.settings import Settings
from fallwatch.benchmarks.kit import (
    CAMERA_SIZE,
    alternating,
    bench_table,
    camera_frame,
    camera_jpegs,
    cpu_clock,
    cpu_seconds,
    kafka_clients,
    noise_jpegs,
    optional,
    read_verdicts,
    seconds_of,
)
from schemas import encode, utc_now
from tests.alerting_helpers import make_verdict


def test_inputs_are_camera_sized_jpegs_and_frames_carry_them() -> None:
    jpegs = camera_jpegs(3)
    assert len(jpegs) == 3 and len(set(jpegs)) == 3
    assert all(decode_known_jpeg_rgb(jpeg).shape == (*CAMERA_SIZE, 3) for jpeg in jpegs)
    noise = noise_jpegs(2, (24, 32))
    assert noise[0] != noise[1] and decode_known_jpeg_rgb(noise[0]).shape == (24, 32, 3)
    assert noise == noise_jpegs(2, (24, 32)), "seeded: every run feeds the same frames"
    at = utc_now()
    frame = camera_frame("cam-1", "room-1", 7, at, jpegs[0], CAMERA_SIZE)
    assert (frame.camera_id, frame.room, frame.seq, frame.captured_at) == ("cam-1", "room-1", 7, at)
    assert (frame.height, frame.width, frame.jpeg) == (*CAMERA_SIZE, jpegs[0])
    assert frame.frame_id != camera_frame("cam-1", "room-1", 8, at, jpegs[0], CAMERA_SIZE).frame_id


def test_alternating_calls_each_once_per_round_in_turn_after_an_optional_warm_up() -> None:
    calls: list[str] = []

    def call(name: str) -> str:
        calls.append(name)
        return f"{name}{len(calls)}"

    results = alternating({"a": lambda: call("a"), "b": lambda: call("b")}, rounds=2, warm_up=True)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert results == {"a": ["a3", "a5"], "b": ["b4", "b6"]}, "the warm-up's results are dropped"
    calls.clear()
    assert alternating({"a": lambda: call("a")}, rounds=1) == {"a": ["a1"]}


def test_timers_measure_wall_and_cpu_time() -> None:
    assert 0.05 <= seconds_of(lambda: time.sleep(0.05)) < 1.0
    before, clock = cpu_seconds(), cpu_clock()
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:  # busy: CPU time is what is measured
        pass
    assert cpu_seconds() - before >= 0.1
    assert cpu_seconds(psutil.Process()) >= 0.1, "another process's (here: this one's, through psutil)"
    assert cpu_clock().machine_busy_s > clock.machine_busy_s


def test_a_bench_table_right_aligns_its_figures_after_its_labels() -> None:
    table = bench_table("title", ("label", "figure"), labels=1)
    table.add_row("a", "1")
    table.add_row("long label", "1,000")
    console = Console(width=80, record=True)
    console.print(table)
    text = console.export_text()
    assert "│ a          │      1 │" in text and "│ long label │  1,000 │" in text, text
    assert (optional(None, ".1f"), optional(2.25, ".1f")) == ("n/a", "2.2")


def test_read_verdicts_counts_frames_once_and_times_out_on_missing_ones(settings: Settings) -> None:
    topic = settings.kafka.topics.verdicts
    first, second = make_verdict("cam-k", 1, fall=False), make_verdict("cam-k", 2, fall=True)

    async def scenario() -> tuple[list[str], str]:
        producer = make_producer(settings)
        consumer = make_consumer(settings, topic, group_id=None)
        async with kafka_clients(producer, consumer):
            for verdict in (first, first, second):  # the first frame answered twice
                await producer.send_and_wait(topic, key=b"cam-k", value=encode(verdict))
            verdicts = await read_verdicts(consumer, 2, timeout_s=60)
            with pytest.raises(TimeoutError) as missing:
                await read_verdicts(consumer, 1, timeout_s=1)
        return sorted(v.frame_id for v in verdicts), str(missing.value)

    frame_ids, error = asyncio.run(asyncio.wait_for(scenario(), timedelta(minutes=2).total_seconds()))
    assert frame_ids == sorted([first.frame_id, second.frame_id])
    assert error == "only 0 of 1 verdicts after 1 s"
