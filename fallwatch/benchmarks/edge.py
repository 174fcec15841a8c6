"""The measurements behind `fallwatch bench edge` (see fallwatch.benchmarks.edge_command): what an edge worker costs.

1. Plumbing: the worker with a null edge model (zeros of the right shape) — frames/s through
   Kafka, validation, JPEG decode, the switcher, routing and producing verdicts. The frames are in
   Kafka before the worker starts, so the feeder does not compete for the CPU while it is timed; the
   CPU the worker and everything else (the Kafka broker, other work) spend per frame is reported
   beside it, and JPEG decode alone on 1 and on the worker's decode threads gives the ceiling.
2. The real-size ViLT-B/32 architecture (default `ViltConfig`, 3,129 answers, random weights,
   384-pixel processor): the worker's frames/s against a raw loop calling the same batched model
   on pre-processed tensors. The two are measured in alternating rounds in one run, so load from
   other work on the machine hits both alike; the ratio is what the plumbing costs.
3. The switcher's share of edge compute (switcher time / model + switcher time, in the worker).
4. CPU options of the ViLT forward (threads, channels-last, bf16, dynamic int8, torch.compile):
   speed against fp32 measured alternately on the same batch, and how far the answers move.

Also: JPEG decode with simplejpeg (used) vs OpenCV vs PIL, the processor's pre-processing cost per frame,
and what a batch of two frame sizes costs against one size (one forward per size).
"""

from __future__ import annotations

import asyncio
import copy
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import cv2
import numpy as np
import torch
from aiokafka import AIOKafkaProducer
from PIL import Image
from rich.table import Table
from torch import nn

from core.images import decode_jpeg_rgb, decode_known_jpeg_rgb
from core.kafka_io import make_consumer, make_producer
from core.settings import Settings, load_settings
from edge_workers.model import EdgeBatch, ViltEdgeModel, torch_threads
from edge_workers.service import EdgeWorker
from edge_workers.switcher import create_untrained_switcher
from fallwatch.benchmarks.kit import (
    CAMERA_SIZE,
    alternating,
    bench_table,
    camera_frame,
    camera_jpegs,
    cpu_clock,
    kafka_clients,
    read_verdicts,
    seconds_of,
    show,
)
from fallwatch.devkit.tiny_edge import build_real_size_edge_model
from fallwatch.stack import fresh_run, local_stack_settings
from schemas import Frame, encode, utc_now

CAMERAS = 4  # one per partition of the default topics
# frames 0.5 s apart from a day ago: a day of them stays within the capture-time bounds
START = utc_now().replace(microsecond=0) - timedelta(hours=24)
VILT_BATCH_WAIT_MS = 500
MIXED_SIZE_ROUNDS = 3  # each round is three real-size batches: seconds each
WIDE_SIZE = (480, 854)  # a 16:9 camera's frames beside the 4:3 ones (height, width)


class NullEdgeModel:
    """An edge model that costs nothing: zeros of the right shape, so only the plumbing is measured."""

    def __init__(self, hidden_size: int = 1536) -> None:
        self.name = "null"
        self.hidden_size = hidden_size

    def predict(self, images: list[np.ndarray]) -> EdgeBatch:
        return EdgeBatch(
            fall_probability=np.zeros(len(images), np.float32),
            hidden=np.zeros((len(images), self.hidden_size), np.float32),
        )


# --- inputs -----------------------------------------------------------------------------------
def frames_of(jpegs: list[bytes], count: int, first_seq: int) -> list[Frame]:
    frames = []
    for seq in range(first_seq, first_seq + count):
        camera = f"cam-{seq % CAMERAS}"
        captured_at = START + timedelta(milliseconds=500 * seq)
        frames.append(camera_frame(camera, camera, seq, captured_at, jpegs[seq % len(jpegs)], CAMERA_SIZE))
    return frames


# --- measurements -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeRow:
    library: str
    ms_per_frame: float


