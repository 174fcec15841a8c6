"""Alerting's rule on its own (pure, no Kafka): k of n, cloud confirmation, the cloud wait, lifecycle.

The worker on the real stack is tested in test_alerting_worker.py, the dashboard in test_dashboard.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from alerting.rules import CameraState, alert_id_for
from core.settings import AlertingSettings
from schemas import FallEvent, PersonDown, Verdict
from tests.alerting_helpers import T0, make_verdict

# The mechanics of the rule with no duration to wait for and the sure-cloud pair on (the defaults are tested apart)
RULE = AlertingSettings(k=3, n=5, window_s=30.0, cooldown_s=60.0, down_for_s=0.0, up_after_s=0.0, confirm_within_s=2.0)
NOW = T0 + timedelta(minutes=5)  # wall clock of the pure rule tests


def outputs_of(state: CameraState, verdicts: list[Verdict]) -> list[FallEvent | PersonDown]:
    return [output for verdict in verdicts for output in state.observe(verdict, NOW)]


def observe_all(state: CameraState, verdicts: list[Verdict]) -> list[FallEvent]:
    """The alert events these verdicts cause."""
    return [output for output in outputs_of(state, verdicts) if isinstance(output, FallEvent)]


def person_down_changes(state: CameraState, verdicts: list[Verdict]) -> list[PersonDown]:
    return [output for output in outputs_of(state, verdicts) if isinstance(output, PersonDown)]


def new_state(camera_id: str = "cam") -> CameraState:
    return CameraState(rule=RULE, camera_id=camera_id, room=f"room-of-{camera_id}")


# --- the rule ----------------------------------------------------------------------------------


def test_one_record_from_the_far_future_does_not_silence_the_camera() -> None:
    year_2100 = datetime(2100, 1, 1, tzinfo=UTC)
    stray = make_verdict("cam", 0, fall=False, start=year_2100)
    falls = [make_verdict("cam", seq, fall=True, fall_probability=0.99) for seq in (1, 2, 3)]
    alerts = observe_all(new_state(), [stray, *falls])
    assert [alert.state for alert in alerts] == ["open"], "three sure falls after the stray record open an alert"
    assert alerts[0].evidence_frame_ids == [falls[0].frame_id, falls[1].frame_id, falls[2].frame_id]


def test_k_of_n_falls_open_one_alert_with_evidence() -> None:
    verdicts = [
        make_verdict("cam", 0, fall=False),
        make_verdict("cam", 1, fall=True, fall_probability=0.8),
        make_verdict("cam", 2, fall=False),
        make_verdict("cam", 3, fall=True, fall_probability=0.9),
        make_verdict("cam", 4, fall=True, fall_probability=1.0),
    ]
    alerts = observe_all(new_state(), verdicts)

    assert len(alerts) == 1
    alert = alerts[0]
    assert alert.state == "open"
    assert alert.camera_id == "cam"
    assert alert.room == "room-of-cam"
    assert alert.rule == "3 of 5"
    assert alert.evidence_frame_ids == [verdicts[1].frame_id, verdicts[3].frame_id, verdicts[4].frame_id]
    assert alert.first_fall_at == verdicts[1].captured_at
    assert alert.opened_at == verdicts[4].captured_at
    assert alert.confidence == pytest.approx(0.9)
    assert alert.alert_id == alert_id_for("cam", verdicts[1].frame_id)


def in_bed(verdict: Verdict) -> Verdict:
    """The verdict as the edge sends it for a person it located inside an `alerts: false` zone."""
    return verdict.model_copy(update={"person_at": (0.5, 0.5), "in_no_alert_zone": True})


def test_falls_in_a_no_alert_zone_open_nothing_and_falls_outside_it_do() -> None:
    state = new_state()
    lying_in_bed = [in_bed(make_verdict("cam", seq, fall=True)) for seq in range(5)]
    assert [state.suppresses(v) for v in lying_in_bed] == [True] * 5
    assert outputs_of(state, lying_in_bed) == [], "no alert and no person-down for a person lying in bed"
    # not located (BlazePose found nobody, or no zone): the falls count, missing a fall is worse
    unknown = [make_verdict("cam", seq, fall=True) for seq in (5, 6, 7)]
    assert not any(state.suppresses(v) for v in unknown)
    assert [alert.state for alert in observe_all(state, unknown)] == ["open"]


def test_a_cloud_verdict_takes_the_place_of_its_frames_edge_verdict() -> None:
    state = new_state()
    for seq in range(5):
        state.observe(in_bed(make_verdict("cam", seq, fall=True, final=False)), NOW)
    clouds = [make_verdict("cam", seq, fall=True, source="cloud", fall_probability=0.99) for seq in range(5)]
    assert [state.suppresses(v) for v in clouds] == [True] * 5
    assert outputs_of(state, clouds) == []
    assert [e.fall for e in state.window] == [False] * 5
    assert not state.suppresses(clouds[0]), "a redelivery is not counted again"


def test_alert_id_is_the_same_on_replay() -> None:
    verdicts = [make_verdict("cam", seq, fall=True) for seq in range(3)]
    first, replayed = observe_all(new_state(), verdicts), observe_all(new_state(), verdicts)
    assert [a.alert_id for a in first] == [a.alert_id for a in replayed]
    assert first[0].model_dump(exclude={"updated_at"}) == replayed[0].model_dump(exclude={"updated_at"})


def test_fewer_than_k_falls_in_the_last_n_do_not_confirm() -> None:
    # falls at 0 and 1 leave the last five before the third fall arrives
    verdicts = [
        make_verdict("cam", 0, fall=True),
        make_verdict("cam", 1, fall=True),
        *(make_verdict("cam", seq, fall=False) for seq in range(2, 6)),
        make_verdict("cam", 6, fall=True),
    ]
    assert observe_all(new_state(), verdicts) == []


def test_verdicts_outside_the_window_do_not_count() -> None:
    state = new_state()
    alerts = observe_all(
        state,
        [
            make_verdict("cam", 0, fall=True, at_s=0),
            make_verdict("cam", 1, fall=True, at_s=10),
            make_verdict("cam", 2, fall=True, at_s=45),  # more than 30 s after the first two
            make_verdict("cam", 3, fall=True, at_s=12),  # a late verdict, older than the window
        ],
    )
    assert alerts == []
    # two more falls inside the window of the one at 45 s confirm
    alerts = observe_all(state, [make_verdict("cam", seq, fall=True, at_s=42 + seq) for seq in (4, 5)])
    assert len(alerts) == 1
    assert alerts[0].first_fall_at == T0 + timedelta(seconds=45)


def test_final_verdicts_count_in_capture_order_behind_a_pending_frame() -> None:
    state = new_state()
    offloaded = make_verdict("cam", 1, fall=True, final=False)
    later = [make_verdict("cam", 2, fall=True), make_verdict("cam", 3, fall=True)]
    # the edge's final verdicts of frames 2 and 3 wait for the cloud's verdict of frame 1
    assert observe_all(state, [make_verdict("cam", 0, fall=False), offloaded, *later]) == []
    assert [entry.frame_id for entry in state.held] == [v.frame_id for v in later]
    (alert,) = observe_all(state, [make_verdict("cam", 1, fall=True, source="cloud", fall_probability=0.8)])
    assert alert.first_fall_at == T0 + timedelta(seconds=1)
    assert alert.opened_at == T0 + timedelta(seconds=3), "opened at the verdict that confirmed it, in capture order"
    assert state.held == []


def test_arrival_order_does_not_change_the_alert() -> None:
    frames = [(0, False), (1, True), (2, False), (3, True), (4, True), (5, True), (6, False)]
    provisional = {1, 3}  # offloaded: their cloud verdicts come late, in either order
    edge = [make_verdict("cam", seq, fall=fall, final=seq not in provisional) for seq, fall in frames]
    cloud = [make_verdict("cam", seq, fall=fall, source="cloud") for seq, fall in frames if seq in provisional]
    orders = [edge + cloud, edge + cloud[::-1], edge[:2] + cloud[:1] + edge[2:] + cloud[1:]]
    alerts = [observe_all(new_state(), order) for order in orders]
    assert all(len(found) == 1 for found in alerts)
    assert len({(a[0].alert_id, a[0].opened_at, tuple(a[0].evidence_frame_ids)) for a in alerts}) == 1


def test_a_stray_late_final_verdict_counts_by_capture_time() -> None:
    alerts = observe_all(
        new_state(),
        [
            make_verdict("cam", 2, fall=True),
            make_verdict("cam", 3, fall=True),
            make_verdict("cam", 1, fall=True),  # final, without a provisional verdict before it
        ],
    )
    assert len(alerts) == 1
    assert alerts[0].first_fall_at == T0 + timedelta(seconds=1)


def test_non_final_verdicts_are_ignored() -> None:
    provisional = [make_verdict("cam", seq, fall=True, final=False) for seq in range(5)]
    state = new_state()
    assert observe_all(state, provisional) == []
    assert state.window == []


def test_duplicate_verdicts_count_once() -> None:
    falls = [make_verdict("cam", seq, fall=True) for seq in range(3)]
    state = new_state()
    assert observe_all(state, [falls[0], falls[0], falls[0], falls[1], falls[1]]) == []
    alerts = observe_all(state, [falls[2]])
    assert len(alerts) == 1
    assert alerts[0].evidence_frame_ids == [verdict.frame_id for verdict in falls]


def test_a_redelivered_burst_opens_no_second_alert() -> None:
    burst = [make_verdict("cam", seq, fall=True) for seq in range(3)]
    state = new_state()
    (alert,) = observe_all(state, burst)
    state.apply(alert.model_copy(update={"state": "resolved"}))
    assert observe_all(state, burst) == []


def test_one_open_alert_per_camera() -> None:
    state = new_state()
    alerts = observe_all(state, [make_verdict("cam", seq, fall=True) for seq in range(10)])
    assert len(alerts) == 1
    assert state.open_alert_id == alerts[0].alert_id
    # other cameras have their own state
    assert len(observe_all(new_state("other"), [make_verdict("other", seq, fall=True) for seq in range(3)])) == 1


def test_cooldown_after_an_alert_closes() -> None:
    state = new_state()
    (first,) = observe_all(state, [make_verdict("cam", seq, fall=True) for seq in range(3)])
    state.apply(first.model_copy(update={"state": "false_alarm"}))
    # the person is up again (3 non-falls), then down again: the alert closed at 2 s, so falls until 61 s
    # are within the 60 s cooldown
    assert observe_all(state, [make_verdict("cam", seq, fall=False) for seq in range(3, 6)]) == []
    assert observe_all(state, [make_verdict("cam", seq, fall=True) for seq in range(50, 62)]) == []
    (second,) = observe_all(state, [make_verdict("cam", 62, fall=True)])
    assert second.alert_id != first.alert_id
    # the person has been down since 50 s: the evidence is what made them down, the alert opens at 62 s
    assert second.evidence_frame_ids == [make_verdict("cam", seq, fall=True).frame_id for seq in (50, 51, 52)]
    assert second.opened_at == T0 + timedelta(seconds=62)


def test_state_survives_a_json_round_trip() -> None:
    state = new_state()
    observe_all(state, [make_verdict("cam", 0, fall=True), make_verdict("cam", 1, fall=True)])
    restored = CameraState(rule=RULE, **state.model_dump(mode="json"))
    assert restored == state
    assert observe_all(restored, [make_verdict("cam", 1, fall=True)]) == []  # still remembers frame 1
    assert len(observe_all(restored, [make_verdict("cam", 2, fall=True)])) == 1


# --- cloud confirmation and the cloud wait ---------------------------------------------------------


def test_a_sure_cloud_fall_confirms_with_a_second_fall_close_to_it() -> None:
    state = new_state()
    unsure = make_verdict("cam", 0, fall=True, source="cloud", fall_probability=0.85)
    sure_edge = make_verdict("cam", 1, fall=True, source="edge", fall_probability=0.99)
    assert observe_all(state, [unsure, make_verdict("cam", 1, fall=False)]) == []
    assert observe_all(new_state(), [unsure, sure_edge]) == [], "only a sure *cloud* verdict counts"
    sure_cloud = make_verdict("cam", 2, fall=True, source="cloud", fall_probability=0.95)
    (alert,) = observe_all(state, [sure_cloud])
    assert alert.rule == "cloud p>=0.90 + a fall within 2 s"
    assert alert.evidence_frame_ids == [unsure.frame_id, sure_cloud.frame_id]


def test_one_sure_frame_alone_opens_nothing() -> None:
    state = new_state()
    sure = make_verdict("cam", 0, fall=True, source="cloud", fall_probability=1.0)
    far = make_verdict("cam", 5, fall=True, source="cloud", fall_probability=1.0, at_s=5.0)
    assert observe_all(state, [sure, *(make_verdict("cam", s, fall=False) for s in (1, 2, 3, 4)), far]) == []


def test_an_offloaded_frame_waits_for_the_cloud_then_falls_back_to_the_edge() -> None:
    state = new_state()
    provisional = make_verdict("cam", 0, fall=True, final=False)
    assert state.observe(provisional, NOW) == []
    assert state.window == []
    d = timedelta(seconds=RULE.cloud_wait_s)
    assert state.due_fallbacks(NOW + d - timedelta(milliseconds=1)) == []
    (fallback,) = state.due_fallbacks(NOW + d)
    assert (fallback.frame_id, fallback.source, fallback.final) == (provisional.frame_id, "edge-fallback", True)
    assert fallback.decision is True and fallback.fall_probability == provisional.fall_probability

    # the fallback comes back through the stream; the cloud's late answer for the frame must not count again
    assert state.observe(fallback, NOW + d) == []
    assert state.pending == {}
    late_cloud = make_verdict("cam", 0, fall=True, source="cloud", fall_probability=0.99)
    assert state.observe(late_cloud, NOW + d) == [], "a second sure verdict for the frame would confirm if counted"
    assert [entry.source for entry in state.window] == ["edge-fallback"]
    (alert,) = observe_all(state, [make_verdict("cam", seq, fall=True) for seq in (1, 2)])
    assert alert.rule == "3 of 5 (edge-fallback)"
    assert len(alert.evidence_frame_ids) == 3


def test_a_cloud_verdict_in_time_cancels_the_fallback() -> None:
    state = new_state()
    state.observe(make_verdict("cam", 0, fall=True, final=False), NOW)
    state.observe(make_verdict("cam", 0, fall=False, source="cloud"), NOW + timedelta(seconds=1))
    assert state.pending == {}
    assert state.due_fallbacks(NOW + timedelta(hours=1)) == []
    # and a redelivered provisional of a frame already decided does not wait again
    state.observe(make_verdict("cam", 0, fall=True, final=False), NOW + timedelta(seconds=2))
    assert state.pending == {}


# --- lifecycle: acknowledgement, escalation, resolution, false alarms ------------------------------


def open_alert(state: CameraState, at: datetime = NOW) -> FallEvent:
    alerts = [
        output
        for v in (make_verdict(state.camera_id, seq, fall=True) for seq in range(3))
        for output in state.observe(v, at)
        if isinstance(output, FallEvent)
    ]
    assert len(alerts) == 1
    return alerts[0]


def test_an_alert_nobody_acknowledges_is_due_for_escalation() -> None:
    state = new_state()
    alert = open_alert(state)
    e = timedelta(seconds=RULE.escalate_after_s)
    assert state.escalation_due(NOW + e - timedelta(seconds=1)) is None
    assert state.escalation_due(NOW + e) == alert
    state.apply(alert.model_copy(update={"state": "acknowledged"}))
    assert state.escalation_due(NOW + 10 * e) is None


def test_an_acknowledged_alert_stays_open_while_the_person_lies_then_resolves() -> None:
    state = new_state()
    alert = open_alert(state)  # falls at 0, 1, 2 s
    state.apply(alert.model_copy(update={"state": "acknowledged"}))
    # still lying: falls keep coming for three minutes
    assert observe_all(state, [make_verdict("cam", seq, fall=True) for seq in range(3, 180)]) == []
    assert state.open_alert_id == alert.alert_id
    # up again: no fall for resolve_after_s (120 s) after the last fall at 179 s
    assert observe_all(state, [make_verdict("cam", seq, fall=False) for seq in range(180, 299)]) == []
    (resolved,) = observe_all(state, [make_verdict("cam", 299, fall=False)])
    assert (resolved.alert_id, resolved.state) == (alert.alert_id, "resolved")
    assert state.open_alert is None


def test_a_second_fall_after_an_acknowledged_one_opens_a_new_alert_at_once() -> None:
    state = new_state()
    first = open_alert(state)  # falls at 0, 1, 2 s
    state.apply(first.model_copy(update={"state": "acknowledged"}))
    # helped up (three non-falls: up again), then down again 20 s later, well within resolve_after_s and
    # what would be the cooldown: the caregiver who answered the first fall may have left the room
    up = [make_verdict("cam", seq, fall=False) for seq in range(3, 6)]
    assert [change.down for change in person_down_changes(state, up)] == [False]
    again = [make_verdict("cam", seq, fall=True) for seq in range(25, 28)]
    outputs = outputs_of(state, again)
    events = [output for output in outputs if isinstance(output, FallEvent)]
    assert [(event.alert_id, event.state) for event in events] == [
        (first.alert_id, "resolved"),
        (alert_id_for("cam", again[0].frame_id), "open"),
    ]
    assert events[1].evidence_frame_ids == [verdict.frame_id for verdict in again]
    assert state.open_alert == events[1]
    # the new alert is the one that escalates
    assert state.escalation_due(NOW + timedelta(seconds=RULE.escalate_after_s)) == events[1]


def test_a_fall_while_an_alert_waits_for_its_answer_is_covered_by_it() -> None:
    state = new_state()
    first = open_alert(state)
    up = [make_verdict("cam", seq, fall=False) for seq in range(3, 6)]
    again = [make_verdict("cam", seq, fall=True) for seq in range(10, 13)]
    assert observe_all(state, [*up, *again]) == [], "the unanswered alert still rings for the camera"
    assert state.person_down
    # the caregiver answers while the person lies: that answer covers this fall, nothing new opens
    state.apply(first.model_copy(update={"state": "acknowledged"}))
    assert observe_all(state, [make_verdict("cam", seq, fall=True) for seq in range(13, 40)]) == []
    # up, and down once more: a fall nobody was alerted to
    assert observe_all(state, [make_verdict("cam", seq, fall=False) for seq in range(40, 43)]) == []
    resolved, second = observe_all(state, [make_verdict("cam", seq, fall=True) for seq in range(50, 53)])
    assert (resolved.alert_id, resolved.state) == (first.alert_id, "resolved")
    assert second.state == "open" and second.alert_id == alert_id_for("cam", make_verdict("cam", 50, True).frame_id)


def test_an_unacknowledged_alert_does_not_resolve_by_itself() -> None:
    state = new_state()
    alert = open_alert(state)
    assert observe_all(state, [make_verdict("cam", seq, fall=False) for seq in range(3, 400)]) == []
    assert state.open_alert_id == alert.alert_id


def test_a_false_alarm_closes_the_alert_and_starts_the_cooldown() -> None:
    state = new_state()
    alert = open_alert(state)  # newest verdict at 2 s
    assert observe_all(state, [make_verdict("cam", seq, fall=False) for seq in range(3, 40)]) == []
    state.apply(alert.model_copy(update={"state": "false_alarm"}))  # closed when the newest is 39 s
    # cooldown counts from the closing, not from the opening: falls until 98 s open nothing
    assert observe_all(state, [make_verdict("cam", seq, fall=True) for seq in range(40, 99)]) == []
    (second,) = observe_all(state, [make_verdict("cam", 99, fall=True)])
    assert second.alert_id != alert.alert_id


def test_answers_on_other_alerts_change_nothing() -> None:
    state = new_state()
    alert = open_alert(state)
    state.apply(alert.model_copy(update={"alert_id": "someone-else", "state": "false_alarm"}))
    state.apply(alert)  # our own `open` coming back from fall-events
    assert state.open_alert == alert


def test_rooms_have_their_own_rules() -> None:
    settings = AlertingSettings(rooms={"icu": {"k": 2, "n": 2, "down_for_s": 0, "cloud_wait_s": 2}})
    assert (settings.rule_for("icu").k, settings.rule_for("icu").cloud_wait_s) == (2, 2.0)
    assert settings.rule_for("icu").window_s == settings.window_s
    assert settings.rule_for("hall").k == 3
    state = CameraState(rule=settings.rule_for("icu"), camera_id="cam", room="icu")
    assert len(observe_all(state, [make_verdict("cam", 0, fall=True), make_verdict("cam", 1, fall=True)])) == 1


@pytest.mark.parametrize(
    ("rooms", "message"),
    [({"icu": {"k": 6}}, "rooms.icu"), ({"icu": {"k": 1}}, "rooms.icu"), ({"icu": {"surprise": 1}}, "surprise")],
)
def test_bad_room_rules_are_named(rooms: dict[str, dict[str, float]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AlertingSettings(rooms=rooms)


def test_webhooks_need_a_secret() -> None:
    with pytest.raises(ValueError, match="webhook_secret"):
        AlertingSettings(webhook_urls=["http://example.invalid/hook"])


# --- the person-down state ---------------------------------------------------------------------------


def timeline(camera_id: str, points: list[tuple[float, bool]], first_seq: int = 0) -> list[Verdict]:
    """Final edge verdicts of a camera at these (seconds, fall) points."""
    return [make_verdict(camera_id, first_seq + i, fall=fall, at_s=at) for i, (at, fall) in enumerate(points)]


def test_the_person_down_state_opens_persists_and_clears() -> None:
    rule = AlertingSettings(k=3, n=5, window_s=30.0, down_for_s=2.0, up_after_s=3.0).rule_for("101")
    state = CameraState(rule=rule, camera_id="cam", room="101")
    bend = timeline("cam", [(0.0, True), (0.5, True), (1.0, True), (1.5, False), (2.0, False), (2.5, False)])
    assert person_down_changes(state, bend) == [], "falls that last 1 s are a bend, not a person down"
    assert state.episode is None

    fall = timeline("cam", [(10.0 + 0.5 * i, True) for i in range(5)], first_seq=10)
    (down,) = person_down_changes(state, fall)
    assert (down.down, down.since, down.changed_at) == (True, T0 + timedelta(seconds=10), T0 + timedelta(seconds=12))
    assert down.rule == "3 of 5 for 2 s" and down.evidence_frame_ids == [v.frame_id for v in fall]
    assert down.episode_id == state.open_alert_id, "the alert of the episode has the episode's id"

    # lying still: heartbeats every 10 s, one of them wrongly "no fall"; two quick non-falls are not enough
    lying = timeline("cam", [(22.0, True), (27.0, False), (32.0, True), (40.0, False), (40.5, False)], first_seq=20)
    assert person_down_changes(state, lying) == []
    assert state.person_down

    # up: three non-falls in a row spanning at least up_after_s
    up_again = timeline("cam", [(41.0, False), (43.5, False)], first_seq=30)
    (up,) = person_down_changes(state, up_again)
    assert (up.down, up.since, up.changed_at) == (False, T0 + timedelta(seconds=40), T0 + timedelta(seconds=43.5))
    assert up.episode_id == down.episode_id
    assert not state.person_down and state.episode is None


def test_one_alert_per_down_episode() -> None:
    state = new_state()
    (alert,) = observe_all(state, [make_verdict("cam", seq, fall=True) for seq in range(3)])
    state.apply(alert.model_copy(update={"state": "false_alarm"}))  # e.g. someone lying on the floor on purpose
    still_down = [make_verdict("cam", seq, fall=True) for seq in range(3, 200, 10)]
    assert observe_all(state, still_down) == [], "the same episode does not alert again after the cooldown"
    assert state.person_down


def test_the_person_down_state_survives_a_restart_of_the_service() -> None:
    state = new_state()
    observe_all(state, [make_verdict("cam", seq, fall=True) for seq in range(3)])
    restored = CameraState(rule=RULE, **state.model_dump(mode="json"))
    assert restored.person_down and restored == state
    assert person_down_changes(restored, [make_verdict("cam", seq, fall=False) for seq in range(3, 6)])[0].down is False


def test_the_default_rule_waits_for_falls_that_last() -> None:
    defaults = AlertingSettings()
    assert (defaults.k, defaults.n, defaults.down_for_s, defaults.confirm_within_s) == (3, 5, 2.0, 0.0)
    state = CameraState(rule=defaults.rule_for("101"), camera_id="cam", room="101")
    # a bend at 2 fps: sure falls for 1.5 s, then up; even sure cloud verdicts do not make it a fall
    bend = [make_verdict("cam", i, fall=True, at_s=0.5 * i, source="cloud", fall_probability=0.99) for i in range(4)]
    standing = [make_verdict("cam", i, fall=False, at_s=0.5 * i) for i in range(4, 8)]
    assert outputs_of(state, [*bend, *standing]) == []
    # a fall: the person stays down; the alert opens once the falls have lasted 2 s
    fall = [make_verdict("cam", i, fall=True, at_s=0.5 * i) for i in range(20, 26)]
    down, alert = outputs_of(state, fall)
    assert isinstance(down, PersonDown) and isinstance(alert, FallEvent)
    assert alert.opened_at == fall[4].captured_at and alert.first_fall_at == fall[0].captured_at
    assert alert.rule == "3 of 5 for 2 s"
