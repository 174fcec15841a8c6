"""The alerting service: a faust-streaming app on `verdicts`.

Each verdict is decoded (undecodable records go to `dead-letters`), fed to its
camera's `CameraState`, and an alert the state opens is written to Redis and
published to `fall-events` keyed by camera id.

Delivery is at-least-once (faust's default; exactly_once is avoided, see
faust-streaming issues #517 and #323): faust commits a verdict's offset only
after flushing everything the agent sent for it, and a redelivered verdict is
harmless because `CameraState` dedupes by frame id and alert ids are
deterministic.

Per-camera state lives in a faust Table keyed by camera id, backed by a
changelog topic, so dedupe and open alerts survive a restart or a rebalance.
Verdicts are keyed by camera id, so a camera's verdicts and its table entry
stay on one partition.
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from redis.asyncio import Redis
from redis.exceptions import RedisError

from alerting.rules import CameraState, rule_name
from fallwatch.kafka_io import dead_letter_for
from fallwatch.logs import configure_logging
from fallwatch.settings import Settings
from schemas import FallEvent, SchemaError, Verdict, decode, encode

log = logging.getLogger(__name__)

SERVICE = "alerting"
CAMERA_TABLE = "camera-state"
REDIS_TIMEOUT_S = 2.0


def alert_key(alert_id: str) -> str:
    return f"fallwatch:alert:{alert_id}"


def open_alert_key(camera_id: str) -> str:
    return f"fallwatch:open-alert:{camera_id}"


def faust_broker(bootstrap_servers: str) -> list[str]:
    return [f"kafka://{server.strip()}" for server in bootstrap_servers.split(",")]


class AlertStore:
    """Alerts in Redis for the dashboard and notifiers; the `fall-events` record is the durable copy."""

    def __init__(self, url: str) -> None:
        # short timeouts: a Redis outage must not stall the verdict stream
        self.redis = Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)

    async def save(self, alert: FallEvent) -> None:
        """Write the alert and the camera's open-alert pointer; a failure is logged, never raised.

        Both writes are NX: a replay of the same verdicts yields the same alert id and must
        not undo what a caregiver already did with that alert (closing an alert deletes the
        pointer).
        """
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(alert_key(alert.alert_id), encode(alert), nx=True)
                pipe.set(open_alert_key(alert.camera_id), alert.alert_id, nx=True)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.error("could not write alert %s to Redis (it is still on fall-events): %s", alert.alert_id, exc)

    async def close(self) -> None:
        await self.redis.aclose()


def make_app(settings: Settings) -> faust.App:
    """The alerting faust app for these settings (not started)."""
    rule = settings.alerting
    topics = settings.kafka.topics
    datadir = settings.state_dir / f"{rule.app_id}-data"
    datadir.parent.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    app = faust.App(
        rule.app_id,
        broker=faust_broker(settings.kafka.bootstrap_servers),
        processing_guarantee="at_least_once",
        topic_partitions=settings.kafka.partitions,
        # verdicts published before the app first joined must still be confirmed
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        datadir=str(datadir),
        store="memory://",
    )
    # every topic value is JSON made by schemas.encode; faust only moves the bytes
    raw_topic: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "value_serializer": "raw"}
    verdicts = app.topic(topics.verdicts, **raw_topic)
    fall_events = app.topic(topics.fall_events, **raw_topic)
    dead_letters = app.topic(topics.dead_letters, **raw_topic)
    cameras = app.Table(
        CAMERA_TABLE,
        partitions=settings.kafka.partitions,
        key_type=str,
        # values are CameraState.model_dump(mode="json") dicts; no value_type, because faust's
        # changelog recovery calls value_type.from_data(), which only faust Records have
    )
    store = AlertStore(settings.redis.url)

    @app.agent(verdicts, name="confirm-falls")
    async def confirm_falls(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            message = event.message
            try:
                verdict = decode(Verdict, message.value)
            except SchemaError as exc:
                log.warning(
                    "dead letter from %s partition %s offset %s: %s",
                    message.topic, message.partition, message.offset, exc,
                )
                # faust's Message has the ConsumerRecord fields dead_letter_for reads
                dead_letter = dead_letter_for(SERVICE, message, str(exc))
                await dead_letters.send(key=message.key, value=encode(dead_letter))
                continue
            stored = cameras.get(verdict.camera_id)
            state = (
                CameraState(rule=rule, **stored)
                if stored is not None
                else CameraState(rule=rule, camera_id=verdict.camera_id)
            )
            alert = state.observe(verdict)
            # faust only writes the changelog on assignment, never for an in-place change
            cameras[verdict.camera_id] = state.model_dump(mode="json")
            if alert is not None:
                await store.save(alert)
                await fall_events.send(key=alert.camera_id.encode(), value=encode(alert))
                log.info(
                    "alert %s opened: camera %s, room %s, rule %s, confidence %.2f, evidence %s",
                    alert.alert_id, alert.camera_id, alert.room, alert.rule, alert.confidence,
                    ", ".join(alert.evidence_frame_ids),
                )

    @app.on_before_shutdown.connect
    async def close_store(sender: faust.App, **kwargs: Any) -> None:
        await store.close()

    return app


def run_alerting(settings: Settings) -> None:
    """Run the alerting worker until SIGINT or SIGTERM (faust's worker handles both)."""
    configure_logging(settings.log_level)
    app = make_app(settings)
    log.info(
        "alerting %s: rule %s within %.0f s, cooldown %.0f s, on %s",
        settings.alerting.app_id, rule_name(settings.alerting), settings.alerting.window_s,
        settings.alerting.cooldown_s, settings.kafka.topics.verdicts,
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
    log.info("alerting stopped")
