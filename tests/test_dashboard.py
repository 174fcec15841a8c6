"""The caregivers' dashboard (`fallwatch dashboard`) with the alerting service, on the real stack.

The browser test drives Debian's Chromium (headless) through its chromedriver
with selenium: an alert appears live with its snapshot, Acknowledge is clicked,
and the state change and the label land in Redis, `fall-events` and `labels`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from alerting.answers import Answered, AnswerRefused, Answers, NotPublished, label_id_for
from alerting.notifications import Notifier, link_signature
from alerting.store import AlertStore, alert_key, frame_label_key
from core.kafka_io import MAX_MESSAGE_BYTES, make_producer
from core.settings import Settings
from fallwatch.stack import StackState, free_port, port_accepts
from schemas import FallEvent, Label, decode
from tests.alerting_helpers import (
    alerting_settings,
    alerting_worker,
    alerts_of,
    an_open_alert,
    fall_with_frames,
    read_until,
    set_topic_configs,
    wait_for,
)
from tests.conftest import REPO, read_all, write_config

TOKEN = "test-dashboard-token"
ESCALATE_AFTER_S = 5.0
SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@dataclass
class Dashboard:
    settings: Settings
    url: str
    store: redis.Redis


@pytest.fixture(scope="module")
def dashboard(stack_state: StackState, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """The alerting service and `fallwatch dashboard`, both as subprocesses with one config."""
    tmp_path = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    # escalations within seconds: the page must show them
    settings = alerting_settings(
        stack_state, tmp_path, dashboard_port=port, dashboard_token=TOKEN, escalate_after_s=ESCALATE_AFTER_S
    )
    env = write_config(settings, tmp_path / "dashboard.yaml")
    log_path = tmp_path / "dashboard.log"
    with alerting_worker(settings, tmp_path), log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "fallwatch", "dashboard"],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        store = redis.Redis.from_url(settings.redis.url)
        try:
            wait_for(lambda: port_accepts(port) or process.poll() is not None, "the dashboard's port")
            assert process.poll() is None, log_path.read_text()
            yield Dashboard(settings, f"http://127.0.0.1:{port}", store)
        finally:
            store.close()
            returncode = stopped_while_a_page_streams(process, f"http://127.0.0.1:{port}")
    assert returncode == 0, log_path.read_text()[-3000:]


def stopped_while_a_page_streams(process: subprocess.Popen, url: str) -> int | None:
    """SIGTERM while a caregiver's page holds the event stream open; the exit status (None: it did not stop)."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=30, headers=auth) as client, client.stream("GET", "/api/events") as page:
        next(page.iter_lines())  # the snapshot's first line: the stream is open
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return None


