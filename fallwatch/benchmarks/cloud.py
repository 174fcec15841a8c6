"""The measurements behind `fallwatch bench cloud` (see fallwatch.benchmarks.cloud_command): what a cloud worker costs.

1. The model alone: requests/s, latency per batch, energy per request for batch sizes
   1, 4, 8, 16 of clips of `--frames` frames (camera-sized 640×480, so pre-processing counts).
2. The worker (real Kafka + Redis, JPEG clips by claim check) against the model's own
   batched throughput at the worker's batch size, in one process on the same requests from
   three starting points: JPEG clips in memory (JPEG decode, pre-processing and forward: the
   work the worker does per request, so the ratio prices Kafka, Redis and scheduling),
   decoded clips (pre-processing and forward) and pre-processed tensors (the forward alone).
3. P(fall) from one forward pass vs `generate` (the baseline: answer in free text, read
   the first word): speed ratio on the same inputs, and how often the two answers agree.
   `generate` writes exactly `--generate-tokens` tokens (its end-of-sequence token may not
   stop it earlier), so the ratio is defined by that number, printed in the table title.

Models: `tiny` (a random tiny LLaVA-NeXT-Video of the real classes, built here),
`configured` (cloud.model of the settings: a real checkpoint), `random-7b` (the 7B
architecture with random weights built in memory, for a GPU: the real compute without a
download). Energy comes from NVML on a GPU and RAPL on a CPU when readable, else "n/a".
"""

from __future__ import annotations

import asyncio
import functools
import math
import statistics
import tempfile
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from rich.table import Table

from cloud_workers.energy import CostMeter, open_energy_meter
from cloud_workers.loading import load_cloud_model
from cloud_workers.model import Clip, LlavaVideoCloudModel, resolve_device, resolve_dtype
from cloud_workers.service import DECODE_THREADS, CloudWorker, decode_clips
from core.images import encode_jpeg_rgb
from core.kafka_io import make_consumer
from core.settings import ConfigError, Settings, load_settings
from fallwatch.benchmarks.cloud_models import ModelKind
from fallwatch.benchmarks.kit import (
    CAMERA_SIZE,
    alternating,
    bench_table,
    kafka_clients,
    optional,
    read_verdicts,
    seconds_of,
    show,
)
from fallwatch.devkit.cloud_requests import publish_requests, synthetic_clip
from fallwatch.devkit.tiny_cloud import (
    build_random_full_size_cloud_model,
    build_tiny_cloud_model,
    restrict_model_to_answers,
    restrict_to_answers,
)
from fallwatch.stack import fresh_run, local_stack_settings

T = TypeVar("T")

AGREEMENT_BATCH = 8  # clips per call when comparing answers: bounds the 7B's KV cache in generate


# --- measurements -----------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchRow:
    batch_size: int
    latency_ms: float  # median wall time of one batch
    requests_per_s: float
    energy_j_per_request: float | None
    gpu_memory_mb: float | None


def on_worker_thread(function: Callable[..., T], *args: object) -> T:
    """Call `function` off the main thread, as the worker calls the model (asyncio.to_thread).

    The baseline must run where the worker runs: on this 2-core machine under load, torch's
    CPU kernels ran 2-4× faster from a secondary thread than from the main thread.
    """
    return asyncio.run(asyncio.to_thread(function, *args))


def measure_batches(model: LlavaVideoCloudModel, clips: list[Clip], batch_size: int, repeats: int) -> BatchRow:
    """Median over `repeats` timed batches, after one warm-up batch."""
    costs = CostMeter(model.device, open_energy_meter(model.device, model.gpu_indices))
    batch = [clips[i % len(clips)] for i in range(batch_size)]
    model.predict(batch)
    seconds, energies, memories = [], [], []
    for _ in range(repeats):
        costs.start()
        seconds.append(seconds_of(lambda: model.predict(batch)))
        cost = costs.stop()
        energies.append(cost.energy_j)
        memories.append(cost.gpu_memory_mb)
    latency_s = statistics.median(seconds)
    energy = None if None in energies else statistics.median(e for e in energies if e is not None) / batch_size
    memory = None if None in memories else max(m for m in memories if m is not None)
    return BatchRow(batch_size, latency_s * 1000, batch_size / latency_s, energy, memory)


