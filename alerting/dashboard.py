"""The caregivers' web dashboard (`fallwatch dashboard`): FastAPI, live updates by server-sent events.

The page (`alerting/static/dashboard.html`) shows the open and acknowledged
alerts per room with their snapshot and Acknowledge / False alarm / Resolve
buttons. Everything under /api needs `Authorization: Bearer <alerting.dashboard_token>`;
the page asks for the token and sends it with `fetch` (also for the event
stream, which is why it reads the stream with `fetch` and not `EventSource`,
which cannot send headers).

A caregiver's answer is a state change and a label: both go to Kafka first
(`fall-events`, where the alerting service learns of it, and `labels`, for
dmd_offline), then to Redis, so the page updates at once; the alerting service
writing the same change again is a no-op.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import uvicorn
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from alerting.metrics import DashboardMetrics
from alerting.store import AlertStore
from core.kafka_io import make_producer, start_clients
from core.logs import configure_logging
from core.settings import ConfigError, Settings
from schemas import AlertState, FallEvent, Label, LabelVerdict, encode, utc_now

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "dashboard.html"
STREAM_BLOCK_MS = 1000  # below the Redis client's socket timeout
LABEL_ID_NAMESPACE = uuid.UUID("0b7c4a52-93e1-4f6e-8f3d-5a2e61c0d7a4")

Action = Literal["acknowledge", "false-alarm", "resolve"]


@dataclass(frozen=True)
class Transition:
    allowed_from: tuple[AlertState, ...]
    to: AlertState
    label: LabelVerdict | None


TRANSITIONS: dict[str, Transition] = {
    "acknowledge": Transition(("open",), "acknowledged", "true_fall"),
    "false-alarm": Transition(("open", "acknowledged"), "false_alarm", "false_alarm"),
    "resolve": Transition(("acknowledged",), "resolved", None),
}


def label_id_for(alert_id: str, verdict: LabelVerdict) -> str:
    """Deterministic: the same answer on the same alert is the same label."""
    return str(uuid.uuid5(LABEL_ID_NAMESPACE, f"{alert_id}/{verdict}"))


def label_for(alert: FallEvent, verdict: LabelVerdict, by: str) -> Label:
    return Label(
        label_id=label_id_for(alert.alert_id, verdict),
        alert_id=alert.alert_id,
        camera_id=alert.camera_id,
        room=alert.room,
        frame_ids=alert.evidence_frame_ids,
        verdict=verdict,
        labelled_by=by,
    )


class Answer(BaseModel):
    by: str = Field(min_length=1, max_length=200, description="who answers (shown in the label)")


def alerts_by_room(alerts: list[FallEvent]) -> dict[str, list[dict[str, object]]]:
    rooms: dict[str, list[dict[str, object]]] = {}
    for alert in alerts:
        rooms.setdefault(alert.room, []).append(alert.model_dump(mode="json"))
    return dict(sorted(rooms.items()))


def make_dashboard(settings: Settings) -> FastAPI:
    token = settings.alerting.dashboard_token
    if not token:
        raise ConfigError(
            "the dashboard needs a bearer token: set alerting.dashboard_token "
            "(e.g. FALLWATCH_ALERTING__DASHBOARD_TOKEN)"
        )
    topics = settings.kafka.topics
    store = AlertStore(settings.redis, settings.alerting.stream_maxlen)
    metrics = DashboardMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # aiokafka clients belong to the running event loop, so the producer is made here
        app.state.producer = make_producer(settings)
        await start_clients(settings, app.state.producer)
        try:
            yield
        finally:
            await app.state.producer.stop()
            await store.close()

    app = FastAPI(title="fallwatch dashboard", lifespan=lifespan, docs_url=None, redoc_url=None)

    def authorized(authorization: Annotated[str | None, Header()] = None) -> None:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorized)]

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.read_text()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/alerts", dependencies=auth)
    async def active_alerts() -> dict[str, object]:
        try:
            return {"rooms": alerts_by_room(await store.active_alerts())}
        except (RedisError, OSError) as exc:
            raise HTTPException(503, f"alert store unavailable: {exc}") from None

    @app.get("/api/alerts/{alert_id}/snapshot", dependencies=auth)
    async def snapshot(alert_id: str) -> Response:
        try:
            jpeg = await store.snapshot(alert_id)
        except (RedisError, OSError) as exc:
            raise HTTPException(503, f"alert store unavailable: {exc}") from None
        if jpeg is None:
            raise HTTPException(404, "no snapshot (not fetched yet, or expired)")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.post("/api/alerts/{alert_id}/{action}", dependencies=auth)
    async def answer(alert_id: str, action: Action, body: Answer, request: Request) -> dict[str, object]:
        producer: AIOKafkaProducer = request.app.state.producer
        transition = TRANSITIONS[action]
        try:
            alert = await store.alert(alert_id)
        except (RedisError, OSError) as exc:
            raise HTTPException(503, f"alert store unavailable: {exc}") from None
        if alert is None:
            raise HTTPException(404, f"no alert {alert_id}")
        if alert.state not in transition.allowed_from:
            raise HTTPException(409, f"alert {alert_id} is {alert.state}; cannot {action} it")
        changed = alert.model_copy(update={"state": transition.to, "updated_at": utc_now()})
        label = label_for(changed, transition.label, body.by) if transition.label is not None else None
        key = alert.camera_id.encode()
        try:
            await producer.send_and_wait(topics.fall_events, key=key, value=encode(changed))
            if label is not None:
                await producer.send_and_wait(topics.labels, key=key, value=encode(label))
        except KafkaError as exc:
            raise HTTPException(503, f"could not publish the answer: {exc}") from None
        try:
            await store.apply(changed)
            if label is not None:
                await store.save_label(label)
        except (RedisError, OSError) as exc:
            # it is on Kafka: the alerting service writes it to Redis when Redis is back
            log.error("answer on alert %s published but not stored in Redis: %s", alert_id, exc)
        if label is not None:
            metrics.answered(label.verdict)
        if transition.to == "acknowledged":
            metrics.ack_latency.observe((changed.updated_at - alert.opened_at).total_seconds())
        log.info("alert %s %s by %s", alert_id, transition.to, body.by)
        return {"alert": changed.model_dump(mode="json"), "label": label.model_dump(mode="json") if label else None}

    @app.get("/api/events", dependencies=auth)
    async def events(request: Request) -> StreamingResponse:
        """Server-sent events: a `snapshot` of the active alerts, then every change from the Redis stream."""
        try:
            after = await store.last_event_id()
            current = alerts_by_room(await store.active_alerts())
        except (RedisError, OSError) as exc:
            raise HTTPException(503, f"alert store unavailable: {exc}") from None

        async def stream() -> AsyncIterator[str]:
            nonlocal after
            yield sse("snapshot", json.dumps({"rooms": current}), after)
            while not await request.is_disconnected():
                try:
                    entries = await store.read_events(after, STREAM_BLOCK_MS)
                except (RedisError, OSError) as exc:
                    log.warning("event stream paused, Redis unavailable: %s", exc)
                    yield ": redis unavailable\n\n"
                    await asyncio.sleep(1.0)  # retry interval while Redis is down
                    continue
                if not entries:
                    yield ": keep-alive\n\n"
                for entry_id, fields in entries:
                    after = entry_id
                    yield sse(fields["kind"], fields["event"], entry_id)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    return app


def sse(event: str, data: str, event_id: str) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {data}\n\n"


def run_dashboard(settings: Settings) -> None:
    configure_logging(settings.log_level)
    app = make_dashboard(settings)
    log.info("dashboard on http://%s:%d/", settings.alerting.dashboard_host, settings.alerting.dashboard_port)
    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown), then restores these handlers and raises
    # the signal again: with them that is an ordinary return, so a stopped dashboard exits with status 0
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda signum, frame: None)
    uvicorn.run(
        app,
        host=settings.alerting.dashboard_host,
        port=settings.alerting.dashboard_port,
        log_level=settings.log_level.lower(),
        access_log=False,
    )
