"""The alerting service: a faust-streaming app on `verdicts` and `fall-events`.

Agent `confirm-falls` reads `verdicts` and `fall-events`: each verdict (an
undecodable one goes to `dead-letters`) feeds its camera's `CameraState`; an
alert the state opens or resolves is published to `fall-events`, a change of the
camera's person-down state to `person-down` (compacted), both keyed by camera
id; a caregiver's answer on `fall-events` (acknowledged, false alarm, resolved,
published by the dashboard) updates the camera's state. Both topics are keyed
by camera id with the same partition count, and faust assigns such topics
co-partitioned, so a camera's verdicts, its alerts and its table entry stay
with one worker.

Agent `deliver-alerts` reads `fall-events` and delivers each change
(`alerting.delivery`): Redis, the caregiver stream, webhooks, snapshots.

A timer (every `tick_s`) checks the two wall-clock deadlines of the cameras
whose partitions this worker owns: an offloaded frame whose cloud verdict is
overdue gets an `edge-fallback` final verdict, published to `verdicts` (faust
tables can only change inside a stream, and the record also tells
dmd_offline what was decided); an alert nobody acknowledged is escalated.

Delivery is at-least-once (faust's default; exactly_once is avoided, see
faust-streaming issues #517 and #323): faust commits a record's offset only
after the agent finished with it and flushed what it sent, and a redelivered
record is harmless because `CameraState` dedupes by frame id, alert ids are
deterministic and Redis takes a state change once.

Per-camera state lives in a faust Table keyed by camera id, backed by a
changelog topic, so dedupe, pending offloads and open alerts survive a restart
or a rebalance.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from functools import partial
from typing import Any

import faust
from aiokafka.errors import KafkaError

from alerting.delivery import Dispatcher
from alerting.metrics import AlertingMetrics
from alerting.rules import CameraState
from core.kafka_io import MAX_MESSAGE_BYTES, GroupLag, dead_letter_for, log_dead_letter, ssl_context, wait_for_kafka
from core.logs import configure_logging
from core.retry import DependencyUnavailable, retry_until_done
from core.settings import KafkaSettings, Settings
from schemas import FallEvent, PersonDown, SchemaError, Verdict, decode, encode, utc_now

log = logging.getLogger(__name__)

SERVICE = "alerting"
CAMERA_TABLE = "camera-state"
# how often the group's consumer lag is measured (an admin round trip per topic)
LAG_INTERVAL_S = 5.0


def faust_broker(bootstrap_servers: str) -> list[str]:
    return [f"kafka://{server.strip()}" for server in bootstrap_servers.split(",")]


def faust_credentials(kafka: KafkaSettings) -> faust.types.auth.CredentialsT | None:
    """The same SASL / TLS settings as every aiokafka client of fallwatch (`kafka_io.client_options`)."""
    context = ssl_context(kafka) if kafka.uses_tls else None
    if kafka.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=kafka.sasl_username, password=kafka.password(), ssl_context=context, mechanism=kafka.sasl_mechanism
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def faust_app(settings: Settings) -> faust.App:
    """The faust app of these settings, with nothing registered on it."""
    alerting = settings.alerting
    datadir = settings.state_dir / f"{alerting.app_id}-data"
    datadir.parent.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    return faust.App(
        alerting.app_id,
        broker=faust_broker(settings.kafka.bootstrap_servers),
        broker_credentials=faust_credentials(settings.kafka),
        # faust's own 1 MB default refused a camera state grown large; `max_verdict_bytes` keeps states small
        producer_max_request_size=MAX_MESSAGE_BYTES,
        consumer_max_fetch_size=MAX_MESSAGE_BYTES,
        processing_guarantee="at_least_once",
        broker_session_timeout=alerting.session_timeout_s,
        topic_partitions=settings.kafka.partitions,
        # verdicts published before the app first joined must still be confirmed
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        datadir=str(datadir),
        store="memory://",
    )


class AlertingApp:
    """The alerting service's faust app (`self.app`, not started), counting into `metrics`."""

    def __init__(self, settings: Settings, metrics: AlertingMetrics) -> None:
        self.settings = settings
        self.rule = settings.alerting
        self.topic_names = topics = settings.kafka.topics
        self.metrics = metrics
        self.app = app = faust_app(settings)
        # every topic value is JSON made by schemas.encode; faust only moves the bytes
        raw_topic: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "value_serializer": "raw"}
        self.fall_events = app.topic(topics.fall_events, **raw_topic)
        self.cameras = app.Table(
            CAMERA_TABLE,
            partitions=settings.kafka.partitions,
            key_type=str,
            # values are CameraState.model_dump(mode="json") dicts; no value_type, because faust's
            # changelog recovery calls value_type.from_data(), which only faust Records have
        )
        self.raw_topic = raw_topic
        self.dispatcher = Dispatcher.for_settings(settings, metrics, self.publish)
        self.group_lag = GroupLag(settings)
        # what the timer already did, so a tick does not repeat it before the stream catches up
        self.fallbacks_sent: set[str] = set()
        self.escalated: set[str] = set()
        app.agent(app.topic(topics.verdicts, topics.fall_events, **raw_topic), name="confirm-falls")(self.confirm_falls)
        app.agent(self.fall_events, name="deliver-alerts")(self.deliver_alerts)
        app.timer(self.rule.tick_s)(self.outbox_and_rebuild)
        app.timer(self.rule.tick_s)(self.check_deadlines)
        app.timer(LAG_INTERVAL_S)(self.measure_lag)
        app.task(self.dispatcher.start)

        @app.on_before_shutdown.connect  # type: ignore[arg-type]  # faust's hint rejects any async receiver
        async def close_delivery(sender: faust.App, **kwargs: Any) -> None:
            await self.close()

    async def publish(self, topic: str, key: bytes | None, value: bytes) -> None:
        """A record, back once the broker has it (an answer over MQTT, an output the table must not outrun)."""
        # the producer itself, not Topic.send: its FutureMessage would log a refused record as never retrieved
        producer = await self.app.maybe_start_producer()
        await producer.send_and_wait(topic, key, value, partition=None, timestamp=None, headers=None)

    async def send_until_taken(self, topic: str, key: bytes | None, value: bytes) -> None:
        """An output of a stream, sent again until the broker has it, before the stream moves on.

        faust acks a record whose agent raised, so an output that failed would be lost with its
        record: the stream waits instead, and a broker refusing writes delays alerts, loses none.
        """

        async def send() -> None:
            await self.publish(topic, key, value)

        def say_retry(exc: BaseException) -> None:
            log.warning("Kafka did not take a record for %s (%s); sending it again", topic, exc)

        await retry_until_done(send, (KafkaError,), say_retry)

    def camera_state(self, camera_id: str, room: str) -> CameraState:
        stored = self.cameras.get(camera_id)
        rule = self.rule.rule_for(room)
        if stored is not None:
            return CameraState(rule=rule, **stored)
        return CameraState(rule=rule, camera_id=camera_id, room=room)

    async def dead_letter(self, message: Any, reason: str) -> None:
        # faust's Message has the ConsumerRecord fields dead_letter_for reads
        letter = dead_letter_for(SERVICE, message, reason)
        log_dead_letter(letter)
        self.metrics.dead_letters.inc()
        await self.send_until_taken(self.topic_names.dead_letters, letter.key, encode(letter))

    def verdict_or_reason(self, raw: bytes | None) -> Verdict | str:
        size = len(raw or b"")
        if size > self.rule.max_verdict_bytes:
            # a camera's state keeps its pending verdicts: one huge record would make every changelog write huge
            return f"verdict of {size} bytes exceeds alerting.max_verdict_bytes ({self.rule.max_verdict_bytes})"
        try:
            verdict = decode(Verdict, raw)
        except SchemaError as exc:
            return str(exc)
        return self.settings.capture_time.problem(verdict.captured_at, utc_now()) or verdict

    async def confirm_falls(self, stream: faust.StreamT[bytes]) -> None:
        """Agent `confirm-falls`: verdicts through the camera's rule, answers into the camera's state."""
        async for event in stream.events():
            if event.message.topic == self.topic_names.fall_events:
                self.take_answer(event.message.value)
            else:
                await self.take_verdict(event.message)

    def take_answer(self, raw: bytes | None) -> None:
        try:
            answer = decode(FallEvent, raw)
        except SchemaError:
            return  # deliver-alerts dead-letters it
        if self.cameras.get(answer.camera_id) is not None:
            state = self.camera_state(answer.camera_id, answer.room)
            state.apply(answer)
            self.cameras[answer.camera_id] = state.model_dump(mode="json")

    async def take_verdict(self, message: Any) -> None:
        verdict = self.verdict_or_reason(message.value)
        if isinstance(verdict, str):
            await self.dead_letter(message, verdict)
            return
        state = self.camera_state(verdict.camera_id, verdict.room)
        state.room, state.partition = verdict.room, message.partition
        if state.suppresses(verdict):
            self.metrics.zone_suppressed.labels(verdict.room).inc()
            log.info("%s: fall verdict %s not counted: person in a no-alert zone", verdict.room, verdict.frame_id)
        outputs = state.observe(verdict, utc_now())
        for output in outputs:
            if isinstance(output, PersonDown):
                await self.publish_person_down(output)
            else:
                await self.publish_alert(output)
        # Only once the broker has the outputs: a state saved first would, after a crash in between, dedupe
        # the redelivered verdict and its alert would never be sent. (faust only writes the changelog on
        # assignment, never for an in-place change.)
        self.cameras[verdict.camera_id] = state.model_dump(mode="json")

    async def publish_person_down(self, change: PersonDown) -> None:
        await self.send_until_taken(self.topic_names.person_down, change.camera_id.encode(), encode(change))
        self.metrics.person_down_changes.labels(state="down" if change.down else "up").inc()
        log.info(
            "camera %s, room %s: person %s (%s)",
            change.camera_id,
            change.room,
            "down" if change.down else "up again",
            change.rule,
        )
        await self.dispatcher.person_down(change)

    async def publish_alert(self, alert: FallEvent) -> None:
        await self.dispatcher.before_publish(alert)
        await self.send_until_taken(self.topic_names.fall_events, alert.camera_id.encode(), encode(alert))
        if alert.state != "open":
            self.metrics.alerts_resolved.inc()
            log.info("alert %s resolved: camera %s shows no fall any more", alert.alert_id, alert.camera_id)
            return
        self.metrics.alerts_opened.labels(room=alert.room, rule=alert.rule).inc()
        self.metrics.time_to_alert.observe((alert.updated_at - alert.first_fall_at).total_seconds())
        log.info(
            "alert %s opened: camera %s, room %s, rule %s, confidence %.2f, evidence %s",
            alert.alert_id,
            alert.camera_id,
            alert.room,
            alert.rule,
            alert.confidence,
            ", ".join(alert.evidence_frame_ids),
        )

    async def deliver_alerts(self, stream: faust.StreamT[bytes]) -> None:
        """Agent `deliver-alerts`: each record of `fall-events` through every delivery channel."""
        async for event in stream.events():
            try:
                alert = decode(FallEvent, event.message.value)
            except SchemaError as exc:
                await self.dead_letter(event.message, str(exc))
                continue
            await self.dispatcher.handle(alert)

    async def outbox_and_rebuild(self) -> None:
        # webhook retries that are due, deliveries a dead worker left, and Redis come back empty
        await self.dispatcher.tick()

    async def check_deadlines(self) -> None:
        # the table may still hold cameras of partitions this worker lost (standbys, a revocation):
        # only the owner of a camera's partition acts for it
        verdicts = self.topic_names.verdicts
        owned = {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == verdicts}
        now = utc_now()
        pending: set[str] = set()
        still_open: set[str] = set()
        for camera_id, stored in list(self.cameras.items()):
            if stored["partition"] not in owned or not (stored["pending"] or stored["open_alert"]):
                continue  # not ours, or no deadline to watch: skip the cost of restoring the state
            state = CameraState(rule=self.rule.rule_for(stored["room"]), **stored)
            pending |= set(state.pending)
            if state.open_alert_id is not None:
                still_open.add(state.open_alert_id)
            await self.decide_overdue(camera_id, state, now)
        self.fallbacks_sent.intersection_update(pending)
        self.escalated.intersection_update(still_open)

    async def decide_overdue(self, camera_id: str, state: CameraState, now: datetime) -> None:
        """Edge fallbacks of overdue cloud verdicts; the escalation of an alert nobody acknowledged."""
        for fallback in state.due_fallbacks(now):
            if fallback.frame_id in self.fallbacks_sent:
                continue
            self.fallbacks_sent.add(fallback.frame_id)
            log.info("no cloud verdict for frame %s in time: deciding on the edge's", fallback.frame_id)
            # sent without waiting for the broker (escalations must not wait behind it); one it refuses is
            # sent again at a later check, or the frame would hold back its camera's verdicts for good
            try:
                producer = await self.app.maybe_start_producer()
                sent = await producer.send(
                    self.topic_names.verdicts,
                    camera_id.encode(),
                    encode(fallback),
                    partition=None,
                    timestamp=None,
                    headers=None,
                )
            except KafkaError as exc:
                self.fallback_not_sent(fallback.frame_id, exc)
                continue
            sent.add_done_callback(partial(self.fallback_done, fallback.frame_id))
        overdue = state.escalation_due(now)
        if overdue is not None and overdue.alert_id not in self.escalated and await self.dispatcher.escalate(overdue):
            self.escalated.add(overdue.alert_id)

    def fallback_done(self, frame_id: str, sent: asyncio.Future[Any]) -> None:
        if sent.cancelled() or sent.exception() is not None:
            self.fallback_not_sent(frame_id, sent.exception() if not sent.cancelled() else None)
        else:
            self.metrics.edge_fallbacks.inc()

    def fallback_not_sent(self, frame_id: str, exc: BaseException | None) -> None:
        self.fallbacks_sent.discard(frame_id)
        log.warning("edge fallback of frame %s not sent (%s); sent again at the next check", frame_id, exc)

    async def measure_lag(self) -> None:
        # the group's committed lag: what alerting still has to read, whichever worker holds the partitions
        try:
            for topic in (self.topic_names.verdicts, self.topic_names.fall_events):
                lag = await self.group_lag.lag(self.rule.app_id, topic)
                self.metrics.consumer_lag.labels(topic=topic).set(lag)
        except (KafkaError, OSError, DependencyUnavailable) as exc:
            # a gauge must never stop alerting (an error in a faust timer crashes the app): measure next time
            log.warning("consumer lag not measured (%s); next try in %.0f s", exc, LAG_INTERVAL_S)
            await self.group_lag.stop()

    async def close(self) -> None:
        await self.dispatcher.close()
        await self.group_lag.stop()


