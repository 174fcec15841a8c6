"""The caregivers' web dashboard (`fallwatch dashboard`): FastAPI, live updates by server-sent events.

The page (`alerting/static/dashboard.html`) shows the open and acknowledged
alerts per room with their snapshot and Acknowledge / False alarm / Resolve
buttons. Everything under /api needs `Authorization: Bearer <alerting.dashboard_token>`;
the page asks for the token and sends it with `fetch` (also for the event
stream, which is why it reads the stream with `fetch` and not `EventSource`,
which cannot send headers).

The API is one `APIRouter` (`api`); its handlers find the store, the
answers and the metrics on `app.state`. A caregiver's answer takes the path of
`alerting.answers`, shared with the MQTT buttons. Redis errors become one 503.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from alerting.answers import Action, AnswerRefused, Answers
from alerting.metrics import DashboardMetrics
from alerting.notifications import Notifier, link_is_valid, plain_rule
from alerting.store import AlertStore
from core.kafka_io import make_producer, start_clients
from core.logs import configure_logging
from core.metrics import listening_socket
from core.settings import ConfigError, Settings
from schemas import FallEvent, Label, decode

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "dashboard.html"
STREAM_BLOCK_MS = 1000  # below the Redis client's socket timeout
REDIS_DOWN_RETRY_S = 1.0

bearer = HTTPBearer(auto_error=False)


class Answer(BaseModel):
    by: str = Field(min_length=1, max_length=200, description="who answers (shown in the label)")


class AlertView(FallEvent):
    """An alert as the page shows it."""

    rule_text: str = Field(description="the rule in plain words, e.g. 'confirmed by the cloud model'")
    escalated: bool = Field(False, description="nobody acknowledged it in time")


class ActiveAlerts(BaseModel):
    rooms: dict[str, list[AlertView]] = Field(description="open and acknowledged alerts by room, oldest first")


class ClosedAlert(BaseModel):
    alert: AlertView
    answered_by: str | None = Field(description="who answered (null: the rule resolved it, nobody answered)")
    open_for_s: float = Field(description="from opening to closing")


class History(BaseModel):
    closed: list[ClosedAlert] = Field(description="newest first")


class AnswerResult(BaseModel):
    alert: FallEvent
    label: Label | None


def view(alert: FallEvent, escalated: bool = False) -> AlertView:
    return AlertView(**alert.model_dump(), rule_text=plain_rule(alert.rule), escalated=escalated)


async def active_by_room(store: AlertStore) -> ActiveAlerts:
    alerts = await store.active_alerts()
    escalated = await store.escalated([alert.alert_id for alert in alerts])
    rooms: dict[str, list[AlertView]] = {}
    for alert in alerts:
        rooms.setdefault(alert.room, []).append(view(alert, alert.alert_id in escalated))
    return ActiveAlerts(rooms=dict(sorted(rooms.items())))


def store_of(request: Request) -> AlertStore:
    store: AlertStore = request.app.state.store
    return store


def authorized(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    token: str = request.app.state.token
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})


Store = Annotated[AlertStore, Depends(store_of)]
api = APIRouter(prefix="/api", dependencies=[Depends(authorized)])


@api.get("/alerts")
async def active_alerts(store: Store) -> ActiveAlerts:
    return await active_by_room(store)


@api.get("/history")
async def history(store: Store, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> History:
    """Closed alerts, newest first, with who answered and how long they were open."""
    closed = await store.closed_alerts(limit)
    return History(
        closed=[
            ClosedAlert(
                alert=view(alert),
                answered_by=alert.answered_by,
                open_for_s=round((alert.updated_at - alert.opened_at).total_seconds(), 1),
            )
            for alert in closed
        ]
    )


@api.get("/alerts/{alert_id}/snapshot")
async def snapshot(alert_id: str, store: Store) -> Response:
    jpeg = await store.snapshot(alert_id)
    if jpeg is None:
        raise HTTPException(404, "no snapshot (not fetched yet, or expired)")
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


@api.get("/alerts/{alert_id}/evidence/{frame_id}")
async def evidence_frame(alert_id: str, frame_id: str, store: Store) -> Response:
    jpeg = await store.evidence_frame(alert_id, frame_id)
    if jpeg is None:
        raise HTTPException(404, "no such evidence frame (not fetched yet, or expired)")
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


@api.post("/alerts/{alert_id}/{action}")
async def answer(alert_id: str, action: Action, body: Answer, request: Request) -> AnswerResult:
    answers: Answers = request.app.state.answers
    metrics: DashboardMetrics = request.app.state.metrics
    try:
        answered = await answers.answer(alert_id, action, body.by)
    except AnswerRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    if answered.label is not None:
        metrics.answered(answered.label.verdict)
    if answered.alert.state == "acknowledged":
        metrics.ack_latency.observe((answered.alert.updated_at - answered.before.opened_at).total_seconds())
    return AnswerResult(alert=answered.alert, label=answered.label)


@api.get("/events")
async def events(request: Request, store: Store) -> StreamingResponse:
    """Server-sent events: a `snapshot` of the active alerts, then every change from the Redis stream."""
    after = await store.last_event_id()
    current = await active_by_room(store)

    async def stream() -> AsyncIterator[str]:
        nonlocal after
        yield sse("snapshot", current.model_dump_json(), after)
        while not await request.is_disconnected():
            try:
                entries = await store.read_events(after, STREAM_BLOCK_MS)
            except (RedisError, OSError) as exc:
                log.warning("event stream paused, Redis unavailable: %s", exc)
                yield ": redis unavailable\n\n"
                await asyncio.sleep(REDIS_DOWN_RETRY_S)  # the stream stays open; read again then
                continue
            if not entries:
                yield ": keep-alive\n\n"
            for entry_id, fields in entries:
                after = entry_id
                alert = view(decode(FallEvent, fields["event"].encode()), escalated=fields["kind"] == "escalation")
                yield sse(fields["kind"], alert.model_dump_json(), entry_id)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def sse(event: str, data: str, event_id: str) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {data}\n\n"


async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"alert store unavailable: {exc}"}, status_code=503)


async def signed_snapshot(alert_id: str, expires: int, signature: str, request: Request) -> Response:
    """A snapshot by its signed link (`alerting.notifications`): for phones and Home Assistant, no token needed."""
    if not link_is_valid(request.app.state.token, alert_id, expires, signature, time.time()):
        raise HTTPException(403, "the snapshot link is invalid or expired")
    return await snapshot(alert_id, store_of(request))


def make_dashboard(settings: Settings) -> FastAPI:
    token = settings.alerting.dashboard_key()
    if not token:
        raise ConfigError(
            "the dashboard needs a bearer token: set alerting.dashboard_token "
            "(e.g. FALLWATCH_ALERTING__DASHBOARD_TOKEN) or alerting.dashboard_token_file"
        )
    store = AlertStore(settings.redis, settings.alerting.stream_maxlen)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # aiokafka clients belong to the running event loop, so the producer is made here
        producer = make_producer(settings)
        await start_clients(settings, producer)

        async def publish(topic: str, key: bytes, value: bytes) -> None:
            await producer.send_and_wait(topic, key=key, value=value)

        app.state.answers = Answers(settings.kafka.topics, store, Notifier(settings.alerting), publish)
        try:
            yield
        finally:
            await producer.stop()
            await store.close()

    app = FastAPI(title="fallwatch dashboard", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.token, app.state.store, app.state.metrics = token, store, DashboardMetrics()
    app.add_exception_handler(RedisError, store_unavailable)
    app.add_exception_handler(OSError, store_unavailable)
    app.include_router(api)
    app.add_api_route("/snapshots/{alert_id}", signed_snapshot)
    app.add_api_route("/", lambda: PAGE.read_text(), response_class=HTMLResponse)
    app.add_api_route("/healthz", lambda: {"status": "ok"})
    app.add_api_route(
        "/metrics",
        lambda: Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST),
    )
    return app


def run_dashboard(settings: Settings) -> None:
    configure_logging(settings.log_level)
    app = make_dashboard(settings)
    log.info("dashboard on http://%s:%d/", settings.alerting.dashboard_host, settings.alerting.dashboard_port)
    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown), then restores these handlers and raises
    # the signal again: with them that is an ordinary return, so a stopped dashboard exits with status 0
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda signum, frame: None)
    # bound here, so a port in use is one line naming the setting (uvicorn would log it and exit 1)
    sock = listening_socket(
        settings.alerting.dashboard_host, settings.alerting.dashboard_port, "alerting.dashboard_port"
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level=settings.log_level.lower(), access_log=False))
    server.run(sockets=[sock])
