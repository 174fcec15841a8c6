"""The monitoring pack against a running test stack: a real Prometheus scrapes every service.

Producer, edge worker, cloud worker, alerting and the dashboard run as their own processes
on real Kafka + Redis with tiny models that say "fall", so alerts open, webhooks fail (to a
closed port), a caregiver answers one and malformed records go to dead-letters. Then every
query of deploy/grafana/fallwatch.json must return a series, and every metric the dashboard
and deploy/prometheus/rules.yml name must be one the services export: renaming a metric
without the dashboard fails here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

from core.kafka_io import make_producer
from fallwatch.monitoring import DASHBOARD, RULES, Prometheus, dashboard_queries, local_prometheus
from fallwatch.stack import free_port
from tests.alerting_helpers import wait_for
from tests.conftest import fall_saying_models, service_process, settings_for

TOKEN = "monitoring-test-token"
DEADLINE_S = 180.0
METRIC_NAME = re.compile(r"\bfallwatch_[a-z0-9_]+")


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 15 rules found" in result.stdout


async def send_malformed(settings, *topics: str) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for topic in topics:
            await producer.send_and_wait(topic, key=b"cam-mon", value=b"{not json")
    finally:
        await producer.stop()


def dashboard_api(port: int, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def open_alert_ids(port: int) -> list[str]:
    rooms = dashboard_api(port, "/api/alerts")["rooms"]
    return [alert["alert_id"] for alerts in rooms.values() for alert in alerts if alert["state"] == "open"]


def test_every_dashboard_query_returns_a_series_from_the_running_services(
    stack_state, tmp_path: Path, tiny_models, clip_path
) -> None:
    models = fall_saying_models(tiny_models, tmp_path / "models")
    ports = {job: free_port() for job in ("producers", "edge", "cloud", "alerting", "dashboard")}
    closed_port = free_port()  # nobody listens: every webhook fails
    camera = {"id": "cam-mon", "room": "101", "url": str(clip_path), "fps": 4.0, "loop": True,
              "motion": {"enabled": False}}  # fmt: skip
    sections = models.settings_sections()
    sections["edge"].update(metrics_port=ports["edge"], batch_size=4, exploration_rate=0.5, exploration_seed=0,
                            max_offload_ratio=0.9)  # fmt: skip
    sections["cloud"].update(metrics_port=ports["cloud"], batch_size=4, num_frames=4, torch_threads=1)
    settings = settings_for(
        stack_state,
        tmp_path,
        producers={"cameras": [camera], "metrics_port": ports["producers"]},
        alerting={
            "metrics_port": ports["alerting"], "k": 2, "n": 3, "webhook_urls": [f"http://127.0.0.1:{closed_port}/hook"],
            "webhook_secret": "s3cret", "webhook_attempts": 1, "webhook_timeout_s": 1.0, "escalate_after_s": 1.0,
            "dashboard_port": ports["dashboard"], "dashboard_token": TOKEN,
        },
        **sections,
    )  # fmt: skip
    queries = dashboard_queries()
    assert len(queries) >= 30
    with contextlib.ExitStack() as services:
        services.enter_context(service_process("edge_workers", settings, tmp_path))
        services.enter_context(service_process("cloud_workers", settings, tmp_path))
        services.enter_context(service_process("alerting", settings, tmp_path))
        services.enter_context(service_process("fallwatch", settings, tmp_path, "dashboard"))
        services.enter_context(service_process("producers", settings, tmp_path))
        prometheus: Prometheus = services.enter_context(local_prometheus(ports, tmp_path / "prometheus"))
        deadline = time.monotonic() + DEADLINE_S
        wait_for(lambda: set(prometheus.targets_up().values()) == {"up"} and len(prometheus.targets_up()) == 5,
                 "every service to be scraped", deadline - time.monotonic())  # fmt: skip
        topics = settings.kafka.topics
        asyncio.run(send_malformed(settings, topics.frames, topics.cloud_requests, topics.verdicts))
        [alert_id, *_] = wait_for(
            lambda: open_alert_ids(ports["dashboard"]), "an alert from the falls", deadline - time.monotonic()
        )
        dashboard_api(ports["dashboard"], f"/api/alerts/{alert_id}/acknowledge", {"by": "nurse"})
        dashboard_api(ports["dashboard"], f"/api/alerts/{alert_id}/false-alarm", {"by": "nurse"})

        empty = [f"{title}: {expr}" for title, expr in queries]
        while empty and time.monotonic() < deadline:
            empty = [f"{title}: {expr}" for title, expr in queries if not prometheus.query(expr)]
            time.sleep(0.5)  # polling Prometheus until the series have been scraped
        assert empty == [], "every dashboard query returns a series"
        exported = set(prometheus.api("label/__name__/values"))
    named = set(METRIC_NAME.findall(DASHBOARD.read_text())) | set(METRIC_NAME.findall(RULES.read_text()))
    assert named - exported == set(), "the dashboard and the rules name only metrics the services export"
    assert {"fallwatch_cloud_consumer_lag", "fallwatch_alerting_consumer_lag", "fallwatch_edge_consumer_lag"} <= named