def measure_parallel_decode(jpegs: list[bytes], threads: int, frames: int = 512) -> float:
    """Frames/s of JPEG decode alone, the frames spread over `threads` threads as the worker does."""
    batch = [jpegs[i % len(jpegs)] for i in range(frames)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode_jpeg_rgb, batch[:threads]))  # warm-up: threads started
        return frames / seconds_of(lambda: list(pool.map(decode_jpeg_rgb, batch)))


def measure_decode(jpegs: list[bytes], repeats: int = 10) -> list[DecodeRow]:
    def pil(jpeg: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))

    def opencv(jpeg: bytes) -> np.ndarray | None:
        return cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), cv2.IMREAD_COLOR_RGB)

    decoders: dict[str, Callable[[bytes], object]] = {
        "simplejpeg (used)": decode_jpeg_rgb,
        "OpenCV (same pixels)": opencv,
        "PIL": pil,
    }
    times = alternating({name: decoding_seconds(decoder, jpegs) for name, decoder in decoders.items()}, repeats)
    return [DecodeRow(name, statistics.median(values) / len(jpegs) * 1000) for name, values in times.items()]


def decoding_seconds(decoder: Callable[[bytes], object], jpegs: list[bytes]) -> Callable[[], float]:
    """A call that decodes every one of `jpegs` with `decoder` and returns how long that took."""
    return lambda: seconds_of(lambda: [decoder(jpeg) for jpeg in jpegs])


async def publish_frames(settings: Settings, frames: list[Frame]) -> None:
    producer = make_producer(settings)
    async with kafka_clients(producer):
        await send_frames(producer, settings, frames)


async def send_frames(producer: AIOKafkaProducer, settings: Settings, frames: list[Frame]) -> None:
    acks = [await producer.send(settings.kafka.topics.frames, key=f.camera_id.encode(), value=encode(f))
            for f in frames]  # fmt: skip
    await asyncio.gather(*acks)


def answered(worker: EdgeWorker) -> int:
    return int(worker.metrics.registry.get_sample_value("fallwatch_edge_frames_total") or 0)


async def wait_answered(worker: EdgeWorker, count: int, timeout_s: float) -> float:
    """Poll until the worker answered `count` frames in all; returns the time it did."""
    deadline = time.perf_counter() + timeout_s
    while answered(worker) < count:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the edge worker answered {answered(worker)} of {count} frames in {timeout_s:.0f} s")
        # every 20 ms: reading the metrics costs CPU the worker would otherwise use; ±20 ms is < 1 % of a run
        await asyncio.sleep(0.02)
    return time.perf_counter()


@dataclass(frozen=True)
class PlumbingRun:
    frames: int
    frames_per_s: float
    mean_batch: float
    worker_cpu_ms: float  # per frame, this process
    other_cpu_ms: float  # per frame, every other process on the machine (the broker among them)
    machine_busy: float  # share of the machine's cores busy during the run


async def measure_plumbing(settings: Settings, jpegs: list[bytes], count: int) -> PlumbingRun:
    """Frames already in Kafka; the rate and the CPU spent from the first answered batch to the last frame."""
    await publish_frames(settings, frames_of(jpegs, count, 0))
    worker = EdgeWorker(settings, NullEdgeModel())
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        first_time = await wait_answered(worker, 1, timeout_s=120)
        first_count, first_cpu = answered(worker), cpu_clock()
        last_time = await wait_answered(worker, count, timeout_s=600)
        last_cpu = cpu_clock()
    finally:
        stop.set()
        await task
    batches = worker.metrics.registry.get_sample_value("fallwatch_edge_batch_size_count") or 1
    frames, seconds = count - first_count, last_time - first_time
    process_s = last_cpu.process_s - first_cpu.process_s
    busy_s = last_cpu.machine_busy_s - first_cpu.machine_busy_s
    return PlumbingRun(
        count, frames / seconds, count / batches, process_s / frames * 1000, (busy_s - process_s) / frames * 1000,
        busy_s / (seconds * (os.cpu_count() or 1)),
    )  # fmt: skip