@dataclass(frozen=True)
class ModelRates:
    """The model's own requests/s in batches of the worker's size, in one process (no Kafka, no Redis)."""

    from_jpegs: float  # JPEG clips in memory: decode (as the worker decodes) + pre-process + forward
    from_frames: float  # decoded clips in memory: pre-process + forward
    forward_only: float  # pre-processed tensors in memory: the forward alone


def decoded_batch(jpeg_clips: list[list[bytes]], pool: Executor) -> list[Clip]:
    clips = decode_clips(jpeg_clips, pool)
    if any(clip is None for clip in clips):
        raise ValueError("a benchmark clip did not decode")
    return [clip for clip in clips if clip is not None]


def model_rates(
    model: LlavaVideoCloudModel, jpeg_clips: list[list[bytes]], batch_size: int, pool: Executor
) -> ModelRates:
    """The model's own throughput on the worker's requests, from JPEGs, from decoded frames, from tensors."""
    batches = [jpeg_clips[start : start + batch_size] for start in range(0, len(jpeg_clips), batch_size)]
    frames = [decoded_batch(batch, pool) for batch in batches]
    inputs = [model.model_inputs(clips, [model.question] * len(clips)) for clips in frames]
    count = len(jpeg_clips)
    return ModelRates(
        from_jpegs=count / seconds_of(lambda: [model.predict(decoded_batch(batch, pool)) for batch in batches]),
        from_frames=count / seconds_of(lambda: [model.predict(clips) for clips in frames]),
        forward_only=count / seconds_of(lambda: [model.yes_probabilities_of(batch) for batch in inputs]),
    )


@dataclass(frozen=True)
class GenerateRow:
    batch_size: int
    forward_ms: float  # clips in, P(Yes) out: pre-processing included
    generate_ms: float
    forward_model_ms: float  # the model alone, on inputs processed beforehand
    generate_model_ms: float


def measure_generate(
    model: LlavaVideoCloudModel, clips: list[Clip], batch_size: int, new_tokens: int, repeats: int
) -> GenerateRow:
    batch = [clips[i % len(clips)] for i in range(batch_size)]
    questions = [model.question] * batch_size
    inputs = model.model_inputs(batch, questions)
    calls = {
        "forward": lambda: model.predict(batch),
        "generate": lambda: model.generate_answers_of(model.model_inputs(batch, questions), new_tokens, new_tokens),
        "forward_model": lambda: model.yes_probabilities_of(inputs),
        "generate_model": lambda: model.generate_answers_of(inputs, new_tokens, new_tokens),
    }
    seconds = alternating(
        {name: functools.partial(seconds_of, call) for name, call in calls.items()}, repeats, warm_up=True
    )
    ms = {name: statistics.median(values) * 1000 for name, values in seconds.items()}
    return GenerateRow(batch_size, ms["forward"], ms["generate"], ms["forward_model"], ms["generate_model"])


@dataclass(frozen=True)
class Agreement:
    clips: int
    agree: int
    neither: int  # generate's first word was neither yes nor no


def measure_agreement(model: LlavaVideoCloudModel, clips: list[Clip], new_tokens: int) -> Agreement:
    """One-forward decision (P(Yes) > 0.5) vs the first word `generate` writes, clip by clip."""
    chunks = [clips[start : start + AGREEMENT_BATCH] for start in range(0, len(clips), AGREEMENT_BATCH)]
    probabilities = np.concatenate([model.predict(chunk) for chunk in chunks])
    answers = [answer for chunk in chunks for answer in model.generate_answers(chunk, max_new_tokens=new_tokens)]
    agree = neither = 0
    for probability, answer in zip(probabilities, answers, strict=True):
        word = answer.split()[0].strip(".,!").lower() if answer.split() else ""
        if word not in ("yes", "no"):
            neither += 1
        elif (word == "yes") == (probability > 0.5):
            agree += 1
    return Agreement(len(clips), agree, neither)


