"""`fallwatch bench capacity`: the command; the measurements are in fallwatch.benchmarks.capacity.

Kept free of torch and transformers imports, so registering it costs `fallwatch` nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.settings import ConfigError


def bench_capacity(
    fps: Annotated[float, typer.Option(help="frames per second each camera publishes (after motion skipping)")] = 2.0,
    model_dir: Annotated[
        Path | None,
        typer.Option(help="an edge checkpoint to measure (default: ViLT-B/32's real architecture, random weights)"),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="frames per forward, as edge.batch_size")] = 8,
    rounds: Annotated[int, typer.Option(help="interleaved timed rounds of every option (the median is used)")] = 3,
    cloud_share: Annotated[
        float | None,
        typer.Option(
            help="share of frames offloaded (default: the newest switcher's test share, capped by the budget)"
        ),
    ] = None,
    cloud_seconds_per_request: Annotated[
        float | None,
        typer.Option(help="GPU seconds of one cloud request, as measured on your GPU (bench cloud, or the worker)"),
    ] = None,
) -> None:
    """Cameras one edge box carries at --fps per CPU option (fp32, int8, bf16), and cloud GPU time per camera-hour."""
    if fps <= 0:
        raise ConfigError("--fps must be above 0")
    if min(batch_size, rounds) < 1:
        raise ConfigError("--batch-size and --rounds must be at least 1")
    if cloud_share is not None and not 0 <= cloud_share <= 1:
        raise ConfigError("--cloud-share must be between 0 and 1")
    if cloud_seconds_per_request is not None and cloud_seconds_per_request <= 0:
        raise ConfigError("--cloud-seconds-per-request must be above 0")
    if model_dir is not None and not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model-dir {model_dir} holds no checkpoint (config.json)")
    from core.logs import configure_logging
    from fallwatch.benchmarks.capacity import run_benchmark

    configure_logging("WARNING")
    run_benchmark(fps, model_dir, batch_size, rounds, cloud_share, cloud_seconds_per_request)
