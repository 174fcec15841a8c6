"""Prometheus plumbing shared by the services: one registry per service instance and its /metrics server.

A registry of its own (not the process-global one) keeps several workers in one
process (tests, benchmarks) from sharing counters, and `/metrics` shows exactly one.
"""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


class ServedMetrics:
    """A registry and, optionally, the HTTP server of its /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None

    def serve(self, port: int | None) -> None:
        """Serve /metrics on `port` (None or 0: not served)."""
        if not port:
            return
        self._server, _thread = start_http_server(port, registry=self.registry)
        log.info("metrics on http://0.0.0.0:%d/metrics", port)

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 when it was never set), e.g. for tests and benchmarks."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
