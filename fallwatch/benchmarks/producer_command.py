"""`fallwatch bench producer`: the command; the measurements are in fallwatch.benchmarks.producer.

Kept free of OpenCV imports, so registering it costs `fallwatch` nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.settings import ConfigError

DEFAULT_VIDEOS = (
    Path("../shared/datasets/fall-clips/gmdcsa24_s1_fall13_backward_fall.mp4"),  # 640×480, 30 fps
    Path("../shared/datasets/fall-clips/gmdcsa24_s1_adl10_walking_reading.mp4"),  # 1280×720, 30 fps
)


def bench_producer(
    videos: Annotated[list[Path] | None, typer.Option("--video", help="videos to play as cameras")] = None,
    seconds: Annotated[float, typer.Option(help="measured time per row")] = 10.0,
    fps: Annotated[float, typer.Option(help="the producer's sampling rate")] = 2.0,
    rounds: Annotated[int, typer.Option(help="interleaved rounds of every decode path (the median is shown)")] = 2,
) -> None:
    """Producer: CPU and cameras per core at --fps for each decode path (all = today's, auto, keyframes)."""
    chosen = videos or list(DEFAULT_VIDEOS)
    missing = [str(v) for v in chosen if not v.is_file()]
    if missing:
        raise ConfigError(f"video not found: {', '.join(missing)} (pass --video FILE)")
    if seconds <= 0 or fps <= 0 or rounds < 1:
        raise ConfigError("--seconds and --fps must be positive, --rounds at least 1")
    from core.logs import configure_logging
    from fallwatch.benchmarks.producer import run_benchmark

    configure_logging("WARNING")
    run_benchmark(chosen, seconds, fps, rounds)
