"""`fallwatch bench capacity`: how many cameras one edge box carries, and the cloud's GPU time per camera.

Per CPU option of the edge model (fp32, dynamic int8, bf16 autocast) it times, on this machine,
what the edge worker spends per frame: JPEG decode, ViLT pre-processing and the batched forward
on every torch thread, with the options interleaved round by round so load from other work falls
on all of them alike. Cameras per box = 1 / (fps × seconds per frame). The model is ViLT-B/32's
real architecture with random weights built in memory (the speed of the real checkpoint, which no
hub here serves), or a checkpoint of your own (`--model-dir`). The switcher (~10 µs a frame) and
Kafka are left out: `fallwatch bench edge` measures them.

The cloud side: offloaded requests per camera-hour = fps × 3600 × the cloud share (the newest
switcher's share on its test split, capped by edge.max_offload_ratio, or --cloud-share), times
the GPU seconds of one request (--cloud-seconds-per-request, measured on your GPU).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from core.images import decode_known_jpeg_rgb
from core.settings import Settings, load_settings
from edge_workers.model import EdgeBatch, ViltEdgeModel, quantized_int8
from edge_workers.switcher import latest_version, load_switcher
from fallwatch.benchmarks.edge import camera_images, jpeg_of
from fallwatch.devkit.tiny_edge import real_size_edge_model

OPTIONS = ("fp32", "dynamic int8 (edge.quantize_int8)", "bf16 autocast (edge.bf16_autocast)")


@dataclass(frozen=True)
class OptionTiming:
    option: str
    forward_s: float  # per frame, wall time, median over rounds
    forward_cpu_s: float  # per frame, process CPU time (all threads), median over rounds
    max_fall_diff: float  # against fp32, on the same inputs

    def frame_s(self, other_s: float) -> float:
        return self.forward_s + other_s


@dataclass(frozen=True)
class CloudShare:
    share: float
    source: str


def timed(model: ViltEdgeModel, inputs: dict[str, torch.Tensor]) -> tuple[float, float, EdgeBatch]:
    """Wall and CPU seconds of one forward, and its output (seeded: ViLT samples patches at random)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wall, cpu = time.perf_counter(), time.process_time()
        output = model.infer(inputs)
        return time.perf_counter() - wall, time.process_time() - cpu, output


def measure_options(model: ViltEdgeModel, inputs: dict[str, torch.Tensor], rounds: int) -> list[OptionTiming]:
    int8 = ViltEdgeModel(quantized_int8(copy.deepcopy(model.model)), model.processor, model.question, model.name)
    bf16 = ViltEdgeModel(model.model, model.processor, model.question, model.name, bf16_autocast=True)
    models = dict(zip(OPTIONS, (model, int8, bf16), strict=True))
    for candidate in models.values():
        timed(candidate, inputs)  # warm-up: first calls allocate and pick kernels
    walls: dict[str, list[float]] = {option: [] for option in OPTIONS}
    cpus: dict[str, list[float]] = {option: [] for option in OPTIONS}
    outputs: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for option, candidate in models.items():
            wall, cpu, output = timed(candidate, inputs)
            walls[option].append(wall)
            cpus[option].append(cpu)
            outputs[option] = output.fall_probability
    frames = len(outputs["fp32"])
    return [
        OptionTiming(
            option,
            statistics.median(walls[option]) / frames,
            statistics.median(cpus[option]) / frames,
            float(np.max(np.abs(outputs[option] - outputs["fp32"]))),
        )
        for option in OPTIONS
    ]


def per_frame_other_s(model: ViltEdgeModel, jpegs: list[bytes], repeats: int = 3) -> tuple[float, float]:
    """Seconds per frame of JPEG decoding and of ViLT pre-processing (median of `repeats`)."""
    decode, preprocess = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        images = [decode_known_jpeg_rgb(jpeg) for jpeg in jpegs]
        decode.append((time.perf_counter() - started) / len(jpegs))
        started = time.perf_counter()
        model.preprocess(images)
        preprocess.append((time.perf_counter() - started) / len(jpegs))
    return statistics.median(decode), statistics.median(preprocess)