def chromium(tmp_path: Path) -> webdriver.Chrome:
    """Debian's headless Chromium; selenium gets the driver's path, so Selenium Manager downloads nothing."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail("chromium and chromium-driver are missing: run scripts/install-system-deps.sh")
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / f'chromium-{uuid.uuid4().hex[:6]}'}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    driver = chromium(tmp_path)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path, ignore_errors=True)


def element(driver: webdriver.Chrome, css: str) -> object:
    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
    except WebDriverException:
        return None
    return found[0] if found else None


def logged_in(browser: webdriver.Chrome, dashboard: Dashboard) -> None:
    """The page opened, the token and a name given, live."""
    browser.get(dashboard.url + "/")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "user").send_keys("nurse Ana")
    browser.find_element(By.ID, "connect").click()
    wait_for(lambda: browser.find_element(By.ID, "status").text == "live", "the page to go live")


def test_an_alert_appears_live_and_acknowledge_writes_the_state_and_a_label(
    dashboard: Dashboard, browser: webdriver.Chrome, clip_path: Path
) -> None:
    settings = dashboard.settings
    logged_in(browser, dashboard)

    # the alert opens after the page connected: it must arrive by the event stream
    alert = fall_with_frames(dashboard.settings, clip_path, "browser")
    card = f'.room[data-room="{alert.room}"] .alert[data-alert-id="{alert.alert_id}"][data-state="open"]'
    wait_for(lambda: element(browser, card), "the alert on the page")
    wait_for(
        lambda: browser.execute_script(
            "const img = document.querySelector(arguments[0] + ' img.snapshot');"
            "return img !== null && img.complete && img.naturalWidth > 0;",
            card,
        ),
        "the snapshot on the page",
    )
    assert dashboard.store.ttl(f"fallwatch:snapshot:{alert.alert_id}") > 0, "snapshots expire"
    evidence = f"fallwatch:evidence:{alert.alert_id}"
    assert sorted(k.decode() for k in dashboard.store.hkeys(evidence)) == sorted(alert.evidence_frame_ids)
    assert dashboard.store.ttl(evidence) > 0, "evidence frames expire"

    browser.find_element(By.CSS_SELECTOR, f"{card} button.ack").click()

    wait_for(
        lambda: decode(FallEvent, dashboard.store.get(alert_key(alert.alert_id))).state == "acknowledged",
        "the acknowledgement in Redis",
    )
    acknowledged_card = f'.alert[data-alert-id="{alert.alert_id}"][data-state="acknowledged"]'
    wait_for(lambda: element(browser, acknowledged_card), "the page to show the acknowledgement")
    for frame_id in alert.evidence_frame_ids:
        label = decode(Label, dashboard.store.get(frame_label_key(frame_id)))
        assert (label.verdict, label.alert_id, label.labelled_by) == ("true_fall", alert.alert_id, "nurse Ana")
    labels = asyncio.run(
        read_until(
            settings, settings.kafka.topics.labels, Label, lambda got: any(x.alert_id == alert.alert_id for x in got)
        )
    )
    (label,) = [x for x in labels if x.alert_id == alert.alert_id]
    assert label.label_id == label_id_for(alert.alert_id, "true_fall")
    assert label.frame_ids == alert.evidence_frame_ids
    events = alerts_of(settings, alert.camera_id, count=2)
    assert [e.state for e in events] == ["open", "acknowledged"]


def test_an_alert_that_opened_while_the_page_reconnected_is_announced(
    dashboard: Dashboard, browser: webdriver.Chrome, clip_path: Path
) -> None:
    logged_in(browser, dashboard)
    alert = fall_with_frames(dashboard.settings, clip_path, "missed")
    wait_for(lambda: element(browser, f'.alert[data-alert-id="{alert.alert_id}"]'), "the alert on the page")
    # the page as it is after missing the alert's state event (its stream broke); the reconnection's
    # snapshot, as the server sends it, holds the alert: the caregiver hears of it then
    announced = browser.execute_async_script(
        """
        const [alertId, token, done] = arguments;
        const heard = [];
        announce = (a) => heard.push(a.alert_id);
        alerts.delete(alertId);
        const snapshot = await (await fetch("/api/alerts", { headers: { Authorization: `Bearer ${token}` } })).text();
        handle("snapshot", snapshot);
        handle("snapshot", snapshot);  // one more reconnection: nothing new
        done(heard);
        """,
        alert.alert_id,
        TOKEN,
    )
    assert announced == [alert.alert_id]


def in_view(driver: webdriver.Chrome, css: str) -> bool:
    """The element is on screen, whole, after scrolling to it (no horizontal scroll needed)."""
    return bool(
        driver.execute_script(
            "const el = document.querySelector(arguments[0]); el.scrollIntoView({block: 'center'});"
            "const r = el.getBoundingClientRect();"
            "return r.width > 0 && r.height > 0 && r.left >= 0 && r.right <= window.innerWidth"
            " && r.top >= 0 && r.bottom <= window.innerHeight;",
            css,
        )
    )


def screenshot(driver: webdriver.Chrome, tmp_path: Path, name: str) -> None:
    """Kept with the test's files; FALLWATCH_UPDATE_SCREENSHOTS=1 also writes it to docs/screenshots."""
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(tmp_path / name))
    if os.environ.get("FALLWATCH_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(exist_ok=True)
        shutil.copy(tmp_path / name, SCREENSHOTS / name)


@pytest.mark.parametrize(("width", "height"), [(390, 844), (1280, 900)], ids=["phone", "desktop"])
def test_triage_urgent_first_live_counter_escalation_and_history(
    dashboard: Dashboard, browser: webdriver.Chrome, clip_path: Path, tmp_path: Path, width: int, height: int
) -> None:
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
    )
    logged_in(browser, dashboard)
    assert not browser.find_element(By.ID, "login").is_displayed(), "the login form goes once connected"
    auth = {"Authorization": f"Bearer {TOKEN}"}

    # an older alert someone acknowledged, then a new one: the new, unanswered one comes first
    older = fall_with_frames(dashboard.settings, clip_path, f"older-{width}")
    with httpx.Client(base_url=dashboard.url, timeout=10, headers=auth) as client:
        wait_for(lambda: dashboard.store.get(alert_key(older.alert_id)), "the older alert in Redis")
        assert client.post(f"/api/alerts/{older.alert_id}/acknowledge", json={"by": "x"}).status_code == 200
    newer = fall_with_frames(dashboard.settings, clip_path, f"newer-{width}")
    card = f'.alert[data-alert-id="{newer.alert_id}"]'
    wait_for(lambda: element(browser, f'{card}[data-state="open"]'), "the new alert, live")
    wait_for(lambda: element(browser, f'.alert[data-alert-id="{older.alert_id}"][data-state="acknowledged"]'), "ack")
    order = [el.get_attribute("data-alert-id") for el in browser.find_elements(By.CSS_SELECTOR, ".alert")]
    assert order.index(newer.alert_id) < order.index(older.alert_id), "unacknowledged first"
    assert browser.find_element(By.CSS_SELECTOR, f"{card} .why").text.startswith("seen in 3 of the last 5 frames")

    # the counter runs, the escalation shows as a badge
    counter = browser.find_element(By.CSS_SELECTOR, f"{card} .down-for").text
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, f"{card} .down-for").text != counter, "the counter")
    wait_for(lambda: element(browser, f'{card}[data-escalated="yes"] .badge.escalated'), "the escalated badge")
    assert browser.find_element(By.CSS_SELECTOR, f"{card} .badge.escalated").is_displayed()
    # the evidence frames, as a strip of thumbnails (fetched with the token) under the alert
    wait_for(
        lambda: browser.execute_script(
            "const imgs = [...document.querySelectorAll(arguments[0])];"
            "return imgs.length === arguments[1] && imgs.every(img => img.complete && img.naturalWidth > 0);",
            f"{card} .evidence img",
            len(newer.evidence_frame_ids),
        ),
        "the evidence strip",
    )
    assert in_view(browser, f"{card} .evidence")
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    assert in_view(browser, f"{card} button.ack") and in_view(browser, f"{card} button.false-alarm")
    screenshot(browser, tmp_path, f"dashboard-active-{width}.png")

    # the snapshot enlarges; acknowledge works from the page
    wait_for(
        lambda: browser.execute_script(f"return document.querySelector('{card} img.snapshot').naturalWidth > 0"), "img"
    )
    browser.find_element(By.CSS_SELECTOR, f"{card} img.snapshot").click()
    assert browser.find_element(By.ID, "zoom").is_displayed()
    browser.find_element(By.ID, "zoom").click()
    browser.find_element(By.CSS_SELECTOR, f"{card} button.ack").click()
    wait_for(lambda: element(browser, f'{card}[data-state="acknowledged"]'), "the acknowledgement")
    assert decode(FallEvent, dashboard.store.get(alert_key(newer.alert_id))).answered_by == "nurse Ana"

    # closed, it moves to the history with who answered and how long it was open
    with httpx.Client(base_url=dashboard.url, timeout=10, headers=auth) as client:
        assert client.post(f"/api/alerts/{newer.alert_id}/resolve", json={"by": "night shift"}).status_code == 200
    wait_for(lambda: not element(browser, card), "the resolved alert to leave the active view")
    browser.find_element(By.ID, "show-history").click()
    row = f'#history tr[data-alert-id="{newer.alert_id}"]'
    wait_for(lambda: element(browser, row), "the alert in the history")
    cells = [td.text for td in browser.find_elements(By.CSS_SELECTOR, f"{row} td")]
    assert cells[2:4] == ["resolved", "night shift"]
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(browser, tmp_path, f"dashboard-history-{width}.png")


