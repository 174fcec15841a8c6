"""A command's entry, shared by `fallwatch` and each service's `python -m <package>`.

A user mistake (bad config, missing file, unreachable stack) prints one line
and exits with status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer

from core.logs import configure_logging
from core.runtime import exit_on_sigterm
from core.settings import ConfigError, Settings, load_settings


def settings_with_logging() -> Settings:
    settings = load_settings()
    configure_logging(settings.log_level)
    return settings


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    exit_on_sigterm()
    # click itself turns usage errors into one line and exit status 2; our own mistakes are ConfigErrors
    try:
        app(args=argv)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


def run_command(command: Callable[..., None], argv: list[str] | None = None) -> None:
    """One command as the whole program (`python -m edge_workers`); its docstring is the help."""
    app = typer.Typer(add_completion=False)
    app.command()(command)
    run_app(app, argv)