@dataclass
class ViltRun:
    pipeline_s: list[float]
    raw_s: list[float]
    frames_per_round: int
    stage_ms: dict[str, float]
    switcher_share: float
    mean_batch: float = 0.0

    @property
    def pipeline_fps(self) -> float:
        return self.frames_per_round * len(self.pipeline_s) / sum(self.pipeline_s)

    @property
    def raw_fps(self) -> float:
        return self.frames_per_round * len(self.raw_s) / sum(self.raw_s)

    @property
    def round_ratios(self) -> list[float]:
        """worker / raw speed of each pair of neighbouring rounds: the spread shows the machine's noise."""
        return sorted(raw / pipeline for raw, pipeline in zip(self.raw_s, self.pipeline_s, strict=True))


def raw_loop_seconds(model: ViltEdgeModel, inputs: list[dict[str, torch.Tensor]]) -> float:
    return seconds_of(lambda: [model.infer(batch) for batch in inputs])


async def measure_vilt(
    settings: Settings, model: ViltEdgeModel, jpegs: list[bytes], per_round: int, rounds: int
) -> ViltRun:
    """Alternate a round of the raw batched loop and a round of the worker on the same frames."""
    batch_size = settings.edge.batch_size
    images = [decode_known_jpeg_rgb(jpegs[i % len(jpegs)]) for i in range(per_round)]
    inputs = [model.preprocess(images[i : i + batch_size]) for i in range(0, per_round, batch_size)]
    worker = EdgeWorker(settings, model)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    run = ViltRun([], [], per_round, {}, 0.0)
    # One producer and one verdict reader for all rounds: a round is timed from its first frame sent to
    # its last verdict readable in Kafka, without the clients' start-up.
    producer = make_producer(settings)
    verdicts = make_consumer(settings, settings.kafka.topics.verdicts, group_id=None)
    try:
        async with kafka_clients(producer, verdicts):
            # warm-up: the group joins and the model runs once, outside the timed rounds
            await send_frames(producer, settings, frames_of(jpegs, batch_size, 0))
            await read_verdicts(verdicts, batch_size, timeout_s=600)
            await asyncio.to_thread(raw_loop_seconds, model, inputs[:1])
            seq = batch_size
            for _ in range(rounds):
                run.raw_s.append(await asyncio.to_thread(raw_loop_seconds, model, inputs))
                sent = time.perf_counter()
                await send_frames(producer, settings, frames_of(jpegs, per_round, seq))
                seq += per_round
                await read_verdicts(verdicts, per_round, timeout_s=1200)
                run.pipeline_s.append(time.perf_counter() - sent)
    finally:
        stop.set()
        await task
    registry = worker.metrics.registry
    for stage in ("decode", "model", "switcher", "produce"):
        total = registry.get_sample_value("fallwatch_edge_stage_seconds_sum", {"stage": stage}) or 0.0
        batches = registry.get_sample_value("fallwatch_edge_stage_seconds_count", {"stage": stage}) or 1.0
        run.stage_ms[stage] = total / batches * 1000
    run.switcher_share = run.stage_ms["switcher"] / (run.stage_ms["model"] + run.stage_ms["switcher"])
    run.mean_batch = answered(worker) / (registry.get_sample_value("fallwatch_edge_batch_size_count") or 1)
    return run


@dataclass(frozen=True)
class OptionRow:
    option: str
    baseline_ms: float  # per frame, fp32 with the default threads, measured alternately with the option
    option_ms: float
    max_fall_diff: float
    min_hidden_cosine: float
    note: str = ""


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def measure_option(
    name: str,
    baseline: ViltEdgeModel,
    inputs: dict[str, torch.Tensor],
    run_option: Callable[[], EdgeBatch],
    repeats: int,
    note: str = "",
) -> OptionRow:
    reference = baseline.infer(inputs)
    batch = len(reference.fall_probability)
    output = run_option()  # warm-up (and the answers compared)
    times = alternating({"fp32": lambda: seconds_of(lambda: baseline.infer(inputs)),
                         "option": lambda: seconds_of(run_option)}, repeats)  # fmt: skip
    return OptionRow(
        name,
        statistics.median(times["fp32"]) / batch * 1000,
        statistics.median(times["option"]) / batch * 1000,
        float(np.max(np.abs(output.fall_probability - reference.fall_probability))),
        float(np.min(cosine(output.hidden, reference.hidden))),
        note,
    )


