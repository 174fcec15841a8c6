"""A local Prometheus (the Debian package) scraping services on this machine, with fallwatch's alert rules.

For checking the monitoring pack (deploy/prometheus/rules.yml, deploy/grafana/fallwatch.json)
against running services: the same rules, the same queries, static targets instead of the
compose file's DNS discovery. Started in its own session and stopped on every exit path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fallwatch.stack import StackError, free_port, stop_pid, wait_until

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "fallwatch.json"


@dataclass(frozen=True)
class Prometheus:
    url: str

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.load(response)
        if body["status"] != "success":
            raise StackError(f"Prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's series (vector results) or a scalar as one series."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]

    def ready(self) -> bool:
        """Prometheus answers queries (its API says 503 while it is still starting)."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=10) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def targets_up(self) -> dict[str, str]:
        return {target["labels"]["job"]: target["health"] for target in self.api("targets")["activeTargets"]}


def dashboard_queries(dashboard: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the Grafana dashboard."""
    panels = json.loads(dashboard.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel.get("targets", [])]


@contextmanager
def local_prometheus(targets: dict[str, int], workdir: Path, scrape_interval_s: float = 1.0) -> Iterator[Prometheus]:
    """Prometheus on a free local port scraping `targets` (job → port on 127.0.0.1), with the rules."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise StackError("prometheus is not installed (Debian: apt-get install -y prometheus)")
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(RULES, workdir / "rules.yml")
    config = {
        "global": {"scrape_interval": f"{scrape_interval_s:g}s", "evaluation_interval": f"{scrape_interval_s:g}s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]} for job, port in targets.items()
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        prometheus = Prometheus(f"http://127.0.0.1:{port}")
        wait_until(lambda: prometheus.ready() or process.poll() is not None, f"Prometheus ready on port {port}")
        if process.poll() is not None:
            raise StackError(f"Prometheus exited with {process.returncode}; see {log_path}")
        yield prometheus
    finally:
        stop_pid(process.pid)
