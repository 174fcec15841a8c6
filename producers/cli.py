"""`fallwatch cameras ...`: registered in fallwatch.cli; heavy imports wait until a command runs."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

cameras_app = typer.Typer(no_args_is_help=True, help="The cameras the producers stream.")

COLUMNS = (
    "camera",
    "room",
    "state",
    "fps target / in / out",
    "published",
    "skipped (motion)",
    "dropped",
    "failed",
    "reconnects (stalls)",
    "last frame",
    "url",
    "last error",
)


def table_cells(row: dict) -> list[str]:
    if "fps_in" not in row:  # no status: only what the config says
        return [row["camera_id"], row["room"], row["state"], "", "", "", "", "", "", "", row["url"], ""]
    age = row.get("last_frame_age_s")
    return [
        row["camera_id"],
        row["room"],
        row["state"],
        f"{row['fps_target']:g} / {row['fps_in']:g} / {row['fps_out']:g}",
        str(row["published"]),
        str(row["skipped_motion"]),
        str(row["dropped"]),
        str(row["failed"]),
        f"{row['reconnects']} ({row['stalls']})",
        "never" if age is None else f"{age:g} s ago",
        row["url"],
        row.get("last_error") or "",
    ]


@cameras_app.command("status")
def cameras_status(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per camera, one per line")] = False,
) -> None:
    """Each camera's state, fps in/out, motion skips, drops, reconnects and last frame age (from Redis)."""
    from rich.console import Console
    from rich.table import Table

    from core.settings import load_settings
    from producers.status import read_statuses, status_rows

    settings = load_settings()
    rows = status_rows(settings, asyncio.run(read_statuses(settings)))
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    if not rows:
        typer.echo("no cameras configured and none reporting")
        return
    table = Table(title="cameras")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*table_cells(row))
    Console(width=240).print(table)