def measure_options(model: ViltEdgeModel, inputs: dict[str, torch.Tensor], compile_model: bool) -> list[OptionRow]:
    threads = torch.get_num_threads()
    rows = []

    def one_thread() -> EdgeBatch:
        with torch_threads(1):
            return model.infer(inputs)

    rows.append(measure_option(f"threads 1, default {threads} (edge.torch_threads)", model, inputs, one_thread, 2))

    def channels_last() -> EdgeBatch:
        nn.Module.to(model.model, memory_format=torch.channels_last)
        try:
            pixels = inputs["pixel_values"].contiguous(memory_format=torch.channels_last)
            return model.infer({**inputs, "pixel_values": pixels})
        finally:
            nn.Module.to(model.model, memory_format=torch.contiguous_format)

    rows.append(measure_option("channels-last", model, inputs, channels_last, repeats=2))

    def bf16() -> EdgeBatch:
        model.bf16_autocast = True
        try:
            return model.infer(inputs)
        finally:
            model.bf16_autocast = False

    rows.append(measure_option("bf16 autocast (edge.bf16_autocast)", model, inputs, bf16, repeats=2))

    quantized_module = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model.model), {nn.Linear}, torch.qint8)
    quantized = ViltEdgeModel(quantized_module, model.processor, model.question, name=model.name)
    rows.append(measure_option(
        "dynamic int8 Linear (edge.quantize_int8)", model, inputs, lambda: quantized.infer(inputs), repeats=2
    ))  # fmt: skip

    if compile_model:
        compiled_module = torch.compile(copy.deepcopy(model.model))
        compiled = ViltEdgeModel(compiled_module, model.processor, model.question, name=model.name)  # type: ignore[arg-type]
        compile_s = seconds_of(lambda: compiled.infer(inputs))
        rows.append(measure_option(
            "torch.compile", model, inputs, lambda: compiled.infer(inputs), repeats=2,
            note=f"first call {compile_s:.0f} s (compiles per input shape)",
        ))  # fmt: skip
    return rows


@dataclass(frozen=True)
class PreprocessRow:
    path: str
    ms_per_frame: float


def measure_preprocess(model: ViltEdgeModel, images: list[np.ndarray], repeats: int = 3) -> PreprocessRow:
    times = [seconds_of(lambda: model.preprocess(images)) / len(images) for _ in range(repeats)]
    return PreprocessRow("ViltProcessor (used)", statistics.median(times) * 1000)


@dataclass(frozen=True)
class MixedSizesRun:
    """`predict`'s ms per frame on a batch of one size and on one of two sizes; and, on the mixed batch,
    one forward with every frame resized to the first one's (how batches were answered before 2026-12-07)."""

    one_size_ms: float
    mixed_ms: float
    squashed_ms: float
    batch_size: int


def measure_mixed_sizes(model: ViltEdgeModel, images: list[np.ndarray], rounds: int) -> MixedSizesRun:
    """Alternating rounds on the same frames, the second half of the mixed batch widened to WIDE_SIZE."""
    half = len(images) // 2
    wide = [cv2.resize(image, WIDE_SIZE[::-1], interpolation=cv2.INTER_AREA) for image in images[half:]]
    mixed = images[:half] + wide
    times = alternating(
        {
            "one size": lambda: seconds_of(lambda: model.predict(images)),
            "mixed": lambda: seconds_of(lambda: model.predict(mixed)),
            "squashed": lambda: seconds_of(lambda: model.infer(model.preprocess(mixed))),
        },
        rounds,
        warm_up=True,
    )
    per_frame = {name: statistics.median(seconds) * 1000 / len(images) for name, seconds in times.items()}
    return MixedSizesRun(per_frame["one size"], per_frame["mixed"], per_frame["squashed"], len(images))


