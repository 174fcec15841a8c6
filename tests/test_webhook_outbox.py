"""Crash-safe webhooks: a delivery still being retried when alerting is killed (-9) is made after its restart,
once: the outbox in Redis holds it, not the dead process's memory."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from alerting.channels.webhook import WebhookChannel
from alerting.metrics import AlertingMetrics
from alerting.notifications import Notifier
from alerting.store import AlertStore
from core.settings import Settings
from fallwatch.stack import StackState
from tests.alerting_helpers import (
    WEBHOOK_SECRET,
    QuietHandler,
    WebhookReceiver,
    alerting_settings,
    alerting_worker,
    alerts_of,
    an_open_alert,
    http_server,
    make_verdict,
    send_verdicts,
    unique_camera,
    wait_for,
)
from tests.conftest import REPO, until, write_config


def test_a_pending_webhook_survives_kill_9_and_is_delivered_once(stack_state: StackState, tmp_path: Path) -> None:
    with WebhookReceiver(WEBHOOK_SECRET).running() as receiver:
        settings = alerting_settings(
            stack_state,
            tmp_path,
            webhook_urls=[f"{receiver.url}/alerts"],
            webhook_secret=WEBHOOK_SECRET,
            webhook_backoff_s=5.0,  # the retry after the receiver's first refusal is due well after the kill
            webhook_attempts=3,
        )
        env = write_config(settings, tmp_path / "alerting.yaml")
        log_path = tmp_path / f"alerting-{uuid.uuid4().hex[:4]}.log"
        with log_path.open("wb") as log_file:
            first = subprocess.Popen(
                [sys.executable, "-m", "alerting"], cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            camera = unique_camera("outbox")
            send_verdicts(settings, [make_verdict(camera, seq, fall=True) for seq in range(3)])
            (alert,) = alerts_of(settings, camera)
            wait_for(lambda: receiver.received("/alerts", alert.alert_id), "the first (refused) try")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        assert [d.status for d in receiver.received("/alerts", alert.alert_id)] == [503], "killed before the retry"
        with alerting_worker(settings, tmp_path):
            wait_for(
                lambda: any(d.status == 200 for d in receiver.received("/alerts", alert.alert_id)),
                "the retry, made by the restarted worker",
                timeout_s=60,
            )
            statuses = [d.status for d in receiver.received("/alerts", alert.alert_id)]
        assert statuses.count(200) == 1, f"delivered once: {statuses}"
        assert all(d.signature_valid for d in receiver.received("/alerts", alert.alert_id))


def test_a_receiver_that_hangs_does_not_hold_up_the_next_alert_to_another(
    stack_state: StackState, tmp_path: Path
) -> None:
    """One receiver holds a delivery open; an escalation due meanwhile goes to the other receiver at once, not
    after the first pass over the outbox ends."""
    release = threading.Event()
    received: list[str] = []

    class Receivers(QuietHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append(self.path)
            if self.path == "/hangs":
                release.wait(120)
            self.reply(200)

    hanging, _ = an_open_alert("hanging")
    escalated, _ = an_open_alert("escalated")

    async def scenario(settings: Settings) -> list[str]:
        store = AlertStore(settings.redis, settings.alerting.stream_maxlen)
        channel = WebhookChannel(settings, store, AlertingMetrics(), Notifier(settings.alerting))
        try:
            await channel.alert_changed(hanging)
            await until(lambda: "/hangs" in received, "the delivery the receiver holds open")
            await channel.escalated(escalated)
            await until(lambda: "/answers" in received, "the escalation while the other delivery hangs", 20)
            return list(received)
        finally:
            release.set()
            await channel.close()
            await store.close()

    with http_server(Receivers) as url:
        settings = alerting_settings(
            stack_state,
            tmp_path,
            webhook_urls=[f"{url}/hangs"],
            escalation_webhook_urls=[f"{url}/answers"],
            webhook_secret=WEBHOOK_SECRET,
            webhook_timeout_s=120.0,  # the hanging delivery outlasts the test unless released
        )
        try:
            assert asyncio.run(scenario(settings)) == ["/hangs", "/answers"]
        finally:
            release.set()  # before the server stops: it waits for its request threads
