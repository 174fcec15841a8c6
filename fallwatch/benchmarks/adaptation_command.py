"""`fallwatch bench adaptation`: the command; the study is in fallwatch.benchmarks.adaptation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

import typer

from core.entry import settings_with_logging
from core.settings import ConfigError


def bench_adaptation(
    clips: Annotated[Path, typer.Option(help="folder with clips.csv")],
    protocol: Annotated[
        Literal["leave-one-out", "halves"], typer.Option(help="leave one clip out, or two halves swapped")
    ] = "leave-one-out",
    caregiver: Annotated[bool, typer.Option(help="a simulated caregiver answers the running pair's alerts")] = False,
    report: Annotated[Path, typer.Option(help="where report.json and report.md go")] = Path("adaptation-report"),
    gate_only: Annotated[bool, typer.Option(help="each fold's gate verdict only: no held-out evaluation")] = False,
    seeds: Annotated[
        int, typer.Option(min=1, help="run the study this many times, the training seeds moved by 1 each time")
    ] = 1,
) -> None:
    """Event tables before and after facility adaptation (pooled held-out clips, intervals by clip)."""
    if not (clips / "clips.csv").is_file():
        raise ConfigError(f"{clips / 'clips.csv'} not found: --clips needs a folder with clips.csv")
    if seeds > 1 and gate_only:
        raise ConfigError("--seeds compares the held-out tables, which --gate-only does not make")
    from fallwatch.benchmarks.adaptation import Study, StudyResult, markdown_tables, seed_spread, with_seed, write_study

    settings = settings_with_logging()
    started = time.perf_counter()
    results: dict[int, StudyResult] = {}
    for offset in range(seeds):
        seeded = with_seed(settings, offset)
        # one seed: the report where it always was; several: one folder per seed and the spread beside them
        folder = report if seeds == 1 else report / f"seed-{seeded.dmd.adapt.seed}"
        result = Study(seeded, clips, folder / "work").run(protocol, caregiver, gate_only)
        write_study(result, folder / "report.json")
        table = markdown_tables(result)
        (folder / "report.md").write_text(table)
        typer.echo(table)
        for gate in result.gates:
            typer.echo(f"gate: {gate}")
        results[seeded.dmd.adapt.seed] = result
    if seeds > 1:
        spread = seed_spread(results)
        (report / "spread.md").write_text(spread)
        typer.echo(spread)
    typer.echo(f"[bench adaptation: {time.perf_counter() - started:.0f} s]")
