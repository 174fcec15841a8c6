"""Crash-safe webhooks: a delivery still being retried when alerting is killed (-9) is made after its restart,
once: the outbox in Redis holds it, not the dead process's memory."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

from fallwatch.stack import StackState
from tests.alerting_helpers import (
    WEBHOOK_SECRET,
    WebhookReceiver,
    alerting_settings,
    alerting_worker,
    alerts_of,
    make_verdict,
    send_verdicts,
    unique_camera,
    wait_for,
)
from tests.conftest import REPO, write_config


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