def current_cloud_share(settings: Settings, given: float | None) -> CloudShare | None:
    """--cloud-share, else the newest switcher's share on its test split, capped by edge.max_offload_ratio."""
    if given is not None:
        return CloudShare(given, "--cloud-share")
    budget = settings.edge.max_offload_ratio
    newest = latest_version(settings.edge.switcher_registry)
    measured = load_switcher(newest)[1].offload_policy.get("test_deferred_share") if newest is not None else None
    if measured is None:
        return None if budget is None else CloudShare(budget, "edge.max_offload_ratio (the budget)")
    source = f"switcher {newest.name if newest else ''}, test split"
    if budget is not None and budget < measured:
        return CloudShare(budget, f"edge.max_offload_ratio (the budget; {source}: {measured:.2f})")
    return CloudShare(float(measured), source)


def load_model(model_dir: Path | None, question: str) -> ViltEdgeModel:
    if model_dir is not None:
        return ViltEdgeModel.from_pretrained(str(model_dir), question)
    model, processor = real_size_edge_model()
    return ViltEdgeModel(model, processor, question, name="ViLT-B/32 architecture, random weights")


def run_benchmark(
    fps: float,
    model_dir: Path | None,
    batch_size: int,
    rounds: int,
    cloud_share: float | None,
    cloud_seconds_per_request: float | None,
) -> None:
    settings = load_settings(("edge",))
    console = Console(width=160)
    model = load_model(model_dir, settings.edge.question)
    jpegs = [jpeg_of(image) for image in camera_images(batch_size)]
    images = [decode_known_jpeg_rgb(jpeg) for jpeg in jpegs]
    decode_s, preprocess_s = per_frame_other_s(model, jpegs)
    timings = measure_options(model, model.preprocess(images), rounds)
    console.print(
        f"edge box: this machine, {torch.get_num_threads()} torch threads; {model.name}; batches of {len(jpegs)} "
        f"{images[0].shape[1]}×{images[0].shape[0]} frames; {rounds} interleaved rounds. Other work on this machine "
        "slows every option alike: the ratios hold, the absolute numbers need a quiet rerun."
    )
    console.print(edge_table(timings, fps, decode_s + preprocess_s))
    console.print(cloud_table(fps, current_cloud_share(settings, cloud_share), cloud_seconds_per_request))


def edge_table(timings: list[OptionTiming], fps: float, other_s: float) -> Table:
    table = Table(
        title=f"cameras one edge box carries at {fps:g} fps per camera "
        f"(per frame: forward + {other_s * 1000:.1f} ms decode and pre-processing)"
    )
    for column in ("CPU option", "forward ms/frame", "CPU ms/frame", "speed vs fp32", "max |ΔP(fall)|",
                   "frames/s", f"cameras at {fps:g} fps"):  # fmt: skip
        table.add_column(column, justify="left" if column == "CPU option" else "right")
    fp32 = timings[0]
    for timing in timings:
        frame_s = timing.frame_s(other_s)
        table.add_row(
            timing.option,
            f"{timing.forward_s * 1000:.1f}",
            f"{timing.forward_cpu_s * 1000:.1f}",
            f"{fp32.frame_s(other_s) / frame_s:.2f}×",
            f"{timing.max_fall_diff:.4f}",
            f"{1 / frame_s:.2f}",
            f"{1 / (fps * frame_s):.1f}",
        )
    return table


def cloud_table(fps: float, share: CloudShare | None, seconds_per_request: float | None) -> Table:
    table = Table(title="cloud GPU time per camera at the current cloud share")
    for column in ("cloud share", "from", "requests per camera-hour", "GPU s per request", "GPU s per camera-hour",
                   "cameras per GPU"):  # fmt: skip
        table.add_column(column, justify="right")
    if share is None:
        table.add_row("unknown", "no switcher in edge.switcher_registry, no budget: pass --cloud-share", *["-"] * 4)
        return table
    requests = fps * 3600 * share.share
    if seconds_per_request is None:
        table.add_row(
            f"{share.share:.3f}", share.source, f"{requests:,.0f}", "pass --cloud-seconds-per-request", "-", "-"
        )
        return table
    gpu_s = requests * seconds_per_request
    per_gpu = "unbounded" if gpu_s == 0 else f"{math.floor(3600 / gpu_s)}"
    table.add_row(
        f"{share.share:.3f}", share.source, f"{requests:,.0f}", f"{seconds_per_request:g}", f"{gpu_s:,.0f}", per_gpu
    )
    return table
