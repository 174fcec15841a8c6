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
) -> None:
    """Event tables before and after facility adaptation (pooled held-out clips, intervals by clip)."""
    if not (clips / "clips.csv").is_file():
        raise ConfigError(f"{clips / 'clips.csv'} not found: --clips needs a folder with clips.csv")
    from fallwatch.benchmarks.adaptation import Study, markdown_tables, write_study

    settings = settings_with_logging()
    started = time.perf_counter()
    result = Study(settings, clips, report / "work").run(protocol, caregiver, gate_only)
    write_study(result, report / "report.json")
    table = markdown_tables(result)
    (report / "report.md").write_text(table)
    typer.echo(table)
    for gate in result.gates:
        typer.echo(f"gate: {gate}")
    typer.echo(f"[bench adaptation: {time.perf_counter() - started:.0f} s]")
