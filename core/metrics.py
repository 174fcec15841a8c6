"""Prometheus plumbing shared by the services: one registry per service instance and its HTTP server.

A registry of its own (not the process-global one) keeps several workers in one
process (tests, benchmarks) from sharing counters, and `/metrics` shows exactly one.
The same port answers `/healthz` (the container healthcheck, `fallwatch health`).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from core.settings import ConfigError

log = logging.getLogger(__name__)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def port_error(setting: str, port: int, error: OSError) -> ConfigError:
    """A port the service cannot listen on, as one line naming the setting."""
    if error.errno == errno.EADDRINUSE:
        return ConfigError(f"{setting}: port {port} is already in use (another service, or a second copy)")
    return ConfigError(f"{setting}: cannot listen on port {port}: {error.strerror}")


def listening_socket(host: str, port: int, setting: str) -> socket.socket:
    """A TCP socket listening on host:port for a web server to take over; a port in use names `setting`."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise port_error(setting, port, exc) from None
    sock.listen(128)
    return sock


class QuietHandler(WSGIRequestHandler):
    """No line per scrape in the service's log."""

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes are not logged."""


def with_healthz(metrics_app: WsgiApp) -> WsgiApp:
    """`/healthz` answers `ok` while the process serves; every other path is the metrics."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n"]
        return metrics_app(environ, start_response)

    return app


class ServedMetrics:
    """A registry and, optionally, the HTTP server of its /metrics and /healthz."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None

    def serve(self, port: int | None, setting: str) -> None:
        """Serve /metrics and /healthz on `port` (None or 0: not served); `setting` names it in errors."""
        if not port:
            return
        try:
            server = make_server(
                "0.0.0.0", port, with_healthz(make_wsgi_app(self.registry)), ThreadingWSGIServer, QuietHandler
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"{setting}: port {port} is already in use (another service, or a second copy)"
                ) from None
            raise ConfigError(f"{setting}: cannot serve metrics on port {port}: {exc.strerror}") from None
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        self._server = server
        log.info("metrics on http://0.0.0.0:%d/metrics (%s)", port, setting)

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 when it was never set), e.g. for tests and benchmarks."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