def run_alerting(settings: Settings) -> None:
    """Run the alerting worker until SIGINT or SIGTERM (faust's worker handles both)."""
    configure_logging(settings.log_level)
    # faust's worker dies with a traceback when the brokers are not there at the start: wait for them first
    asyncio.run(wait_for_kafka(settings))
    metrics = AlertingMetrics()
    # before faust starts, so a port in use is one line naming the setting
    metrics.serve(settings.alerting.metrics_port, "alerting.metrics_port")
    app = AlertingApp(settings, metrics).app
    log.info(
        "alerting %s: person down at %d of %d for %.1f s (up after %.1f s), or a cloud p>=%.2f with a fall within "
        "%.1f s; cloud wait %.0f s, escalation after %.0f s, cooldown %.0f s, on %s and %s",
        settings.alerting.app_id,
        settings.alerting.k,
        settings.alerting.n,
        settings.alerting.down_for_s,
        settings.alerting.up_after_s,
        settings.alerting.cloud_confirm_probability,
        settings.alerting.confirm_within_s,
        settings.alerting.cloud_wait_s,
        settings.alerting.escalate_after_s,
        settings.alerting.cooldown_s,
        settings.kafka.topics.verdicts,
        settings.kafka.topics.fall_events,
    )
    worker = faust.Worker(
        app,
        quiet=True,  # no banner: logs only
        override_logging=False,  # keep configure_logging's format and levels
        redirect_stdouts=False,
    )
    # the start-up spinner writes terminal escapes to stdout even when it is a log file
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        # faust's worker always ends with SystemExit; a clean stop is an ordinary return
        if exc.code not in (0, None):
            raise
    finally:
        metrics.close()
    log.info("alerting stopped")
