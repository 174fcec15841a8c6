"""The alerting service (`python -m alerting`) on the real stack, driven by real verdict records.

Most tests share one worker (faust start-up and the group join cost seconds)
with short deadlines (D = 2 s, E = 4 s) and webhooks to a real HTTP server of
the test; each test uses its own camera ids, so the tests stay independent of
each other and of their order.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from alerting.channels.redis_state import RedisChannel
from alerting.delivery import Dispatcher
from alerting.metrics import AlertingMetrics
from alerting.notifications import Notifier, link_is_valid, readable_duration
from alerting.rules import alert_id_for, rule_name
from alerting.store import ALERT_STREAM_KEY, AlertStore, alert_key, escalated_key, open_alert_key, room_down_key
from alerting.webhooks import WebhookSender, signature_is_valid
from core.kafka_io import MAX_MESSAGE_BYTES, create_topics, make_producer, topic_specs
from core.settings import CONFIG_ENV, AlertingSettings, RedisSettings, Settings
from fallwatch.stack import LocalStack, StackState, free_port, stop_pid
from schemas import DeadLetter, FallEvent, PersonDown, Verdict, decode, encode, utc_now
from tests.alerting_helpers import (
    WEBHOOK_SECRET,
    QuietHandler,
    WebhookReceiver,
    alerting_settings,
    alerting_worker,
    alerts_for,
    alerts_of,
    an_open_alert,
    body_alert_id,
    http_server,
    make_verdict,
    produce,
    read_until,
    send_events,
    send_verdicts,
    set_topic_configs,
    unique_camera,
    wait_for,
    wait_until_consumed,
)
from tests.conftest import REPO, read_all, until

CLOUD_WAIT_S = 2.0
DASHBOARD_TOKEN = "test-dashboard-token"
ESCALATE_AFTER_S = 4.0


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(WEBHOOK_SECRET).running() as running:
        yield running


@pytest.fixture(scope="module")
def shared_settings(
    stack_state: StackState, tmp_path_factory: pytest.TempPathFactory, receiver: WebhookReceiver
) -> Iterator[Settings]:
    """Settings of one worker that the tests below share, each with its own cameras."""
    tmp_path = tmp_path_factory.mktemp("alerting")
    settings = alerting_settings(
        stack_state,
        tmp_path,
        cloud_wait_s=CLOUD_WAIT_S,
        escalate_after_s=ESCALATE_AFTER_S,
        webhook_urls=[f"{receiver.url}/alerts"],
        escalation_webhook_urls=[f"{receiver.url}/escalations"],
        webhook_secret=WEBHOOK_SECRET,
        webhook_backoff_s=0.2,
        metrics_port=free_port(),
        dashboard_token=DASHBOARD_TOKEN,  # the key of the notifications' snapshot links
    )
    with alerting_worker(settings, tmp_path):
        yield settings


@pytest.fixture(scope="module")
def store(shared_settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(shared_settings.redis.url)
    yield client
    client.close()


def test_falls_open_one_alert_and_other_cameras_none(shared_settings: Settings, store: redis.Redis) -> None:
    settings = shared_settings
    falling, calm = unique_camera("falling"), unique_camera("calm")
    fall_verdicts = [make_verdict(falling, seq, fall=seq >= 1) for seq in range(5)]
    send_verdicts(settings, [*fall_verdicts, *(make_verdict(calm, seq, fall=False) for seq in range(6))])

    alerts_of(settings, falling)
    asyncio.run(wait_until_consumed(settings))
    events = asyncio.run(read_all(settings, settings.kafka.topics.fall_events, FallEvent))

    (alert,) = alerts_for(events, falling)
    assert alert.state == "open"
    assert alert.room == f"room-of-{falling}"
    assert alert.rule == "3 of 5"
    assert alert.evidence_frame_ids == [v.frame_id for v in fall_verdicts[1:4]]
    assert alerts_for(events, calm) == []

    wait_for(lambda: store.get(alert_key(alert.alert_id)), "the alert in Redis")
    assert decode(FallEvent, store.get(alert_key(alert.alert_id))) == alert
    assert store.get(open_alert_key(falling)) == alert.alert_id.encode()
    assert store.get(open_alert_key(calm)) is None


def test_a_sure_cloud_verdict_confirms_with_a_second_fall_and_the_person_down_state_is_published(
    shared_settings: Settings,
) -> None:
    settings = shared_settings
    camera = unique_camera("cloud")
    sure = make_verdict(camera, 0, fall=True, source="cloud", fall_probability=0.97)
    second = make_verdict(camera, 1, fall=True, source="edge", fall_probability=0.7)
    send_verdicts(settings, [sure])
    asyncio.run(wait_until_consumed(settings))
    assert alerts_for(asyncio.run(read_all(settings, settings.kafka.topics.fall_events, FallEvent)), camera) == []
    send_verdicts(settings, [second])
    (alert,) = alerts_of(settings, camera)
    assert (alert.rule, alert.evidence_frame_ids) == (
        "cloud p>=0.90 + a fall within 2 s",
        [sure.frame_id, second.frame_id],
    )

    # up again: three non-falls in a row
    send_verdicts(settings, [make_verdict(camera, seq, fall=False) for seq in (2, 3, 4)])
    topic = settings.kafka.topics.person_down
    changes = [
        change
        for change in asyncio.run(
            read_until(settings, topic, PersonDown, lambda got: len([c for c in got if c.camera_id == camera]) >= 2)
        )
        if change.camera_id == camera
    ]
    assert [(c.down, c.changed_at) for c in changes] == [(True, second.captured_at), (False, changes[1].changed_at)]
    assert changes[0].episode_id == alert.alert_id and changes[0].room == alert.room
    assert changes[1].since == make_verdict(camera, 2, fall=False).captured_at


def test_without_the_cloud_the_edge_decides_after_d_and_a_late_cloud_verdict_counts_once(
    shared_settings: Settings,
) -> None:
    settings = shared_settings
    camera = unique_camera("offloaded")
    provisional = [make_verdict(camera, seq, fall=True, final=False) for seq in (0, 1)]
    sent_at = utc_now()
    send_verdicts(settings, provisional)

    # nobody answers for the cloud: after D alerting publishes the edge's answers as final
    verdicts_topic = settings.kafka.topics.verdicts
    fallbacks = [
        v
        for v in asyncio.run(
            read_until(
                settings,
                verdicts_topic,
                Verdict,
                lambda got: len([v for v in got if v.camera_id == camera and v.source == "edge-fallback"]) >= 2,
            )
        )
        if v.camera_id == camera and v.source == "edge-fallback"
    ]
    assert sorted(v.frame_id for v in fallbacks) == [v.frame_id for v in provisional]
    assert all(v.final and v.decision for v in fallbacks)
    assert all(v.produced_at - sent_at >= timedelta(seconds=CLOUD_WAIT_S) for v in fallbacks), "waited D"

    # the cloud answers late and sure for the same frames: were they counted again, 4 falls (or the
    # sure cloud pair) would confirm; only 2 falls must stand
    send_verdicts(
        settings, [make_verdict(camera, seq, fall=True, source="cloud", fall_probability=0.99) for seq in (0, 1)]
    )
    asyncio.run(wait_until_consumed(settings))
    assert alerts_for(asyncio.run(read_all(settings, settings.kafka.topics.fall_events, FallEvent)), camera) == []

    third = make_verdict(camera, 2, fall=True)
    send_verdicts(settings, [third])
    (alert,) = alerts_of(settings, camera)
    assert alert.rule == "3 of 5 (edge-fallback)"
    assert alert.evidence_frame_ids == [*(v.frame_id for v in provisional), third.frame_id]
    asyncio.run(wait_until_consumed(settings))
    all_verdicts = asyncio.run(read_all(settings, verdicts_topic, Verdict))
    assert len([v for v in all_verdicts if v.camera_id == camera and v.source == "edge-fallback"]) == 2


def test_cooldown_after_a_false_alarm(shared_settings: Settings, store: redis.Redis) -> None:
    settings = shared_settings
    camera = unique_camera("cooldown")
    send_verdicts(settings, [make_verdict(camera, seq, fall=True) for seq in range(3)])
    (first,) = alerts_of(settings, camera)

    # a caregiver dismisses it (as the dashboard publishes it), when the newest frame is at 2 s
    send_events(settings, [first.model_copy(update={"state": "false_alarm", "updated_at": utc_now()})])
    asyncio.run(wait_until_consumed(settings, settings.kafka.topics.fall_events))
    wait_for(
        lambda: decode(FallEvent, store.get(alert_key(first.alert_id))).state == "false_alarm",
        "the false alarm in Redis",
    )
    assert store.get(open_alert_key(camera)) is None

    # the person gets up, and falls again: falls within the 60 s cooldown (capture time) open nothing,
    # the one after it does
    send_verdicts(settings, [make_verdict(camera, seq, fall=False) for seq in range(3, 6)])
    send_verdicts(settings, [make_verdict(camera, seq, fall=True) for seq in range(30, 62)])
    asyncio.run(wait_until_consumed(settings))
    assert [
        e.state
        for e in alerts_for(asyncio.run(read_all(settings, settings.kafka.topics.fall_events, FallEvent)), camera)
    ] == ["open", "false_alarm"]
    send_verdicts(settings, [make_verdict(camera, 62, fall=True)])
    events = alerts_of(settings, camera, count=3)
    assert events[2].state == "open" and events[2].alert_id != first.alert_id


def test_signed_webhook_is_retried_and_an_unacknowledged_alert_escalates(
    shared_settings: Settings, receiver: WebhookReceiver, store: redis.Redis
) -> None:
    settings = shared_settings
    ignored, answered = unique_camera("ignored"), unique_camera("answered")
    send_verdicts(settings, [make_verdict(c, seq, fall=True) for c in (ignored, answered) for seq in range(3)])
    (alert,) = alerts_of(settings, ignored)
    (acknowledged,) = alerts_of(settings, answered)
    send_events(settings, [acknowledged.model_copy(update={"state": "acknowledged", "updated_at": utc_now()})])

    # the receiver refused the first try (503) and accepted the retry; both signed, same idempotency key
    tries = wait_for(
        lambda: (d := receiver.received("/alerts", alert.alert_id)) and len(d) >= 2 and d, "the webhook retry"
    )
    assert [d.status for d in tries] == [503, 200]
    assert all(d.signature_valid and d.event == "alert.opened" for d in tries)
    assert {body_alert_id(d) for d in tries} == {alert.alert_id}
    body = json.loads(tries[1].body)
    assert FallEvent.model_validate({k: body[k] for k in FallEvent.model_fields}) == alert, "the alert's fields"
    # and a notification a person reads: one sentence, the room, the time down, a signed snapshot link
    assert body["message"] == f"Room {alert.room}: person down for {readable_duration(body['down_for_s'])} — " + (
        "seen in 3 of the last 5 frames"
    )
    assert body["room"] == alert.room and body["down_for_s"] >= 0 and not body["drill"]
    link = urllib.parse.urlsplit(body["snapshot_url"])
    assert link.path == f"/snapshots/{alert.alert_id}"
    query = dict(urllib.parse.parse_qsl(link.query))
    assert link_is_valid(DASHBOARD_TOKEN, alert.alert_id, int(query["expires"]), query["signature"], time.time())

    # nobody acknowledged the first alert: after E it goes to the escalation channel, once
    escalations = wait_for(
        lambda: (d := receiver.received("/escalations", alert.alert_id)) and any(x.status == 200 for x in d) and d,
        "the escalation",
        timeout_s=30,
    )
    assert all(d.signature_valid and d.event == "alert.escalated" for d in escalations)
    # its own idempotency key: a receiver deduping by it must not drop the escalation as a repeat
    assert {d.idempotency_key for d in tries} == {f"{alert.alert_id}:alert.opened"}
    assert {d.idempotency_key for d in escalations} == {f"{alert.alert_id}:alert.escalated"}
    escalated = json.loads(escalations[-1].body)
    assert escalated["escalated"] and "nobody has acknowledged it" in escalated["message"]
    stream = store.xrange(ALERT_STREAM_KEY)
    entries = [fields for _, fields in stream if fields[b"alert_id"] == alert.alert_id.encode()]
    assert [fields[b"kind"] for fields in entries] == [b"state", b"escalation"]
    messages = [json.loads(fields[b"notification"])["message"] for fields in entries]
    assert messages[0].startswith(f"Room {alert.room}: person down for ")
    assert "nobody has acknowledged it" in messages[1]
    # the acknowledged alert opened at the same time and was never escalated
    assert receiver.received("/escalations", acknowledged.alert_id) == []
    assert decode(FallEvent, store.get(alert_key(acknowledged.alert_id))).state == "acknowledged"


def test_redelivered_verdicts_open_one_alert(shared_settings: Settings) -> None:
    settings = shared_settings
    camera = unique_camera("twice")
    burst = [make_verdict(camera, seq, fall=True) for seq in range(4)]
    send_verdicts(settings, burst + burst)

    alerts_of(settings, camera)
    asyncio.run(wait_until_consumed(settings))
    (alert,) = alerts_for(asyncio.run(read_all(settings, settings.kafka.topics.fall_events, FallEvent)), camera)
    assert alert.alert_id == alert_id_for(camera, burst[0].frame_id)


def test_malformed_record_goes_to_dead_letters_and_the_stream_goes_on(shared_settings: Settings) -> None:
    settings = shared_settings
    camera = unique_camera("after-garbage")
    asyncio.run(produce(settings, settings.kafka.topics.verdicts, [(camera, b"not json")]))
    send_verdicts(settings, [make_verdict(camera, seq, fall=True) for seq in range(3)])

    dead_letters = asyncio.run(
        read_until(
            settings,
            settings.kafka.topics.dead_letters,
            DeadLetter,
            lambda got: any(d.key == camera.encode() for d in got),
        )
    )
    (dead,) = [d for d in dead_letters if d.key == camera.encode()]
    assert dead.service == "alerting"
    assert dead.source_topic == settings.kafka.topics.verdicts
    assert dead.size == len(b"not json")
    assert "invalid Verdict" in dead.reason
    alerts_of(settings, camera)


def test_metrics_count_what_happened(shared_settings: Settings) -> None:
    camera = unique_camera("metrics")
    send_verdicts(shared_settings, [make_verdict(camera, seq, fall=True) for seq in range(3)])
    alerts_of(shared_settings, camera)

    def scrape() -> dict[str, float]:
        url = f"http://127.0.0.1:{shared_settings.alerting.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            lines = response.read().decode().splitlines()
        values: dict[str, float] = {}
        for line in lines:
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = values.get(name, 0.0) + float(value)
        return values

    metrics = scrape()
    opened = sum(v for k, v in metrics.items() if k.startswith("fallwatch_alerts_opened_total{"))
    assert opened >= 1
    assert metrics["fallwatch_alert_time_to_alert_seconds_count"] == opened


def test_signature_check_rejects_tampering() -> None:
    from alerting.webhooks import sign

    body, timestamp = b'{"alert_id": "a"}', "1700000000"
    signature = sign("secret", timestamp, body)
    assert signature_is_valid("secret", timestamp, body, signature, now_s=1700000010)
    assert not signature_is_valid("secret", timestamp, body + b" ", signature, now_s=1700000010)
    assert not signature_is_valid("other", timestamp, body, signature, now_s=1700000010)
    assert not signature_is_valid("secret", timestamp, body, signature, now_s=1700001000), "a stale replay"


# --- tests with a worker of their own ---------------------------------------------------------------


def test_camera_state_survives_a_restart(stack_state: StackState, tmp_path: Path) -> None:
    settings = alerting_settings(stack_state, tmp_path)
    camera = unique_camera("restart")
    burst = [make_verdict(camera, seq, fall=True) for seq in range(3)]
    with alerting_worker(settings, tmp_path):
        send_verdicts(settings, burst)
        alerts_of(settings, camera)

    # the new worker recovers the camera's open alert and seen frames from the table's changelog
    with alerting_worker(settings, tmp_path):
        send_verdicts(settings, [*burst, make_verdict(camera, 3, fall=True)])
        asyncio.run(wait_until_consumed(settings))
    assert len(alerts_for(asyncio.run(read_all(settings, settings.kafka.topics.fall_events, FallEvent)), camera)) == 1


def test_alerts_reach_fall_events_while_redis_is_down_and_redis_when_it_returns(
    stack_state: StackState, tmp_path: Path
) -> None:
    # a private redis-server: the session's is shared by every test
    private = LocalStack(tmp_path / "private-redis", cache_dir=REPO / ".cache")
    private.state_dir.mkdir(parents=True)
    port = free_port()
    server = private.start_redis(port)
    settings = alerting_settings(stack_state, tmp_path)
    settings = settings.model_copy(update={"redis": RedisSettings(url=f"redis://127.0.0.1:{port}/0")})
    client = redis.Redis.from_url(settings.redis.url)
    before, during = unique_camera("before-outage"), unique_camera("during-outage")
    try:
        with alerting_worker(settings, tmp_path) as log_path:
            send_verdicts(settings, [make_verdict(before, seq, fall=True) for seq in range(3)])
            (first,) = alerts_of(settings, before)
            wait_for(lambda: client.get(alert_key(first.alert_id)), "the first alert in Redis")

            stop_pid(server.pid)
            send_verdicts(settings, [make_verdict(during, seq, fall=True) for seq in range(3)])
            (second,) = alerts_of(settings, during)  # on fall-events without Redis

            server = private.start_redis(port)  # empty: --save "" keeps nothing
            stored = wait_for(lambda: client.get(alert_key(second.alert_id)), "the alert in Redis after the outage")
            assert decode(FallEvent, stored) == second
            assert client.get(open_alert_key(during)) == second.alert_id.encode()
            # it was not written when it was made: the retry from fall-events wrote it
            assert f"could not write alert {second.alert_id} to Redis now" in log_path.read_text()
    finally:
        client.close()
        stop_pid(server.pid)


def test_webhook_sender_gives_up_on_a_refusal_at_once_and_on_a_dead_receiver_after_its_attempts(
    receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alert = FallEvent(
        alert_id=f"sender-{uuid.uuid4().hex[:6]}",
        camera_id="cam",
        room="1",
        state="open",
        opened_at=utc_now(),
        first_fall_at=utc_now(),
        confidence=0.9,
        evidence_frame_ids=["f"],
        rule="3 of 5",
    )
    wrong_secret = AlertingSettings(
        webhook_urls=[receiver.url], webhook_secret="not-the-receivers", webhook_attempts=3, webhook_backoff_s=0.05
    )
    dead_port = free_port()

    async def send_both() -> tuple[bool, bool]:
        sender = WebhookSender(wrong_secret)
        try:
            refused = await sender.deliver(f"{receiver.url}/alerts", "alert.opened", alert.alert_id, encode(alert))
            unreachable = await sender.deliver(
                f"http://127.0.0.1:{dead_port}/", "alert.opened", alert.alert_id, encode(alert)
            )
            return refused, unreachable
        finally:
            await sender.close()

    assert asyncio.run(send_both()) == (False, False)
    (refusal,) = receiver.received("/alerts", alert.alert_id)  # 401 is final: no retry
    assert (refusal.status, refusal.signature_valid) == (401, False)
    retries = [r for r in caplog.records if f":{dead_port}/" in r.getMessage() and "retrying" in r.getMessage()]
    assert len(retries) == 2, "three attempts: two retries, then it gives up"


def test_a_webhook_that_redirects_is_not_followed_and_not_counted_as_delivered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A POST redirected (an http URL behind a redirect to https, say) would arrive as a GET without the alert,
    and a 2xx there would count as delivered."""
    requests: list[tuple[str, str]] = []

    class Redirecting(QuietHandler):
        def do_POST(self) -> None:
            requests.append(("POST", self.path))
            self.reply(302, Location="/elsewhere")

        def do_GET(self) -> None:
            requests.append(("GET", self.path))
            self.reply(200)

    alert, _ = an_open_alert("redirected")

    async def send(url: str) -> bool:
        sender = WebhookSender(AlertingSettings(webhook_urls=[url], webhook_secret="s", webhook_attempts=3))
        try:
            return await sender.deliver(url, "alert.opened", alert.alert_id, encode(alert))
        finally:
            await sender.close()

    with http_server(Redirecting) as url:
        delivered = asyncio.run(send(f"{url}/hook"))
    assert not delivered
    assert requests == [("POST", "/hook")], "one try, the redirect not followed, nothing retried"
    refused = [r.getMessage() for r in caplog.records if "refused alert.opened" in r.getMessage()]
    assert len(refused) == 1 and "HTTP 302, a redirect to /elsewhere (not followed: set that URL)" in refused[0]


