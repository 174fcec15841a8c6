"""`fallwatch bench drift`: the command; the run is in fallwatch.benchmarks.drift."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.entry import settings_with_logging
from core.settings import ConfigError


def bench_drift(
    clips: Annotated[list[Path], typer.Option(help="a folder with clips.csv: one camera (repeatable)")],
    seconds: Annotated[float, typer.Option(help="how long each camera streams")] = 90.0,
) -> None:
    """Seconds until the drift guard flags a camera of a room the running pair never saw."""
    for folder in clips:
        if not (folder / "clips.csv").is_file():
            raise ConfigError(f"{folder / 'clips.csv'} not found: --clips needs a folder with clips.csv")
    from fallwatch.benchmarks.drift import bench_drift_run, markdown

    settings = settings_with_logging()
    results, calibration, test_rows = bench_drift_run(settings, clips, seconds)
    typer.echo(markdown(results, calibration, test_rows, settings))
