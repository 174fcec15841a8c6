"""Crash-safe webhooks: a delivery still being retried when alerting is killed (-9) is made after its restart,
once: the outbox in Redis holds it, not the dead process's memory."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alerting.channels.webhook import OPENED_EVENT, WebhookChannel, delivery_member
from alerting.metrics import AlertingMetrics
from alerting.notifications import Notifier
from alerting.store import (
    AlertStore,
    delivered_key,
    outbox_keepers_key,
    outbox_key,
    outbox_lease_key,
    outbox_payload_key,
)
from core.settings import Settings
from fallwatch.stack import StackState
from schemas import FallEvent
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


def two_workers_settings(stack_state: StackState, tmp_path: Path, url: str, **overrides: object) -> Settings:
    """One receiver at `url`; no retry comes due by itself during a test (the test makes it due)."""
    return alerting_settings(
        stack_state,
        tmp_path,
        webhook_urls=[f"{url}/alerts"],
        webhook_secret=WEBHOOK_SECRET,
        webhook_backoff_s=60.0,
        webhook_attempts=5,
        **overrides,
    )


@asynccontextmanager
async def two_webhook_workers(settings: Settings) -> AsyncIterator[tuple[WebhookChannel, WebhookChannel]]:
    """The webhook channels of two alerting workers on the same Redis, each with its own store and metrics."""
    stores = [AlertStore(settings.redis, settings.alerting.stream_maxlen) for _ in range(2)]
    a, b = (WebhookChannel(settings, store, AlertingMetrics(), Notifier(settings.alerting)) for store in stores)
    try:
        yield a, b
    finally:
        for channel in (a, b):
            await channel.close()
            await channel.store.close()


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


def test_after_redis_lost_the_outbox_every_worker_puts_back_its_own_retries_and_none_it_saw_finished(
    stack_state: StackState, tmp_path: Path
) -> None:
    """Two workers each retrying a delivery, and one delivery a worker queued but the other finished; Redis
    loses the outbox (restarted empty: the delivered marks go too). Each worker's next pass puts back its
    own retry, without any rebuild of the alert state, and the finished delivery is not sent again."""
    accepting: set[str] = set()
    statuses: list[tuple[str, int]] = []

    class Receiver(QuietHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            alert_id = self.headers.get("Idempotency-Key", "").rpartition(":")[0]
            status = 200 if alert_id in accepting else 503
            statuses.append((alert_id, status))
            self.reply(status)

    by_a, _ = an_open_alert("kept-by-a")
    by_b, _ = an_open_alert("kept-by-b")
    finished_by_b, _ = an_open_alert("finished-by-b")

    def received(alert: FallEvent) -> list[int]:
        return [status for alert_id, status in statuses if alert_id == alert.alert_id]

    async def scenario(settings: Settings) -> None:
        topic = settings.kafka.topics.fall_events
        async with two_webhook_workers(settings) as (a, b):
            members = {
                alert.alert_id: delivery_member(OPENED_EVENT, alert.alert_id, settings.alerting.webhook_urls[0])
                for alert in (by_a, by_b, finished_by_b)
            }

            async def retried_later(alert: FallEvent) -> bool:
                # the payload names its attempt only once the first try is over: a claim's lease moves
                # `due` as far, while that try is still in flight
                payload = await a.store.redis.hget(outbox_payload_key(topic), members[alert.alert_id])
                due = await a.store.redis.zscore(outbox_key(topic), members[alert.alert_id])
                return payload is not None and json.loads(payload)["attempt"] == 1 and due is not None

            await a.alert_changed(by_a)
            await a.alert_changed(finished_by_b)
            await b.alert_changed(by_b)
            for alert in (by_a, by_b, finished_by_b):
                await until(lambda alert=alert: retried_later(alert), f"the first try of {alert.alert_id} refused")
            # the retry of a delivery A queued comes due, and B's pass finishes it
            accepting.add(finished_by_b.alert_id)
            await a.store.redis.zadd(outbox_key(topic), {members[finished_by_b.alert_id]: time.time()})
            await b.outbox_pass()
            assert received(finished_by_b) == [503, 200]
            await a.outbox_pass()
            await b.outbox_pass()
            # Redis restarted empty: the outbox, its payloads, its keepers and the delivered marks are gone
            wiped = [outbox_key(topic), outbox_payload_key(topic), outbox_lease_key(topic), outbox_keepers_key(topic)]
            await a.store.redis.delete(*wiped, *(delivered_key(member) for member in members.values()))
            accepting.update({by_a.alert_id, by_b.alert_id})
            await a.outbox_pass()
            await b.outbox_pass()
            assert received(by_a) == [503, 200], "A's retry, put back by A"
            assert received(by_b) == [503, 200], "B's retry, put back by B"
            assert received(finished_by_b) == [503, 200], "finished before the loss: not sent again"
            assert await a.store.redis.zcard(outbox_key(topic)) == 0

    with http_server(Receiver) as url:
        asyncio.run(scenario(two_workers_settings(stack_state, tmp_path, url)))


def test_a_try_that_outlives_its_lease_leaves_the_delivery_to_the_worker_that_took_it_over(
    stack_state: StackState, tmp_path: Path
) -> None:
    """A's first try hangs past its lease (a stalled worker, or a clock behind B's); B claims the delivery and the
    receiver accepts it. A's try then ends refused: it must not reschedule what B finished, nor drop what B holds."""
    release = threading.Event()
    arrived: list[str] = []
    replied: list[int] = []

    class Receiver(QuietHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            first = not arrived
            arrived.append(self.path)
            if first:
                release.wait(120)
            replied.append(503 if first else 200)
            self.reply(replied[-1])

    alert, _ = an_open_alert("outlived-lease")

    def leases_lost(metrics: AlertingMetrics) -> float | None:
        return metrics.registry.get_sample_value("fallwatch_webhook_leases_lost_total")

    async def scenario(settings: Settings) -> None:
        topic = settings.kafka.topics.fall_events
        member = delivery_member(OPENED_EVENT, alert.alert_id, settings.alerting.webhook_urls[0])
        async with two_webhook_workers(settings) as (a, b):
            await a.alert_changed(alert)
            await until(lambda: len(arrived) == 1, "A's first try, held open by the receiver")
            await a.store.redis.zadd(outbox_key(topic), {member: time.time()})  # A's lease ran out
            await b.deliver_due()
            assert replied == [200], "B took the delivery over and the receiver accepted it"
            release.set()
            await until(lambda: leases_lost(a.metrics) == 1, "A's try refused, after its lease")
            assert replied == [200, 503]
            assert await a.store.redis.zscore(outbox_key(topic), member) is None, "not queued again by A"
            assert await a.store.redis.exists(delivered_key(member)) == 1
            assert await a.store.redis.hlen(outbox_lease_key(topic)) == 0

    with http_server(Receiver) as url:
        # A's held try ends only when the test releases it
        settings = two_workers_settings(stack_state, tmp_path, url, webhook_timeout_s=120.0)
        try:
            asyncio.run(scenario(settings))
        finally:
            release.set()  # before the server stops: it waits for its request threads