def table_rows(output: str) -> list[dict[str, list[str]]]:
    """Each printed table's rows: the first cell (the label) → the other cells."""
    tables: list[dict[str, list[str]]] = []
    for line in output.splitlines():
        if line.startswith("┏"):
            tables.append({})
        elif line.startswith("│"):
            label, *cells = (cell.strip() for cell in line.split("│")[1:-1])
            tables[-1][label] = cells
    return tables


def test_bench_alerting_prints_its_tables(stack_state: StackState) -> None:
    env = {
        **os.environ,
        "FALLWATCH_KAFKA__BOOTSTRAP_SERVERS": stack_state.bootstrap_servers,
        "FALLWATCH_REDIS__URL": stack_state.redis_url,
    }
    env.pop(CONFIG_ENV, None)
    result = subprocess.run(
        [sys.executable, "-m", "fallwatch", "bench", "alerting", "--cameras", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows, delivered = table_rows(result.stdout)
    defaults = AlertingSettings()
    down_row = f"{rule_name(defaults)} final edge falls at 2 fps"
    fallback_row = f"offloaded, cloud down: edge-fallback after D = {defaults.cloud_wait_s:g} s"
    assert defaults.confirm_within_s == 0, "the fast path is off by default: sure cloud verdicts wait like any"
    cloud_row = "sure cloud verdicts (p 0.95), fast path off: as k of n"
    paths = [cloud_row, down_row, fallback_row]
    assert list(rows) == ["baseline: one verdict's Kafka round trip", *paths]
    assert list(delivered) == paths, "the second table follows the same alerts, a row per path"
    for path, cells in delivered.items():
        to_event, to_mqtt, to_dashboard, mqtt_after, mqtt_max, dashboard_after, dashboard_max = map(float, cells)
        assert to_event == float(rows[path][1]), "the baseline column is the first table's median"
        # MQTT gets what the worker reads back from fall-events; Redis is written before the send (a few ms early)
        assert to_mqtt >= to_event and 0 <= mqtt_after <= mqtt_max
        assert to_dashboard > 0 and dashboard_after <= dashboard_max
    # at 2 fps the k-th fall comes (k - 1) / 2 s after the first, and the falls must have lasted down_for_s
    down_wait_s = max((defaults.k - 1) / 2, defaults.down_for_s)
    assert float(rows[cloud_row][1]) >= down_wait_s, "a sure cloud verdict alone opens nothing sooner"
    assert float(rows[down_row][1]) >= down_wait_s
    assert float(rows[fallback_row][1]) >= defaults.cloud_wait_s + down_wait_s, "D, then the frames that confirm"


def test_a_replayed_open_of_an_answered_alert_pages_nobody(
    shared_settings: Settings, receiver: WebhookReceiver, store: redis.Redis
) -> None:
    settings = shared_settings
    camera = unique_camera("replayed")
    send_verdicts(settings, [make_verdict(camera, seq, fall=True) for seq in range(3)])
    (alert,) = alerts_of(settings, camera)
    wait_for(lambda: len(receiver.received("/alerts", alert.alert_id)) >= 2, "the webhook and its retry")
    send_events(settings, [alert.model_copy(update={"state": "false_alarm", "updated_at": utc_now()})])
    wait_for(
        lambda: decode(FallEvent, store.get(alert_key(alert.alert_id))).state == "false_alarm",
        "the false alarm in Redis",
    )

    # a consumer group reading fall-events from the start (a new deployment) sees the `open` again
    send_events(settings, [alert])
    # a later alert of another camera as a marker: a webhook of the replay would have gone out before its own
    marker = unique_camera("marker")
    send_verdicts(settings, [make_verdict(marker, seq, fall=True) for seq in range(3)])
    (marker_alert,) = alerts_of(settings, marker)
    wait_for(lambda: receiver.received("/alerts", marker_alert.alert_id), "the marker's webhook")
    asyncio.run(wait_until_consumed(settings, settings.kafka.topics.fall_events))
    assert len(receiver.received("/alerts", alert.alert_id)) == 2
    assert decode(FallEvent, store.get(alert_key(alert.alert_id))).state == "false_alarm", "never goes back"


def test_an_alert_the_broker_refuses_is_sent_again_until_it_takes_it(stack_state: StackState, tmp_path: Path) -> None:
    settings = alerting_settings(stack_state, tmp_path)
    camera = unique_camera("refused")
    fall_events = settings.kafka.topics.fall_events
    # every alert is larger than this: the broker refuses it, as it refuses writes while it is unwell
    asyncio.run(set_topic_configs(settings, fall_events, {"max.message.bytes": "100"}))
    burst = [make_verdict(camera, seq, fall=True) for seq in range(3)]
    with alerting_worker(settings, tmp_path) as log_path:
        send_verdicts(settings, burst)
        wait_for(lambda: f"Kafka did not take a record for {fall_events}" in log_path.read_text(), "a retry")
        asyncio.run(set_topic_configs(settings, fall_events, {"max.message.bytes": str(MAX_MESSAGE_BYTES)}))
        (alert,) = alerts_of(settings, camera)
        send_verdicts(settings, [make_verdict(camera, 3, fall=True)])
        asyncio.run(wait_until_consumed(settings))
    assert alert.state == "open" and alert.evidence_frame_ids == [verdict.frame_id for verdict in burst]
    assert len(alerts_for(asyncio.run(read_all(settings, fall_events, FallEvent)), camera)) == 1


def test_an_edge_fallback_the_broker_refuses_is_sent_again(stack_state: StackState, tmp_path: Path) -> None:
    # the cloud never answers these offloaded frames; when their cloud wait ends, the broker refuses writes
    settings = alerting_settings(stack_state, tmp_path, cloud_wait_s=6.0)
    camera = unique_camera("fallback-refused")
    verdicts_topic = settings.kafka.topics.verdicts
    provisional = [make_verdict(camera, seq, fall=True, final=False) for seq in range(3)]
    with alerting_worker(settings, tmp_path) as log_path:
        send_verdicts(settings, provisional)
        # in effect well within the cloud wait (a config change takes milliseconds)
        asyncio.run(set_topic_configs(settings, verdicts_topic, {"max.message.bytes": "100"}))
        wait_for(lambda: "not sent" in log_path.read_text(), "a refused edge fallback")
        asyncio.run(set_topic_configs(settings, verdicts_topic, {"max.message.bytes": str(MAX_MESSAGE_BYTES)}))
        (alert,) = alerts_of(settings, camera)
        asyncio.run(wait_until_consumed(settings))
    assert alert.rule == "3 of 5 (edge-fallback)"
    assert alert.evidence_frame_ids == [verdict.frame_id for verdict in provisional]
    fallbacks = [v for v in asyncio.run(read_all(settings, verdicts_topic, Verdict)) if v.source == "edge-fallback"]
    assert sorted(v.frame_id for v in fallbacks) == [verdict.frame_id for verdict in provisional], "each sent once"


def test_an_escalation_claimed_by_a_worker_that_died_is_sent_once_its_lease_ends(
    stack_state: StackState, tmp_path: Path
) -> None:
    settings = alerting_settings(stack_state, tmp_path)
    alert, _ = an_open_alert("escalated")

    async def no_answers(topic: str, key: bytes, value: bytes) -> None:
        raise AssertionError("nobody answers here")

    async def scenario() -> tuple[list[bool], list[str]]:
        store = AlertStore(settings.redis, settings.alerting.stream_maxlen)
        dispatcher = Dispatcher.for_settings(settings, AlertingMetrics(), no_answers)

        async def lease_ended() -> bool:
            return not await store.redis.exists(escalated_key(alert.alert_id))

        try:
            # another worker claimed the escalation and was killed before it sent anything
            assert await store.claim_escalation(alert.alert_id, lease_s=1)
            attempts = [await dispatcher.escalate(alert)]
            await until(lease_ended, "the dead worker's lease to end")
            attempts += [await dispatcher.escalate(alert), await dispatcher.escalate(alert)]
            entries = await store.redis.xrange(ALERT_STREAM_KEY)
            kinds = [
                fields[b"kind"].decode() for _, fields in entries if fields[b"alert_id"] == alert.alert_id.encode()
            ]
            return attempts, kinds
        finally:
            await dispatcher.close()
            await store.close()

    attempts, kinds = asyncio.run(scenario())
    assert attempts == [False, True, True], "not while the lease lasts; then escalated, and known as escalated"
    assert kinds == ["escalation"], "escalated once"


def test_after_redis_restarted_empty_a_room_s_down_cameras_come_back_from_person_down(
    stack_state: StackState, tmp_path: Path
) -> None:
    """Two cameras of a room: the bedside one down, the door one down and up again. Redis loses the room's
    state; the rebuild reads `person-down` back, and a later change counts the bedside camera still down;
    a replayed change older than the door's last one does not undo it."""
    settings = alerting_settings(stack_state, tmp_path)
    room = f"rebuilt {uuid.uuid4().hex[:4]}"
    start = utc_now()

    def change(camera_id: str, down: bool, after_s: float) -> PersonDown:
        at = start + timedelta(seconds=after_s)
        return PersonDown(
            camera_id=camera_id, room=room, down=down, since=at, changed_at=at, episode_id=f"e-{camera_id}",
            rule="3 of 5", confidence=0.9, evidence_frame_ids=["f"],
        )  # fmt: skip

    async def scenario() -> list[int]:
        changes = [change("bedside", True, 0), change("door", True, 1), change("door", False, 2)]
        await logged(settings, settings.kafka.topics.person_down, changes)
        store = AlertStore(settings.redis, settings.alerting.stream_maxlen)
        try:
            for record in changes:  # the live path, before the loss
                await store.camera_down(record)
            await store.redis.delete(room_down_key(room))  # Redis restarted empty
            await rebuilt(settings, store)
            return [
                await store.camera_down(change("door", True, 1)),  # replayed late: older than the door's up
                await store.camera_down(change("bedside", False, 3)),
            ]
        finally:
            await store.close()

    assert asyncio.run(scenario()) == [1, 0], "the bedside camera down after the rebuild, then up"


def test_a_rebuild_tells_the_caregivers_stream_only_of_the_alerts_still_active(
    stack_state: StackState, tmp_path: Path
) -> None:
    """`fall-events` holds an alert opened and resolved, and one opened (while Redis was away, say): after
    the rebuild, the stream has the open one only; a page replaying the closed one's `open` would page a
    caregiver for it."""
    settings = alerting_settings(stack_state, tmp_path)
    closed, _ = an_open_alert("closed")
    still_open, _ = an_open_alert("still-open")

    async def scenario() -> tuple[list[tuple[str, str]], FallEvent | None, list[FallEvent]]:
        resolved = closed.model_copy(update={"state": "resolved"})
        await logged(settings, settings.kafka.topics.fall_events, [closed, resolved, still_open])
        store = AlertStore(settings.redis, settings.alerting.stream_maxlen)
        try:
            after = await store.last_event_id()
            await rebuilt(settings, store)
            entries = await store.read_events(after, block_ms=1)
            streamed = [(fields["alert_id"], fields["state"]) for _, fields in entries]
            return streamed, await store.alert(closed.alert_id), await store.active_alerts()
        finally:
            await store.close()

    streamed, stored_closed, active = asyncio.run(scenario())
    assert streamed == [(still_open.alert_id, "open")]
    assert stored_closed is not None and stored_closed.state == "resolved", "the closed alert is in Redis all the same"
    assert still_open.alert_id in {alert.alert_id for alert in active}


def test_an_alert_answered_before_its_escalation_is_not_escalated(stack_state: StackState, tmp_path: Path) -> None:
    """The dashboard stored an acknowledgement the worker's camera state has not read back from `fall-events`
    yet: the escalation of the `open` it still holds is not sent, and the stream keeps the alert acknowledged."""
    settings = alerting_settings(stack_state, tmp_path)
    alert, _ = an_open_alert("answered")

    async def no_answers(topic: str, key: bytes, value: bytes) -> None:
        raise AssertionError("nobody answers here")

    async def scenario() -> tuple[bool, bool, list[str]]:
        store = AlertStore(settings.redis, settings.alerting.stream_maxlen)
        dispatcher = Dispatcher.for_settings(settings, AlertingMetrics(), no_answers)
        notifier = Notifier(settings.alerting)
        try:
            acknowledged = alert.model_copy(update={"state": "acknowledged"})
            for event in (alert, acknowledged):
                await store.apply(event, notifier.notification(event))
            done = await dispatcher.escalate(alert)
            added = await store.add_escalation(alert, notifier.notification(alert, escalated=True))
            entries = await store.redis.xrange(ALERT_STREAM_KEY)
            kinds = [
                fields[b"kind"].decode() for _, fields in entries if fields[b"alert_id"] == alert.alert_id.encode()
            ]
            return done, added, kinds
        finally:
            await dispatcher.close()
            await store.close()

    done, added, kinds = asyncio.run(scenario())
    assert done, "nothing left to do for it: not asked again"
    assert not added, "the stream refuses an escalation of an answered alert too"
    assert kinds == ["state", "state"], "open, acknowledged: no escalation"


async def logged(settings: Settings, topic: str, records: list[PersonDown] | list[FallEvent]) -> None:
    """`records` on `topic`, keyed by camera as alerting sends them."""
    await create_topics(settings.kafka, topic_specs(settings), settings.kafka.partitions)
    producer = make_producer(settings)
    await producer.start()
    try:
        for record in records:
            await producer.send_and_wait(topic, encode(record), key=record.camera_id.encode())
    finally:
        await producer.stop()


async def rebuilt(settings: Settings, store: AlertStore) -> None:
    """Redis as the Redis channel rebuilds it on this test's topics (never built before)."""
    channel = RedisChannel(settings, store, AlertingMetrics(), Notifier(settings.alerting))
    try:
        await channel.tick()
        await until(lambda: store.is_built(settings.kafka.topics.fall_events), "the rebuild")
    finally:
        await channel.close()
