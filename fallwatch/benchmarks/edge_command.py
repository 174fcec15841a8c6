"""`fallwatch bench edge`: the command; the measurements are in fallwatch.benchmarks.edge.

Kept free of torch and transformers imports, so registering it costs `fallwatch` nothing.
"""

from __future__ import annotations

from typing import Annotated

import typer

from core.settings import ConfigError


def bench_edge(
    plumbing_frames: Annotated[int, typer.Option(help="frames through the worker with the null model")] = 4000,
    plumbing_passes: Annotated[int, typer.Option(help="timed plumbing passes (the median is reported)")] = 3,
    warmup_frames: Annotated[
        int, typer.Option(help="frames through a discarded first pass, so the broker's JVM is warm (0: none)")
    ] = 8000,
    vilt_frames: Annotated[int, typer.Option(help="frames per round of the real-size ViLT run")] = 8,
    rounds: Annotated[int, typer.Option(help="interleaved rounds of pipeline and raw loop")] = 12,
    batch_size: Annotated[int, typer.Option(help="the worker's batch size (and the raw loop's)")] = 8,
    options: Annotated[bool, typer.Option(help="also measure the CPU options of the ViLT forward")] = True,
    compile_model: Annotated[
        bool, typer.Option("--compile/--no-compile", help="include torch.compile (a minute or more to compile)")
    ] = False,
) -> None:
    """Edge worker: plumbing frames/s, real-size ViLT pipeline vs raw loop, switcher share, CPU options."""
    if min(plumbing_frames, plumbing_passes, vilt_frames, rounds, batch_size) < 1:
        raise ConfigError(
            "--plumbing-frames, --plumbing-passes, --vilt-frames, --rounds and --batch-size must be at least 1"
        )
    if warmup_frames < 0:
        raise ConfigError("--warmup-frames must be 0 or more")
    from core.logs import configure_logging
    from fallwatch.benchmarks.edge import run_benchmark

    configure_logging("WARNING")
    run_benchmark(
        plumbing_frames, plumbing_passes, warmup_frames, vilt_frames, rounds, batch_size, options, compile_model
    )