@dataclass(frozen=True)
class WorkerRun:
    requests: int
    batch_size: int
    requests_per_s: float
    median_worker_ms: float
    median_preprocess_ms: float  # one batch's pre-processing inside the worker (timings_ms.preprocess)
    median_model_ms: float  # one batch's forward inside the worker (timings_ms.model)
    mean_batch: float


async def measure_worker(settings: Settings, model: LlavaVideoCloudModel, clips: list[Clip]) -> WorkerRun:
    """Pre-load the topic with one request per clip, then time the worker answering all of them.

    The clock runs from the first request's arrival in the worker to the last verdict, both
    read from the verdicts, so joining the consumer group is not counted.
    """
    await publish_requests(settings, clips)
    worker = CloudWorker(settings, model)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    reader = make_consumer(settings, settings.kafka.topics.verdicts, group_id=None)
    try:
        async with kafka_clients(reader):
            verdicts = await read_verdicts(reader, len(clips), timeout_s=600.0)
    finally:
        stop.set()
        await task
    first_arrival = min(v.produced_at - timedelta(milliseconds=v.timings_ms["worker"]) for v in verdicts)
    span_s = (max(v.produced_at for v in verdicts) - first_arrival).total_seconds()
    return WorkerRun(
        requests=len(verdicts),
        batch_size=settings.cloud.batch_size,
        requests_per_s=len(verdicts) / span_s,
        median_worker_ms=statistics.median(v.timings_ms["worker"] for v in verdicts),
        median_preprocess_ms=statistics.median(v.timings_ms["preprocess"] for v in verdicts),
        median_model_ms=statistics.median(v.timings_ms["model"] for v in verdicts),
        mean_batch=statistics.mean(v.batch_size or 0 for v in verdicts),
    )


# --- the command ------------------------------------------------------------------------------
def load_bench_model(kind: ModelKind, settings: Settings, scratch: Path) -> LlavaVideoCloudModel:
    cloud = settings.cloud
    if kind == "tiny":
        directory = build_tiny_cloud_model(scratch / "tiny-llava")
        return LlavaVideoCloudModel.from_pretrained(
            str(directory), cloud.question, num_frames=cloud.num_frames, device=cloud.device, dtype=cloud.dtype
        )
    if kind == "random-7b":
        device = resolve_device(cloud.device)
        return build_random_full_size_cloud_model(
            cloud.question, cloud.num_frames, device, resolve_dtype(cloud.dtype, device)
        )
    model = load_cloud_model(settings)
    if not isinstance(model, LlavaVideoCloudModel):
        raise ConfigError("the benchmark needs a LLaVA-NeXT-Video model (it compares against generate)")
    return model


def load_agreement_model(
    kind: ModelKind, model: LlavaVideoCloudModel, settings: Settings, scratch: Path
) -> LlavaVideoCloudModel:
    """The model whose answers are compared: a random model is made to say only Yes or No.

    A random model's greedy first word is almost never "Yes" or "No", which would make the
    agreement meaningless; restricted, it still answers at random per clip. The tiny model
    gets a restricted copy; the random 7B (14 GB) is restricted in place, so this comes after
    every timing (the compute per clip does not change, only the answers).
    """
    if kind == "configured":
        return model
    if kind == "random-7b":
        yes_id, no_id = model.processor.tokenizer.convert_tokens_to_ids(["Yes", "No"])
        restrict_model_to_answers(model.model, yes_id=yes_id, no_id=no_id)
        return model
    directory = build_tiny_cloud_model(scratch / "tiny-llava-yes-no", seed=1)
    restrict_to_answers(directory)
    cloud = settings.cloud
    return LlavaVideoCloudModel.from_pretrained(
        str(directory), cloud.question, num_frames=cloud.num_frames, device=cloud.device, dtype=cloud.dtype
    )


