"""`fallwatch alerts ...`: registered in fallwatch.cli; heavy imports wait until a command runs."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

alerts_app = typer.Typer(no_args_is_help=True, help="Alerts and their delivery channels.")


@alerts_app.command("test")
def alerts_test(
    room: Annotated[str, typer.Option(help="the room the test alert is for")],
    timeout: Annotated[float, typer.Option(help="seconds each channel has to deliver")] = 30.0,
    ack_wait: Annotated[
        float, typer.Option(help="seconds to wait for someone to acknowledge it (dashboard or MQTT); 0: do not wait")
    ] = 0.0,
) -> None:
    """Fire drill: a clearly marked test alert through every configured channel, reported per channel.

    Needs the alerting service running. Exit status 1 when a channel did not deliver (or, with
    --ack-wait, nobody acknowledged). The drill is never a label.
    """
    from alerting.drill import run_drill
    from alerting.main import SECTIONS
    from core.entry import settings_with_logging

    if not room.strip():
        raise typer.BadParameter("the room must not be empty", param_hint="--room")
    settings = settings_with_logging(SECTIONS)
    alert, results = asyncio.run(run_drill(settings, room, timeout, ack_wait))
    typer.echo(f"fire drill {alert.alert_id} in room {room} (marked drill: not a real alert, never a label)")
    width = max(len(result.channel) for result in results)
    for result in results:
        typer.echo(f"  {result.channel:<{width}}  {'OK  ' if result.delivered else 'FAIL'}  {result.detail}")
    if not all(result.delivered for result in results):
        raise typer.Exit(1)
