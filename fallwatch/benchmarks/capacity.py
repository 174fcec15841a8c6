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
import functools
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from core.images import decode_known_jpeg_rgb
from core.settings import Settings, load_settings
from edge_workers.model import EdgeBatch, ViltEdgeModel, quantized_int8
from edge_workers.switcher import latest_version, load_switcher
from fallwatch.benchmarks.kit import alternating, bench_table, camera_jpegs, cpu_seconds, seconds_of, show
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
        wall, cpu = time.perf_counter(), cpu_seconds()
        output = model.infer(inputs)
        return time.perf_counter() - wall, cpu_seconds() - cpu, output


def measure_options(model: ViltEdgeModel, inputs: dict[str, torch.Tensor], rounds: int) -> list[OptionTiming]:
    int8 = ViltEdgeModel(quantized_int8(copy.deepcopy(model.model)), model.processor, model.question, model.name)
    bf16 = ViltEdgeModel(model.model, model.processor, model.question, model.name, bf16_autocast=True)
    models = dict(zip(OPTIONS, (model, int8, bf16), strict=True))
    runs = alternating({option: functools.partial(timed, candidate, inputs) for option, candidate in models.items()},
                       rounds, warm_up=True)  # fmt: skip
    outputs = {option: option_runs[-1][2].fall_probability for option, option_runs in runs.items()}
    frames = len(outputs["fp32"])
    return [
        OptionTiming(
            option,
            statistics.median(wall for wall, _, _ in runs[option]) / frames,
            statistics.median(cpu for _, cpu, _ in runs[option]) / frames,
            float(np.max(np.abs(outputs[option] - outputs["fp32"]))),
        )
        for option in OPTIONS
    ]


def per_frame_other_s(model: ViltEdgeModel, jpegs: list[bytes], repeats: int = 3) -> tuple[float, float]:
    """Seconds per frame of JPEG decoding and of ViLT pre-processing (median of `repeats`)."""
    images = [decode_known_jpeg_rgb(jpeg) for jpeg in jpegs]
    times = alternating({
        "decode": lambda: seconds_of(lambda: [decode_known_jpeg_rgb(jpeg) for jpeg in jpegs]),
        "preprocess": lambda: seconds_of(lambda: model.preprocess(images)),
    }, repeats)  # fmt: skip
    return statistics.median(times["decode"]) / len(jpegs), statistics.median(times["preprocess"]) / len(jpegs)


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
    model = load_model(model_dir, settings.edge.question)
    jpegs = camera_jpegs(batch_size)
    images = [decode_known_jpeg_rgb(jpeg) for jpeg in jpegs]
    decode_s, preprocess_s = per_frame_other_s(model, jpegs)
    timings = measure_options(model, model.preprocess(images), rounds)
    show(
        f"edge box: this machine, {torch.get_num_threads()} torch threads; {model.name}; batches of {len(jpegs)} "
        f"{images[0].shape[1]}×{images[0].shape[0]} frames; {rounds} interleaved rounds. Other work on this machine "
        "slows every option alike: the ratios hold, the absolute numbers need a quiet rerun.",
        edge_table(timings, fps, decode_s + preprocess_s),
        cloud_table(fps, current_cloud_share(settings, cloud_share), cloud_seconds_per_request),
    )


def edge_table(timings: list[OptionTiming], fps: float, other_s: float) -> Table:
    table = bench_table(
        f"cameras one edge box carries at {fps:g} fps per camera "
        f"(per frame: forward + {other_s * 1000:.1f} ms decode and pre-processing)",
        ("CPU option", "forward ms/frame", "CPU ms/frame", "speed vs fp32", "max |ΔP(fall)|", "frames/s",
         f"cameras at {fps:g} fps"),
        labels=1,
    )  # fmt: skip
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
    table = bench_table(
        "cloud GPU time per camera at the current cloud share",
        ("cloud share", "from", "requests per camera-hour", "GPU s per request", "GPU s per camera-hour",
         "cameras per GPU"),
    )  # fmt: skip
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