def run_benchmark(
    kind: ModelKind,
    sizes: list[int],
    frames: int,
    repeats: int,
    generate_tokens: int,
    agreement_clips: int,
    worker_requests: int,
    worker_batch: int,
    worker_rounds: int,
) -> None:
    """Measure and print the tables (see the module docstring)."""
    settings = load_settings()
    settings = settings.model_copy(
        update={"cloud": settings.cloud.model_copy(update={"num_frames": frames, "batch_size": worker_batch})}
    )
    clips = [synthetic_clip(seed, frames) for seed in range(max(16, agreement_clips))]
    with tempfile.TemporaryDirectory(prefix="fallwatch-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        cloud_model = load_bench_model(kind, settings, scratch)
        show(describe(cloud_model, kind, frames))

        rows = [on_worker_thread(measure_batches, cloud_model, clips, size, repeats) for size in sizes]
        show(batch_table(rows))

        if worker_requests > 0:
            worker_clips = [clips[i % len(clips)] for i in range(worker_requests)]
            # The JPEGs the worker gets (publish_requests encodes them the same way).
            clip_jpegs = [[encode_jpeg_rgb(frame) for frame in clip] for clip in clips]
            worker_jpegs = [clip_jpegs[i % len(clips)] for i in range(worker_requests)]
            runs: list[WorkerRun] = []
            rates: list[ModelRates] = []
            with (
                local_stack_settings(settings, scratch / "stack") as on_stack,
                ThreadPoolExecutor(DECODE_THREADS) as pool,
            ):
                stack_settings = fresh_run(on_stack, "bench")
                # Alternating rounds of the model alone and the worker on the same clips, medians
                # of each: load from other work on the machine shifts both alike.
                for round_ in range(worker_rounds):
                    rates.append(on_worker_thread(model_rates, cloud_model, worker_jpegs, worker_batch, pool))
                    round_settings = stack_settings if round_ == 0 else fresh_run(stack_settings, "bench")
                    runs.append(asyncio.run(measure_worker(round_settings, cloud_model, worker_clips)))
            show(worker_table(runs, rates), ratio_table(runs, rates))

        generate_rows = [
            on_worker_thread(measure_generate, cloud_model, clips, size, generate_tokens, repeats) for size in (1, 8)
        ]
        show(generate_table(generate_rows, generate_tokens))
        agreement_model = load_agreement_model(kind, cloud_model, settings, scratch)  # last: may change the model
        agreement = on_worker_thread(measure_agreement, agreement_model, clips[:agreement_clips], generate_tokens)
        show(agreement_line(agreement, kind))


def describe(model: LlavaVideoCloudModel, kind: ModelKind, frames: int) -> str:
    parameters = sum(p.numel() for p in model.model.parameters())
    if model.device.type == "cuda":
        device = torch.cuda.get_device_name(model.device)
    else:
        device = f"{torch.get_num_threads()} CPU threads"
    return (
        f"cloud model: {model.name} ({kind}, {parameters:,} parameters, {model.model.dtype}) on {device}; "
        f"{frames}-frame clips of {CAMERA_SIZE[1]}×{CAMERA_SIZE[0]}, {model.tokens_per_frame * frames} video tokens"
    )


def batch_table(rows: list[BatchRow]) -> Table:
    table = bench_table(
        "model alone on decoded clips: pre-processing + one forward per batch (yes/no from next-token logits)",
        ("batch", "latency / batch (ms)", "latency / request (ms)", "requests/s", "J / request", "GPU MB"),
    )
    for row in rows:
        table.add_row(
            str(row.batch_size), f"{row.latency_ms:.1f}", f"{row.latency_ms / row.batch_size:.1f}",
            f"{row.requests_per_s:.2f}", optional(row.energy_j_per_request, ".2f"), optional(row.gpu_memory_mb, ".0f"),
        )  # fmt: skip
    return table


def generate_table(rows: list[GenerateRow], new_tokens: int) -> Table:
    table = bench_table(
        f"one forward vs generate writing exactly {new_tokens} new tokens (10 ≈ a one-sentence answer, "
        "'Yes, the person is lying on the floor.'), on the same clips; target ≥ 5×",
        ("batch", "clips → P(Yes) (ms)", "clips → text (ms)", "ratio with pre-processing", "model only: forward (ms)",
         "generate (ms)", "ratio", "model only: 5× from (tokens, est.)"),
    )  # fmt: skip
    for row in rows:
        table.add_row(
            str(row.batch_size), f"{row.forward_ms:.1f}", f"{row.generate_ms:.1f}",
            f"{row.generate_ms / row.forward_ms:.1f}×", f"{row.forward_model_ms:.1f}", f"{row.generate_model_ms:.1f}",
            f"{row.generate_model_ms / row.forward_model_ms:.1f}×", tokens_for_fivefold(row, new_tokens),
        )  # fmt: skip
    return table


def tokens_for_fivefold(row: GenerateRow, new_tokens: int) -> str:
    """The answer length at which `generate` would take 5× one forward, model only, extrapolated linearly.

    `generate` is one forward over the prompt (what the one-forward path does) and then one cached
    step per further token, so its cost grows by the same step per token: the target depends on how
    long an answer the baseline writes more than on the implementation.
    """
    if new_tokens < 2:
        return "n/a"
    step_ms = (row.generate_model_ms - row.forward_model_ms) / (new_tokens - 1)
    if step_ms <= 0:
        return "n/a"
    return f"{1 + math.ceil(4 * row.forward_model_ms / step_ms)}"


def agreement_line(agreement: Agreement, kind: ModelKind) -> str:
    restricted = {"tiny": " (a copy of the tiny model that may only say Yes or No)",
                  "random-7b": " (the random 7B made to say only Yes or No)"}.get(kind, "")  # fmt: skip
    return (
        f"agreement, one forward (P(Yes) > 0.5) vs generate's first word: {agreement.agree}/{agreement.clips}"
        f" clips; {agreement.neither} neither yes nor no{restricted}"
    )


def worker_table(runs: list[WorkerRun], rates: list[ModelRates]) -> Table:
    batch_size = runs[0].batch_size
    from_frames = statistics.median(rate.from_frames for rate in rates)
    forward_only = statistics.median(rate.forward_only for rate in rates)
    table = bench_table(
        "worker on Kafka + Redis: JPEG clips by claim check → verdicts (a batch is pre-processed while the "
        "one before is in the model; 'alone': the same work in one process, nothing else running)",
        ("rounds", "requests", "batch", "mean batch formed", "worker req/s (rounds)", "pre-process ms/batch",
         "forward ms/batch", "median arrival→verdict (ms)"),
    )  # fmt: skip
    preprocess_alone_ms = 1000 * batch_size * (1 / from_frames - 1 / forward_only)
    table.add_row(
        str(len(runs)), str(runs[0].requests), str(batch_size),
        f"{statistics.mean(run.mean_batch for run in runs):.1f}",
        f"{worker_rate(runs):.1f} ({', '.join(f'{run.requests_per_s:.1f}' for run in runs)})",
        f"{statistics.median(run.median_preprocess_ms for run in runs):.0f} (alone: {preprocess_alone_ms:.0f})",
        f"{statistics.median(run.median_model_ms for run in runs):.0f} (alone: {1000 * batch_size / forward_only:.0f})",
        f"{statistics.median(run.median_worker_ms for run in runs):.0f}",
    )  # fmt: skip
    return table


def ratio_table(runs: list[WorkerRun], rates: list[ModelRates]) -> Table:
    table = bench_table(
        f"worker vs the model's own batched throughput (one process, no Kafka or Redis, batches of "
        f"{runs[0].batch_size}, the same requests, rounds alternating with the worker's); target ≥ 0.8 against "
        "the model's work from JPEG clips",
        ("the model's own work", "model req/s (rounds)", "worker / model"),
    )
    baselines = {
        "JPEG clips in memory → decode + pre-process + forward (target)": [rate.from_jpegs for rate in rates],
        "decoded clips in memory → pre-process + forward": [rate.from_frames for rate in rates],
        "pre-processed tensors in memory → forward only": [rate.forward_only for rate in rates],
    }
    for name, values in baselines.items():
        model_rate = statistics.median(values)
        rounds = ", ".join(f"{value:.1f}" for value in values)
        table.add_row(name, f"{model_rate:.1f} ({rounds})", f"{worker_rate(runs) / model_rate:.2f}")
    return table


def worker_rate(runs: list[WorkerRun]) -> float:
    return statistics.median(run.requests_per_s for run in runs)
