"""`fallwatch health SERVICE`: the container healthcheck, a GET of the service's own /healthz.

Each service answers /healthz on its metrics port (the dashboard on its web port) while it runs,
so the probe reads the same settings as the service and needs no tool beyond Python in the image.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from enum import StrEnum
from typing import Annotated

import typer

from core.entry import settings_with_logging
from core.settings import ConfigError, Settings

PROBE_TIMEOUT_S = 5.0


class ProbedService(StrEnum):
    producer = "producer"
    edge = "edge"
    cloud = "cloud"
    alerting = "alerting"
    dashboard = "dashboard"


SECTION = {
    ProbedService.producer: "producers",
    ProbedService.edge: "edge",
    ProbedService.cloud: "cloud",
    ProbedService.alerting: "alerting",
    ProbedService.dashboard: "alerting",
}


def health_port(settings: Settings, service: ProbedService) -> tuple[int, str]:
    """The port the service answers /healthz on, and the setting that names it."""
    if service is ProbedService.dashboard:
        return settings.alerting.dashboard_port, "alerting.dashboard_port"
    section = SECTION[service]
    port = getattr(settings, section).metrics_port
    if not port:
        raise ConfigError(f"{section}.metrics_port is off: the {service.value} service has no /healthz to probe")
    return port, f"{section}.metrics_port"


def health(
    service: Annotated[ProbedService, typer.Argument(help="the service to probe, on this host")],
    host: Annotated[str, typer.Option(help="where the service runs")] = "127.0.0.1",
) -> None:
    """Probe a running service's /healthz (exit 0 when it answers, 1 when not): the container healthcheck."""
    port, setting = health_port(settings_with_logging((SECTION[service],)), service)
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:
            typer.echo(f"{service.value}: {response.read().decode().strip() or 'ok'} ({url})")
    except (urllib.error.URLError, OSError) as exc:
        typer.echo(f"{service.value}: not healthy at {url} ({setting}): {exc}", err=True)
        raise typer.Exit(1) from None
