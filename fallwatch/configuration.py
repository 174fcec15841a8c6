"""`fallwatch config show|check`: the settings in effect, where each value came from, secrets redacted.

The sources are the ones `core.settings` reads, highest priority first: environment variables, the
config file, a running local stack, the defaults. A value read from a `*_file` secret is never shown.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
import yaml
from pydantic import BaseModel, SecretStr

from alerting.main import SECTIONS as ALERTING_SECTIONS
from cloud_workers.main import SECTIONS as CLOUD_SECTIONS
from core.settings import (
    CONFIG_ENV,
    SECTIONS,
    SHARED_SECTIONS,
    LocalStackSource,
    Settings,
    load_settings,
    local_stack_state_file,
)
from core.urls import redact
from edge_workers.main import SECTIONS as EDGE_SECTIONS
from producers.main import SECTIONS as PRODUCER_SECTIONS

config_app = typer.Typer(no_args_is_help=True, help="The settings in effect: show them, or check them.")

ENV_PREFIX = "FALLWATCH_"
REDACTED = "***"
URL_LIST_KEYS = {"webhook_urls", "escalation_webhook_urls"}


class Service(StrEnum):
    producer = "producer"
    edge = "edge"
    cloud = "cloud"
    alerting = "alerting"
    dashboard = "dashboard"
    dmd = "dmd"


SERVICE_SECTIONS: dict[Service, tuple[str, ...] | None] = {
    Service.producer: PRODUCER_SECTIONS,
    Service.edge: EDGE_SECTIONS,
    Service.cloud: CLOUD_SECTIONS,
    Service.alerting: ALERTING_SECTIONS,
    Service.dashboard: ALERTING_SECTIONS,
    Service.dmd: None,  # replays through both models and the alert rules: every section
}

ServiceOption = Annotated[
    Service | None, typer.Option("--service", "-s", help="only the sections this service reads (default: all)")
]


@dataclass(frozen=True)
class ShownSetting:
    key: str
    value: str
    source: str


def secret_keys(model: type[BaseModel]) -> set[str]:
    """Names of the secret fields anywhere in the settings: `SecretStr` ones and those kept out of reprs."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        candidates = (annotation, *getattr(annotation, "__args__", ()))
        if not field.repr or SecretStr in candidates:
            names.add(name)
        for candidate in candidates:
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                names |= secret_keys(candidate)
    return names


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values; lists of mappings (cameras) by index, other lists as one value."""
    items: Iterable[tuple[str, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        items = ((str(index), item) for index, item in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat |= flatten(item, f"{prefix}.{key}" if prefix else str(key))
    return flat


def prefixes(key: str) -> list[str]:
    """`a.b.c` → `a.b.c`, `a.b`, `a`: a source that sets a whole section or list sets each value in it."""
    parts = key.split(".")
    return [".".join(parts[:end]) for end in range(len(parts), 0, -1)]


def environment_source(key: str) -> str | None:
    environment = {name.upper() for name in os.environ}
    for prefix in prefixes(key):
        name = ENV_PREFIX + prefix.upper().replace(".", "__")
        if name in environment:
            return f"env {name}"
    return None


def file_sources() -> list[tuple[str, dict[str, Any]]]:
    sources = []
    config = os.environ.get(CONFIG_ENV)
    if config and Path(config).is_file():
        sources.append((f"file {config}", flatten(yaml.safe_load(Path(config).read_text()) or {})))
    stack = LocalStackSource(Settings)()
    if stack:
        sources.append((f"local stack {local_stack_state_file()}", flatten(stack)))
    return sources


def shown_value(key: str, value: Any, secrets: set[str]) -> str:
    name = key.rsplit(".", 1)[-1]
    if name in secrets:
        return REDACTED if value else "(not set)"
    if (name == "url" or name.endswith("_url")) and isinstance(value, str):  # a camera's detect_url too
        return redact(value)
    if name in URL_LIST_KEYS and isinstance(value, list):
        # a webhook's path or query often is its credential (chat services' incoming webhooks)
        return json.dumps([f"{urlsplit(url).scheme}://{urlsplit(url).netloc}/{REDACTED}" for url in value])
    return value if isinstance(value, str) else json.dumps(value)


def explain(settings: Settings, sections: tuple[str, ...] | None) -> list[ShownSetting]:
    """Every setting of `sections` (None: all) with its value and the source it came from."""
    dumped = settings.model_dump(mode="json")
    if sections is not None:
        unused = SECTIONS - SHARED_SECTIONS - set(sections)
        dumped = {key: value for key, value in dumped.items() if key not in unused}
    secrets = secret_keys(Settings)
    sources = file_sources()
    shown = []
    for key, value in flatten(dumped).items():
        source = environment_source(key)
        for name, flat in sources:
            if source is None and any(prefix in flat for prefix in prefixes(key)):
                source = name
        shown.append(ShownSetting(key, shown_value(key, value, secrets), source or "default"))
    return shown


@config_app.command("show")
def config_show(service: ServiceOption = None) -> None:
    """Print every setting in effect, where it came from (env, file, local stack, default); secrets redacted."""
    sections = SERVICE_SECTIONS[service] if service else None
    rows = explain(load_settings(sections), sections)
    key_width = max(len(row.key) for row in rows)
    value_width = min(60, max(len(row.value) for row in rows))
    for row in rows:
        typer.echo(f"{row.key:<{key_width}}  {row.value:<{value_width}}  # {row.source}")


@config_app.command("check")
def config_check(service: ServiceOption = None) -> None:
    """Validate the settings (of one service, or all) and any secret files they name; exit 2 on a mistake."""
    sections = SERVICE_SECTIONS[service] if service else None
    load_settings(sections)
    config = os.environ.get(CONFIG_ENV)
    scope = f"the {service.value} service's sections" if service else "every section"
    typer.echo(f"settings OK ({scope}; config file: {config or 'none'})")
