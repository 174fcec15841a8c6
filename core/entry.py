"""A command's entry, shared by `fallwatch` and each service's `python -m <package>`.

Every command takes `-h`/`--help` and `--config FILE` (before or after the subcommand); the
program takes `--version`. A user mistake (bad config, missing file, an unreachable broker or
Redis, a port in use) prints one line and exits with status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any

import typer
from aiokafka.errors import KafkaConnectionError
from redis.exceptions import ConnectionError as RedisConnectionError

from core.logs import configure_logging
from core.runtime import exit_on_sigterm
from core.settings import CONFIG_ENV, ConfigError, Settings, load_settings

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def settings_with_logging(sections: Iterable[str] | None = None) -> Settings:
    """The settings (only `sections` besides kafka and redis; None: all), and logging configured by them."""
    settings = load_settings(sections)
    configure_logging(settings.log_level)
    return settings


def program_version() -> str:
    try:
        return version("fallwatch")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def use_config(value: Path | None) -> None:
    if value is not None:
        # an environment variable, so services started as subprocesses read the same file
        os.environ[CONFIG_ENV] = str(value)


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"fallwatch {program_version()}")
        raise typer.Exit()


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", callback=use_config, is_eager=True, help=f"YAML settings file (also {CONFIG_ENV})"),
]
VersionOption = Annotated[
    bool, typer.Option("--version", callback=show_version, is_eager=True, help="Show the version and exit.")
]


def accepting_common_options(callback: Callable[..., None], version: bool) -> Callable[..., None]:
    """`callback` as a command that also takes `--config` (and `--version`), which it never sees."""
    if getattr(callback, "takes_common_options", False):
        return callback

    @functools.wraps(callback)
    def command(*args: Any, config: Path | None = None, version: bool = False, **kwargs: Any) -> None:
        callback(*args, **kwargs)

    signature = inspect.signature(callback, eval_str=True)
    extra = {"config": ConfigOption} | ({"version": VersionOption} if version else {})
    parameters = [
        *signature.parameters.values(),
        *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None if name == "config" else False,
                            annotation=annotation) for name, annotation in extra.items()),
    ]  # fmt: skip
    command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {**callback.__annotations__, **extra}
    command.takes_common_options = True  # type: ignore[attr-defined]
    return command


def with_common_options(app: typer.Typer, version: bool = False) -> None:
    """Every command of `app` and its sub-apps takes `--config` (its own commands `--version` too)."""
    for info in app.registered_commands:
        if info.callback is not None:
            info.callback = accepting_common_options(info.callback, version)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            with_common_options(group.typer_instance)


def run_app(app: typer.Typer, argv: list[str] | None = None, prog_name: str = "fallwatch") -> None:
    """Run a command tree: `-h` everywhere, `--config` on every command, mistakes as one line."""
    exit_on_sigterm()
    app.info.context_settings = {**CONTEXT_SETTINGS, **(app.info.context_settings or {})}
    with_common_options(app)
    try:
        status = app(args=argv, prog_name=prog_name, standalone_mode=False)
    except typer.TyperException as exc:  # a usage error: an unknown option or command, a value not allowed
        usage_error(exc)
    except ConfigError as exc:
        fail(str(exc))
    except KafkaConnectionError as exc:
        fail(f"Kafka is unreachable (kafka.bootstrap_servers): {exc}")
    except RedisConnectionError as exc:
        fail(f"Redis is unreachable (redis.url): {exc}")

    sys.exit(status if isinstance(status, int) else 0)


def usage_error(exc: typer.TyperException) -> None:
    context = getattr(exc, "ctx", None)
    if context is not None and not context.args and not context.params and context.command.no_args_is_help:
        typer.echo(context.get_help())  # a command group without its subcommand: its help, as click shows it
        sys.exit(2)
    message = exc.format_message().strip().replace("Value error, ", "")  # type: ignore[attr-defined]
    hint = f" (see {context.command_path} --help)" if context is not None else ""
    fail(f"{' '.join(message.split())}{hint}")


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    sys.exit(2)


def run_command(command: Callable[..., None], argv: list[str] | None = None) -> None:
    """One command as the whole program (`python -m edge_workers`); its docstring is the help."""
    app = typer.Typer(add_completion=False)
    app.command()(accepting_common_options(command, version=True))
    run_app(app, argv, prog_name=f"python -m {command.__module__.split('.')[0]}")