def mixed_sizes_table(run: MixedSizesRun) -> Table:
    height, width = CAMERA_SIZE
    table = bench_table(
        f"a batch of {run.batch_size} frames of two sizes (half {width}×{height}, half {WIDE_SIZE[1]}×{WIDE_SIZE[0]}): "
        "one forward per size, so no frame is squashed; ms per frame, alternating rounds",
        ("batch", "ms / frame", "against one size"),
    )
    for label, value in (
        (f"one size ({width}×{height})", run.one_size_ms),
        ("two sizes, one forward each (served)", run.mixed_ms),
        ("two sizes in one forward, resized to the first frame's (squashed; before 2026-12-07)", run.squashed_ms),
    ):
        table.add_row(label, f"{value:.0f}", f"{value / run.one_size_ms:.2f}×")
    return table


# --- the command ------------------------------------------------------------------------------
def bench_settings(
    settings: Settings, registry: Path, model_name: str, batch_size: int, batch_wait_ms: int
) -> Settings:
    edge = settings.edge.model_copy(update={
        "model": model_name, "switcher_registry": registry, "batch_size": batch_size, "batch_wait_ms": batch_wait_ms,
        "metrics_port": None, "registry_announce_key": None,
    })  # fmt: skip
    return settings.model_copy(update={"edge": edge})


def measure_budgets(
    on_stack: Settings,
    registry: Path,
    batch_size: int,
    batch_wait_ms: int,
    jpegs: list[bytes],
    frames: int,
    passes: int,
) -> dict[str, list[PlumbingRun]]:
    """Plumbing passes with an offload budget of 0 frames/s (checked for every batch, nothing sent), the
    worker's own against one shared in Redis, alternately so that the machine's drift hits both alike."""
    runs: dict[str, list[PlumbingRun]] = {"own": [], "shared": []}
    for index in range(passes):
        for kind, key in (("own", None), ("shared", f"fallwatch:offload-budget:bench-{index}")):
            run = fresh_run(on_stack, f"budget-{kind}-{index}")
            settings = bench_settings(run, registry, "null", batch_size, batch_wait_ms)
            edge = settings.edge.model_copy(update={"max_offload_fps": 0.0, "offload_budget_key": key})
            runs[kind].append(asyncio.run(measure_plumbing(settings.model_copy(update={"edge": edge}), jpegs, frames)))
    return runs


