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
    "fps target / sampled / out",
    "behind (slots)",
    "to Kafka (mean / max)",
    "decoded / read",
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
        return [row["camera_id"], row["room"], row["state"], *[""] * 10, row["url"], ""]
    age = row.get("last_frame_age_s")
    delays = [row.get("send_delay_s"), row.get("send_delay_max_s")]
    return [
        row["camera_id"],
        row["room"],
        row["state"] + (f", behind for {row['behind_for_s']:g} s" if row.get("behind_for_s") else ""),
        f"{row['fps_target']:g} / {row['fps_sampled']:g} / {row['fps_out']:g}",
        str(row["behind"]),
        " / ".join("-" if delay is None else f"{delay:.2f} s" for delay in delays),
        f"{row['decoded']} / {row['frames_in']} ({row['decode']})",
        str(row["published"]),
        str(row["skipped_motion"]),
        str(row["dropped"]),
        str(row["failed"]),
        f"{row['reconnects']} ({row['stalls']})",
        "never" if age is None else f"{age:g} s ago",
        row["url"] + (f" (detect: {row['detect_url']})" if row.get("detect_url") else ""),
        row.get("last_error") or "",
    ]


@cameras_app.command("status")
def cameras_status(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per camera, one per line")] = False,
) -> None:
    """Each camera's state, fps sampled vs target, slots missed behind schedule, capture-to-send delay, decoded
    frames, motion skips, drops, reconnects and last frame age (from Redis)."""
    from rich.console import Console
    from rich.table import Table

    from core.settings import load_settings
    from producers.main import SECTIONS
    from producers.status import read_statuses, status_rows

    settings = load_settings(SECTIONS)
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
    Console(width=300).print(table)