def test_the_api_needs_the_token_and_refuses_impossible_answers(dashboard: Dashboard, clip_path: Path) -> None:
    alert = fall_with_frames(dashboard.settings, clip_path, "api")
    wait_for(lambda: dashboard.store.get(alert_key(alert.alert_id)), "the alert in Redis")
    with httpx.Client(base_url=dashboard.url, timeout=10) as client:
        assert client.get("/api/alerts").status_code == 401
        assert client.get("/api/alerts", headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        rooms = client.get("/api/alerts", headers=auth).json()["rooms"]
        assert alert.alert_id in [a["alert_id"] for a in rooms[alert.room]]

        url = f"/api/alerts/{alert.alert_id}"
        frame_url = f"{url}/evidence/{alert.evidence_frame_ids[0]}"
        stored = f"fallwatch:evidence:{alert.alert_id}"
        wait_for(lambda: dashboard.store.exists(stored), "the evidence in Redis")
        assert client.get(frame_url).status_code == 401
        frame = client.get(frame_url, headers=auth)
        assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
        assert frame.content == dashboard.store.hget(stored, alert.evidence_frame_ids[0])
        assert frame.content.startswith(b"\xff\xd8")
        assert client.get(f"{url}/evidence/not-an-evidence-frame", headers=auth).status_code == 404
        assert client.post(f"{url}/resolve", json={"by": "x"}, headers=auth).status_code == 409  # not acknowledged
        assert client.post(f"{url}/acknowledge", json={"by": ""}, headers=auth).status_code == 422  # who answers?
        assert client.post("/api/alerts/no-such-alert/acknowledge", json={"by": "x"}, headers=auth).status_code == 404
        answer = client.post(f"{url}/false-alarm", json={"by": "night shift"}, headers=auth)
        assert answer.status_code == 200
        assert answer.json()["label"]["verdict"] == "false_alarm"
        assert client.post(f"{url}/acknowledge", json={"by": "x"}, headers=auth).status_code == 409  # closed
        rooms = client.get("/api/alerts", headers=auth).json()["rooms"]
        assert alert.alert_id not in [a["alert_id"] for a in rooms.get(alert.room, [])]
        metrics = client.get("/metrics").text
        assert 'fallwatch_alert_answers_total{verdict="false_alarm"} 1.0' in metrics


def test_a_signed_snapshot_link_opens_without_the_token_until_it_expires(dashboard: Dashboard, clip_path: Path) -> None:
    alert = fall_with_frames(dashboard.settings, clip_path, "link")
    wait_for(lambda: dashboard.store.get(f"fallwatch:snapshot:{alert.alert_id}"), "the snapshot in Redis")
    link = Notifier(dashboard.settings.alerting).snapshot_url(alert.alert_id)
    assert link is not None and link.startswith(f"{dashboard.url}/snapshots/{alert.alert_id}?")
    expires = int(time.time()) - 1
    expired = (
        f"/snapshots/{alert.alert_id}?expires={expires}&signature={link_signature(TOKEN, alert.alert_id, expires)}"
    )
    with httpx.Client(timeout=10) as client:
        opened = client.get(link)
        assert opened.status_code == 200 and opened.headers["content-type"] == "image/jpeg"
        assert opened.content == dashboard.store.get(f"fallwatch:snapshot:{alert.alert_id}")
        assert client.get(link.replace("signature=", "signature=0")).status_code == 403, "tampered"
        assert client.get(link.replace(alert.alert_id, "other-alert")).status_code == 403, "another alert"
        assert client.get(dashboard.url + expired).status_code == 403, "expired"


def test_the_dashboard_refuses_to_start_without_a_token() -> None:
    env = {key: value for key, value in os.environ.items() if key != "FALLWATCH_ALERTING__DASHBOARD_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "fallwatch", "dashboard"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: the dashboard needs a bearer token: set alerting.dashboard_token "
        "(e.g. FALLWATCH_ALERTING__DASHBOARD_TOKEN) or alerting.dashboard_token_file"
    ]


@asynccontextmanager
async def answers_on(settings: Settings, alert: FallEvent) -> AsyncIterator[tuple[Answers, AlertStore]]:
    """The answers path the dashboard takes, on the real broker and Redis, with `alert` open in Redis."""
    store = AlertStore(settings.redis, settings.alerting.stream_maxlen)
    notifier = Notifier(settings.alerting)
    producer = make_producer(settings)
    await producer.start()

    async def publish(topic: str, key: bytes, value: bytes) -> None:
        await producer.send_and_wait(topic, key=key, value=value)

    try:
        await store.apply(alert, notifier.notification(alert))
        yield Answers(settings.kafka.topics, store, notifier, publish), store
    finally:
        await producer.stop()
        await store.close()


async def answer_while_labels_are_refused(settings: Settings, alert: FallEvent) -> None:
    """Acknowledge `alert` while the broker refuses `labels` (refused, nothing sent), then once it takes them."""
    async with answers_on(settings, alert) as (answers, store):
        with pytest.raises(NotPublished, match="could not publish the answer"):
            await answers.answer(alert.alert_id, "acknowledge", "nurse")
        assert await read_all(settings, settings.kafka.topics.fall_events, FallEvent) == [], "not answered yet"
        assert (await store.alert(alert.alert_id)) == alert
        await set_topic_configs(settings, settings.kafka.topics.labels, {"max.message.bytes": str(MAX_MESSAGE_BYTES)})
        answered = await answers.answer(alert.alert_id, "acknowledge", "nurse")  # the caregiver tries again
        assert answered.label is not None


def test_an_answer_whose_label_kafka_refused_can_be_given_again_and_keeps_its_label(
    stack_state: StackState, tmp_path: Path
) -> None:
    settings = alerting_settings(stack_state, tmp_path)
    alert, verdict = an_open_alert("refused-label")
    # every label is larger than this: the broker refuses it, as it refuses writes while it is unwell
    asyncio.run(set_topic_configs(settings, settings.kafka.topics.labels, {"max.message.bytes": "100"}))
    asyncio.run(answer_while_labels_are_refused(settings, alert))
    events = asyncio.run(read_all(settings, settings.kafka.topics.fall_events, FallEvent))
    labels = asyncio.run(read_all(settings, settings.kafka.topics.labels, Label))
    assert [(event.alert_id, event.state) for event in events] == [(alert.alert_id, "acknowledged")]
    assert [(label.alert_id, label.verdict, label.frame_ids) for label in labels] == [
        (alert.alert_id, "true_fall", [verdict.frame_id])
    ]


def test_two_caregivers_answering_at_once_give_one_answer_and_one_label(
    stack_state: StackState, tmp_path: Path
) -> None:
    """One presses Acknowledge, another False alarm on the same alert at the same moment: one answer is taken,
    the other refused; the labels would otherwise contradict each other on the same frames."""
    settings = alerting_settings(stack_state, tmp_path)
    alert, _ = an_open_alert("answered-twice")

    async def scenario() -> list[Answered | BaseException]:
        async with answers_on(settings, alert) as (answers, _store):
            return await asyncio.gather(
                answers.answer(alert.alert_id, "acknowledge", "nurse Ana"),
                answers.answer(alert.alert_id, "false-alarm", "nurse Ben"),
                return_exceptions=True,
            )

    results = asyncio.run(scenario())
    answered = [result for result in results if isinstance(result, Answered)]
    refused = [result for result in results if isinstance(result, AnswerRefused)]
    assert len(answered) == 1 and len(refused) == 1, results
    assert "was answered by someone else meanwhile" in str(refused[0])
    labels = asyncio.run(read_all(settings, settings.kafka.topics.labels, Label))
    events = asyncio.run(read_all(settings, settings.kafka.topics.fall_events, FallEvent))
    assert [label.verdict for label in labels] == [answered[0].label.verdict if answered[0].label else None]
    assert [event.state for event in events] == [answered[0].alert.state]