def budget_table(runs: dict[str, list[PlumbingRun]]) -> Table:
    table = bench_table(
        "offload budget: the worker's own against one shared in Redis (`edge.offload_budget_key`: two Redis "
        "calls a batch); null model, 0 frames/s allowed, alternating passes",
        ("budget", "frames/s (median)", "min–max", "worker CPU ms / frame", "mean batch"),
    )
    for kind, passes in runs.items():
        ordered = sorted(passes, key=lambda run: run.frames_per_s)
        median = ordered[len(ordered) // 2]
        table.add_row(
            kind, f"{median.frames_per_s:,.0f}", f"{ordered[0].frames_per_s:,.0f}–{ordered[-1].frames_per_s:,.0f}",
            f"{median.worker_cpu_ms:.3f}", f"{median.mean_batch:.0f}",
        )  # fmt: skip
    return table


def run_benchmark(
    plumbing_frames: int,
    plumbing_passes: int,
    warmup_frames: int,
    vilt_frames: int,
    rounds: int,
    batch_size: int,
    options: bool,
    compile_model: bool,
) -> None:
    """Measure and print the tables (see the module docstring)."""
    settings = load_settings()
    jpegs = camera_jpegs()
    show(
        f"edge benchmark on {torch.get_num_threads()} CPU threads; {len(jpegs)} distinct "
        f"{CAMERA_SIZE[1]}×{CAMERA_SIZE[0]} JPEGs ({statistics.mean(map(len, jpegs)) / 1000:.0f} kB); "
        "other work on this machine may be running: compare rows of one run only"
    )
    with tempfile.TemporaryDirectory(prefix="fallwatch-bench-edge-") as scratch_dir:
        scratch = Path(scratch_dir)
        decode_rows = measure_decode(jpegs)
        decode_threads = settings.edge.decode_threads
        decode_fps = {threads: measure_parallel_decode(jpegs, threads) for threads in sorted({1, decode_threads})}

        null_registry = scratch / "null-switchers"
        create_untrained_switcher(null_registry, NullEdgeModel().hidden_size, NullEdgeModel().name)
        with local_stack_settings(settings, scratch / "stack") as on_stack:
            # The first pass through a fresh broker also pays for the JVM compiling its fetch and produce
            # paths (the broker's CPU per frame halved from the first pass to the third); a long-running
            # broker has done that, so the timed passes come after a discarded warm-up pass. Each pass
            # has its own topics and group.
            passes = [
                asyncio.run(measure_plumbing(
                    bench_settings(
                        fresh_run(on_stack, f"plumbing-{index}"), null_registry, "null", max(batch_size, 64),
                        settings.edge.batch_wait_ms,
                    ),
                    jpegs, frames,
                ))
                for index, frames in enumerate([warmup_frames, *[plumbing_frames] * plumbing_passes])
                if frames > 0
            ][-plumbing_passes:]  # fmt: skip
            budget_passes = measure_budgets(
                on_stack, null_registry, max(batch_size, 64), settings.edge.batch_wait_ms, jpegs, plumbing_frames,
                plumbing_passes,
            )  # fmt: skip

        directory = build_real_size_edge_model(scratch / "vilt-b32-random")
        model = ViltEdgeModel.from_pretrained(str(directory), settings.edge.question)
        vilt_registry = scratch / "vilt-switchers"
        create_untrained_switcher(vilt_registry, model.hidden_size, model.name)
        with local_stack_settings(settings, scratch / "stack") as on_stack:
            stack_settings = fresh_run(on_stack, "bench")
            vilt = asyncio.run(measure_vilt(
                # a forward takes seconds: waiting up to half a second for a full batch costs little
                bench_settings(stack_settings, vilt_registry, model.name, batch_size, VILT_BATCH_WAIT_MS), model,
                jpegs, vilt_frames, rounds,
            ))  # fmt: skip
        batch = [decode_known_jpeg_rgb(jpeg) for jpeg in jpegs[:batch_size]]
        preprocess = measure_preprocess(model, batch)
        mixed_sizes = measure_mixed_sizes(model, batch, MIXED_SIZE_ROUNDS)
        show(
            summary_table(passes, warmup_frames, vilt, batch_size, decode_fps),
            budget_table(budget_passes),
            stage_table(vilt, decode_rows, preprocess),
            mixed_sizes_table(mixed_sizes),
        )
        if options:
            inputs = model.preprocess(batch)
            show(options_table(measure_options(model, inputs, compile_model), batch_size))


def summary_table(
    passes: list[PlumbingRun], warmup_frames: int, vilt: ViltRun, batch_size: int, decode_fps: dict[int, float]
) -> Table:
    cores = os.cpu_count() or 1
    table = bench_table(
        f"edge worker on real Kafka + Redis ({cores} cores); plumbing: frames in Kafka before the worker "
        "starts, timed from its first answered batch to the last frame",
        ("measurement", "value", "target"),
    )
    ratio = vilt.pipeline_fps / vilt.raw_fps
    decode_threads = max(decode_fps)
    passes = sorted(passes, key=lambda run: run.frames_per_s)
    plumbing = passes[len(passes) // 2]  # its CPU figures are the rows below
    table.add_row(
        f"1. plumbing, null model: frames/s per worker, median of {len(passes)} passes of {plumbing.frames} frames "
        f"after a {warmup_frames}-frame warm-up (mean batch {plumbing.mean_batch:.0f}, {decode_threads} decode "
        "threads); min–max of the passes",
        f"{plumbing.frames_per_s:,.0f} ({passes[0].frames_per_s:,.0f}–{passes[-1].frames_per_s:,.0f})", "≥ 2,000",
    )  # fmt: skip
    for threads, fps in decode_fps.items():
        table.add_row(f"1b. JPEG decode alone, nothing else: frames/s on {threads} thread(s)", f"{fps:,.0f}", "")
    table.add_row(
        "1c. CPU ms per frame during 1: worker process (decode threads included) + other processes "
        f"(the Kafka broker, and any other work); machine {plumbing.machine_busy:.0%} busy",
        f"{plumbing.worker_cpu_ms:.2f} + {plumbing.other_cpu_ms:.2f}", "",
    )  # fmt: skip
    table.add_row(
        f"1d. CPU-bound ceilings: {cores} cores × 1000 / the worker's ms per frame; / worker + other ms (the broker "
        "alone when nothing else runs)",
        f"{cores * 1000 / plumbing.worker_cpu_ms:,.0f} / "
        f"{cores * 1000 / (plumbing.worker_cpu_ms + plumbing.other_cpu_ms):,.0f}", "",
    )  # fmt: skip
    table.add_row(
        f"2a. ViLT-B/32 real size, worker frames/s (batch {batch_size}, wait ≤ {VILT_BATCH_WAIT_MS} ms, "
        f"mean batch formed {vilt.mean_batch:.1f})",
        f"{vilt.pipeline_fps:.2f}", "",
    )  # fmt: skip
    table.add_row("2b. same model, raw batched loop on pre-processed tensors, frames/s", f"{vilt.raw_fps:.2f}", "")
    table.add_row(
        f"2c. ratio worker / raw ({len(vilt.raw_s)} alternating rounds of {vilt.frames_per_round} frames)",
        f"{ratio:.3f}", "≥ 0.95",
    )  # fmt: skip
    ratios = vilt.round_ratios
    table.add_row(
        "2d. per pair of rounds: median (min–max)",
        f"{statistics.median(ratios):.3f} ({ratios[0]:.2f}–{ratios[-1]:.2f})", "",
    )  # fmt: skip
    table.add_row(
        "3. switcher share of edge compute (switcher / model + switcher)", f"{vilt.switcher_share:.3%}", "≤ 1 %"
    )
    return table


def stage_table(vilt: ViltRun, decode_rows: list[DecodeRow], preprocess: PreprocessRow) -> Table:
    table = bench_table("where a frame's time goes (ms per frame)", ("stage", "ms / frame"), labels=1)
    for stage, value in vilt.stage_ms.items():
        label = "model (pre-processing + forward)" if stage == "model" else stage
        table.add_row(f"worker: {label}", f"{value:.3f}")
    table.add_row(f"pre-processing alone: {preprocess.path}", f"{preprocess.ms_per_frame:.2f}")
    for row in decode_rows:
        table.add_row(f"JPEG decode {CAMERA_SIZE[1]}×{CAMERA_SIZE[0]}: {row.library}", f"{row.ms_per_frame:.2f}")
    return table


def options_table(rows: list[OptionRow], batch_size: int) -> Table:
    table = bench_table(
        f"CPU options of the real-size ViLT forward (batch {batch_size}), each against fp32 measured alternately",
        ("option", "fp32 ms/frame", "option ms/frame", "speed-up", "max |ΔP(fall)|", "min hidden cos", "note"),
    )
    for row in rows:
        table.add_row(
            row.option, f"{row.baseline_ms:.0f}", f"{row.option_ms:.0f}", f"{row.baseline_ms / row.option_ms:.2f}×",
            f"{row.max_fall_diff:.4f}", f"{row.min_hidden_cosine:.5f}", row.note,
        )  # fmt: skip
    return table
