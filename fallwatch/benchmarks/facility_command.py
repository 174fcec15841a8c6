"""`fallwatch bench facility`: the command; the run is in fallwatch.benchmarks.facility."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.logs import configure_logging
from core.settings import ConfigError

CLIPS = Path("../shared/datasets/fall-clips")


def bench_facility(
    cameras: Annotated[str, typer.Option(help="camera counts to try, comma-separated, e.g. 8,16,24,32")] = "8,16,24,32",
    clips: Annotated[Path, typer.Option(help="a folder of .mp4 clips, replicated over the cameras")] = CLIPS,
    fps: Annotated[float, typer.Option(help="sampling rate of every camera")] = 2.0,
    offload: Annotated[float, typer.Option(help="share of frames the edge sends to the cloud (offload budget)")] = 0.15,
    seconds: Annotated[float, typer.Option(help="measured time per camera count")] = 60.0,
    warmup_s: Annotated[float, typer.Option(help="time before measuring, per camera count")] = 15.0,
) -> None:
    """The whole pipeline on this machine with N file cameras: published vs expected, edge lag, capture → final
    verdict p50/p95 and producer CPU per N (the largest N meeting the goals is the machine's capacity)."""
    try:
        counts = [int(count) for count in cameras.split(",")]
    except ValueError:
        raise ConfigError(f"--cameras takes counts like 8,16,24, not {cameras!r}") from None
    videos = sorted(clips.glob("*.mp4")) if clips.is_dir() else []
    if not videos:
        raise ConfigError(f"no .mp4 clips in {clips} (pass --clips FOLDER)")
    if min(counts) < 1 or fps <= 0 or not 0 <= offload <= 1 or seconds < 10 or warmup_s < 0:
        raise ConfigError("--cameras at least 1, --fps positive, --offload within 0..1, --seconds at least 10")
    from fallwatch.benchmarks.facility import run_facility

    configure_logging("WARNING")
    run_facility([video.resolve() for video in videos], counts, fps, offload, seconds, warmup_s)
