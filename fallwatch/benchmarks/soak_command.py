"""`fallwatch bench soak`: the command; the run is in fallwatch.benchmarks.soak."""

from __future__ import annotations

from typing import Annotated

import typer

from core.logs import configure_logging
from core.settings import ConfigError


def bench_soak(
    minutes: Annotated[float, typer.Option(help="how long the pipeline runs")] = 10.0,
    cameras: Annotated[int, typer.Option(help="simulated cameras")] = 4,
    fps: Annotated[float, typer.Option(help="frames per second of each camera")] = 2.0,
    sample_s: Annotated[float, typer.Option(help="seconds between two rows of the table")] = 60.0,
) -> None:
    """The whole pipeline for N minutes: memory of each service and lag of each consumer over time."""
    if minutes <= 0 or cameras < 1 or fps <= 0 or sample_s <= 0:
        raise ConfigError("--minutes, --fps and --sample-s must be positive and --cameras at least 1")
    from fallwatch.benchmarks.soak import run_soak

    configure_logging("WARNING")
    run_soak(minutes, cameras, fps, sample_s)
