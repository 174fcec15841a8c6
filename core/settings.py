"""The one settings model of fallwatch.

Sources, highest priority first:
1. environment variables `FALLWATCH_<SECTION>__<FIELD>` (e.g. `FALLWATCH_KAFKA__BOOTSTRAP_SERVERS`);
2. the YAML file named by `FALLWATCH_CONFIG` (or `fallwatch --config FILE`);
3. the addresses of the local stack started by `fallwatch stack up` (its `stack.json`);
4. the defaults below.
Secrets may also come from files (`*_file` fields: mounted Docker secrets), read when the settings load.

A service loads only the sections it uses (`load_settings(sections=...)`): a mistake in the
alerting section must not stop a camera producer. `config/fallwatch.example.yaml` documents every field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import yaml
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from schemas import Topics

CONFIG_ENV = "FALLWATCH_CONFIG"
STATE_DIR_ENV = "FALLWATCH_STATE_DIR"


class ConfigError(Exception):
    """A user mistake in configuration or on the command line; shown as one readable line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def read_secret(value: SecretStr | None, file: Path | None, what: str) -> str | None:
    """A secret given inline (or by environment variable) or in a file (a mounted secret), never both."""
    if value is not None and file is not None:
        raise ValueError(f"give {what} or {what}_file, not both")
    if file is None:
        return value.get_secret_value() if value is not None else None
    try:
        return file.read_text().strip()
    except OSError as exc:
        raise ValueError(f"{what}_file {file} cannot be read: {exc.strerror}") from None


def secret_or_file(value: str, file: Path | None, what: str) -> str:
    """A secret setting kept as a plain string ("": not set), or the content of its file."""
    return read_secret(SecretStr(value) if value else None, file, what) or ""


class KafkaSettings(Section):
    bootstrap_servers: str = "localhost:9092"
    topics: Topics = Topics()
    partitions: int = Field(4, ge=1, description="partitions of each topic created by fallwatch")
    replication_factor: int = Field(
        1, ge=1, description="copies of each partition in topics created by fallwatch (3 on a 3-broker cluster)"
    )
    frames_retention_hours: float = Field(
        24.0, gt=0, description="retention of the `frames` topic: residents' images, keep it short"
    )
    dead_letters_retention_hours: float = Field(
        168.0, gt=0, description="retention of the `dead-letters` topic (set when fallwatch creates it)"
    )
    connect_timeout_s: float = Field(
        60.0, gt=0, description="a service starting while Kafka is unreachable retries this long, then gives up"
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="how every client (aiokafka, faust) talks to the brokers"
    )
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = Field(None, description="also FALLWATCH_KAFKA__SASL_PASSWORD")
    sasl_password_file: Path | None = Field(None, description="a file holding the SASL password (a mounted secret)")
    ssl_cafile: Path | None = Field(None, description="CA certificate(s) of the brokers (null: the system's)")
    ssl_certfile: Path | None = Field(None, description="client certificate, for brokers that require one")
    ssl_keyfile: Path | None = Field(None, description="its private key")
    ssl_check_hostname: bool = Field(True, description="the broker's certificate must name the host connected to")

    @field_validator("bootstrap_servers")
    @classmethod
    def host_and_port_each(cls, servers: str) -> str:
        for server in servers.split(","):
            host, colon, port = server.strip().rpartition(":")
            if not colon or not host or "/" in server or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{server.strip()!r} is not host:port (a comma-separated list, no scheme)")
        return servers

    @model_validator(mode="after")
    def sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL"):
            if not self.sasl_username:
                raise ValueError(f"security_protocol {self.security_protocol} needs sasl_username")
            if self.password() is None:
                raise ValueError(f"security_protocol {self.security_protocol} needs sasl_password or its file")
        return self

    def password(self) -> str | None:
        return read_secret(self.sasl_password, self.sasl_password_file, "sasl_password")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")


class RedisSettings(Section):
    url: str = Field("redis://localhost:6379/0", description="redis:// or rediss:// (TLS)")
    username: str | None = Field(None, description="ACL user (null: the default user)")
    password: SecretStr | None = Field(None, description="also FALLWATCH_REDIS__PASSWORD")
    password_file: Path | None = Field(None, description="a file holding the password (a mounted secret)")
    ssl_ca_certs: Path | None = Field(None, description="rediss://: CA certificate(s) of the server (null: system)")
    ssl_check_hostname: bool = Field(True, description="rediss://: the certificate must name the host")

    @field_validator("url")
    @classmethod
    def redis_scheme(cls, url: str) -> str:
        if urlsplit(url).scheme not in ("redis", "rediss", "unix"):  # the URL is not echoed: it may hold a password
            raise ValueError("must start with redis://, rediss:// (TLS) or unix://")
        return url

    @model_validator(mode="after")
    def readable_password(self) -> RedisSettings:
        self.secret()
        return self

    def secret(self) -> str | None:
        return read_secret(self.password, self.password_file, "password")


class MotionSettings(Section):
    enabled: bool = Field(True, description="skip sampled frames without motion (heartbeats still pass)")
    threshold: int = Field(25, ge=1, le=255, description="grey-level change that makes a pixel count as changed")
    min_area: float = Field(0.005, gt=0, le=1, description="share of changed pixels that counts as motion")
    heartbeat_s: float = Field(10.0, gt=0, description="publish a frame at least this often even without motion")
    width: int = Field(160, ge=16, le=1920, description="width of the grey frame compared (smaller: cheaper)")


UnitFloat = Annotated[float, Field(ge=0.0, le=1.0)]


Polygon = Annotated[list[tuple[UnitFloat, UnitFloat]], Field(min_length=3)]


class ZoneSettings(Section):
    name: str = Field(min_length=1, description="what the area is, e.g. bed")
    polygon: Polygon = Field(description="[x, y] points in 0..1 of the frame")
    alerts: bool = Field(
        False,
        description="false: a person located lying inside opens no fall alert (a bed, a sofa); "
        "true: the zone is only named",
    )


class CameraSettings(Section):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    room: str = Field(min_length=1)
    url: str = Field(min_length=1, description="video file path, rtsp://, http(s):// or /dev/videoN")
    detect_url: str | None = Field(
        None, description="the camera's low-resolution sub-stream, sampled instead of url (which is left alone)"
    )
    fps: float = Field(2.0, gt=0, le=30, description="target sampling rate")
    decode: Literal["auto", "keyframes", "all"] = Field(
        "auto",
        description="auto: decode only the frames the sampled ones depend on (PyAV); keyframes: only keyframes, "
        "while they come at least as often as fps; all: decode every frame (OpenCV)",
    )
    hardware_decode: bool = Field(False, description="decode on the GPU/VA-API when the machine has one, else CPU")
    masks: list[Polygon] = Field(
        default_factory=list,
        description="privacy masks: polygons of [x, y] points in 0..1 of the frame, blacked out before a frame "
        "leaves the producer",
    )
    zones: list[ZoneSettings] = Field(
        default_factory=list,
        description="named areas of the frame; a person down inside one with alerts: false opens no fall alert",
    )
    resize: tuple[PositiveInt, PositiveInt] | None = Field(
        None, description="[width, height] of the published frames (null: as captured)"
    )
    jpeg_quality: int = Field(85, ge=10, le=100)
    motion: MotionSettings = MotionSettings()
    loop: bool = False
    realtime: bool = Field(True, description="play a video file back at its own speed, like a live camera")
    enabled: bool = True
    password_file: Path | None = Field(
        None, description="file holding the password of the url's user (a Docker secret), e.g. rtsp://admin@host/..."
    )
    _password: str | None = PrivateAttr(None)

    @field_validator("url", "detect_url")
    @classmethod
    def usable_url(cls, url: str | None) -> str | None:
        from core.urls import url_problem

        problem = None if url is None else url_problem(url)
        if problem is not None:
            raise ValueError(problem)
        return url

    @model_validator(mode="after")
    def password_from_file(self) -> CameraSettings:
        if self.password_file is None:
            return self
        parts = urlsplit(self.url)
        if not parts.username:
            raise ValueError("password_file needs a user in the url, e.g. rtsp://admin@host/stream")
        if parts.password is not None:
            raise ValueError("give the password in the url or in password_file, not both")
        self._password = read_secret(None, self.password_file, "password")
        return self

    @property
    def sampled_url(self) -> str:
        """The url the producer reads: the detect sub-stream when there is one (may hold credentials)."""
        return self.detect_url or self.url

    @property
    def source_url(self) -> str:
        """`sampled_url` to open: with the password from `password_file` when there is one (never log it)."""
        url = self.sampled_url
        parts = urlsplit(url)
        if self._password is None or not parts.username or parts.password is not None:
            return url
        netloc = f"{parts.username}:{quote(self._password, safe='')}@{parts.netloc.split('@', 1)[1]}"
        return urlunsplit(parts._replace(netloc=netloc))


class ProducerSettings(Section):
    cameras: list[CameraSettings] = Field(default_factory=list)
    max_cameras: int = Field(64, ge=1, description="cameras one producer process serves (a capture thread each)")
    queue_size: int = Field(8, ge=1, description="frames per camera waiting for Kafka; when full the oldest is dropped")
    drain_timeout_s: float = Field(
        5.0,
        gt=0,
        description="on stop, how long Kafka gets to acknowledge what is queued (a broker that is down: lost)",
    )
    open_timeout_s: float = Field(10.0, gt=0, description="connecting to a stream gives up after this long")
    stall_timeout_s: float = Field(10.0, gt=0, description="a stream that delivers no frame this long is reconnected")
    reconnect_initial_s: float = Field(1.0, gt=0, description="first reconnect delay; doubles per failure, jittered")
    reconnect_max_s: float = Field(30.0, gt=0, description="longest reconnect delay")
    status_interval_s: float = Field(2.0, gt=0, description="how often each camera's status is written to Redis")
    status_key_prefix: str = Field("fallwatch:cameras", min_length=1, description="Redis keys <prefix>:<camera id>")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port (0 or null: off)")

    @field_validator("cameras")
    @classmethod
    def unique_ids(cls, cameras: list[CameraSettings]) -> list[CameraSettings]:
        seen: set[str] = set()
        for camera in cameras:
            if camera.id in seen:
                raise ValueError(f"duplicate camera id {camera.id!r}")
            seen.add(camera.id)
        return cameras

    @model_validator(mode="after")
    def backoff_in_order(self) -> ProducerSettings:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) must not be below reconnect_initial_s "
                f"({self.reconnect_initial_s})"
            )
        return self


DEFAULT_QUESTION = "Is the person falling or lying on the floor?"


class DriftSettings(Section):
    """The edge worker's per-camera drift guard and learning mode (`edge_workers.drift`)."""

    drift_window: int = Field(120, ge=1, description="a camera's last this many frames are compared")
    drift_min_frames: int = Field(40, ge=1, description="no verdict on drift before this many frames")
    fall_rate_tolerance: float = Field(0.25, gt=0, le=1, description="edge fall rate off by more: drift")
    offload_share_tolerance: float = Field(0.3, gt=0, le=1, description="offload share off by more: drift")
    score_distance_tolerance: float = Field(
        0.35, gt=0, le=1, description="switcher scores' KS distance from the calibration deciles above this: drift"
    )
    raise_cloud_share_on_drift: bool = Field(True, description="a drifting camera is in learning mode")
    learning_s: float = Field(
        0.0, ge=0, description="a camera is in learning mode for this long after the worker first sees it"
    )
    learning_exploration_rate: float = Field(
        0.3, ge=0, le=1, description="exploration share in learning mode (within the offload budget)"
    )

    @model_validator(mode="after")
    def window_holds_the_minimum(self) -> DriftSettings:
        if self.drift_min_frames > self.drift_window:
            raise ValueError(
                f"drift_min_frames ({self.drift_min_frames}) must not exceed drift_window ({self.drift_window}): "
                "no camera would ever be judged"
            )
        return self


class EdgeSettings(Section):
    model: str = Field("dandelin/vilt-b32-finetuned-vqa", description="hub id or local directory")
    revision: str | None = None
    question: str = DEFAULT_QUESTION
    group_id: str = "fallwatch-edge"
    batch_size: int = Field(8, ge=1)
    # at least 1: getmany(timeout_ms=0) never yields to the fetcher, so a worker would never see a record
    batch_wait_ms: int = Field(50, ge=1)
    switcher_registry: Path = Field(Path("models/switchers"), description="directory of switcher versions")
    model_registry: Path | None = Field(
        None,
        description="directory of edge model + switcher versions (`fallwatch dmd adapt`); when set, the worker "
        "serves its ACTIVE version instead of `model` and `switcher_registry`",
    )
    drift: DriftSettings = Field(default_factory=DriftSettings)
    decision_threshold: float = Field(0.5, ge=0, le=1, description="P(fall) at or above which a frame is a fall")
    clip_frames: int = Field(8, ge=1, description="frames in the clip sent with an offloaded frame")
    clip_seconds: float = Field(4.0, gt=0, description="the clip covers at most this much recent time")
    clip_ttl_s: int = Field(300, ge=1, description="TTL of clip JPEGs in Redis (claim check)")
    cloud_deadline_s: float = Field(
        10.0,
        gt=0,
        description="after this a cloud answer is no longer useful; at most alerting.cloud_wait_s, which stops "
        "waiting for it then (a later answer costs the GPU and is a second final verdict of the frame)",
    )
    max_frame_bytes: int = Field(4_000_000, ge=1)
    min_frame_side: int = Field(16, ge=1, description="a frame narrower or lower than this many pixels is refused")
    max_frame_pixels: int = Field(
        4096 * 4096, ge=1, description="a frame of more pixels is refused before it is decoded (memory)"
    )
    known_cameras: list[str] = Field(
        default_factory=list, description="camera ids this worker answers; others are dead-lettered (empty: any)"
    )
    switcher_threshold: float | None = Field(
        None, ge=0, le=1, description="agreement threshold instead of the switcher's own (null: the switcher's)"
    )
    max_offload_ratio: float | None = Field(
        None, ge=0, le=1, description="offload budget: at most this share of frames to the cloud per window"
    )
    max_offload_fps: float | None = Field(
        None, ge=0, description="offload budget: at most this many frames/s to the cloud, averaged over the window"
    )
    offload_window_s: float = Field(60.0, gt=0, description="sliding window of the offload budget")
    offload_budget_key: str | None = Field(
        None,
        min_length=1,
        description="Redis key the offload budget is counted under, with every edge worker naming it (a facility's "
        "cloud capacity); null: each worker counts its own. Without Redis each worker keeps its own",
    )
    exploration_rate: float = Field(
        0.0, ge=0, le=1, description="share of confident frames also sent to the cloud, marked `exploration`"
    )
    exploration_seed: int | None = Field(None, description="seed of the exploration draws (null: random)")
    registry_poll_s: float = Field(5.0, gt=0, description="how often the switcher registry is checked")
    registry_announce_key: str | None = Field(
        "fallwatch:switcher:announced", description="Redis key naming a new version: checked every batch"
    )
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port (0 or null: off)")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads of the edge model (null: torch's choice)")
    decode_threads: int = Field(2, ge=1, description="threads decoding the JPEGs of a batch")
    quantize_int8: bool | Literal["auto"] = Field(
        False,
        description="dynamic int8 Linear layers on CPU (faster); auto: on when the calibration frames keep fp32's "
        "decisions within calibration_tolerance",
    )
    bf16_autocast: bool | Literal["auto"] = Field(
        False,
        description="matmuls in bf16: faster on CPUs with bf16 units, else slower; auto: as quantize_int8",
    )
    calibration_frames: Path | None = Field(
        None, description="folder of JPEG frames from your cameras for the auto checks (null: the shipped frames)"
    )
    calibration_tolerance: float = Field(
        0.02, gt=0, lt=1, description="auto: the largest change of P(fall) on a calibration frame an option may make"
    )


class CloudSettings(Section):
    model: str = Field("llava-hf/LLaVA-NeXT-Video-7B-hf", description="hub id or local directory")
    revision: str | None = None
    question: str = DEFAULT_QUESTION
    group_id: str = "fallwatch-cloud"
    num_frames: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1, description="at most this many requests per model forward")
    batch_wait_ms: int = Field(100, ge=0, description="a batch closes this long after its first request arrived")
    decision_threshold: float = Field(0.5, ge=0, le=1, description="P(fall) at or above which a clip is a fall")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:0'…")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device_map: str | None = Field(
        None, description="accelerate device map ('auto', 'balanced'…) to spread the model over GPUs; replaces device"
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads of a model on the CPU (null: torch's choice; 1 on a shared CPU)"
    )
    poll_idle_ms: int = Field(500, ge=1, description="wait for a first request this long before checking for stop")
    keepalive_s: float = Field(
        1.0, gt=0, description="while waiting for the model (partitions paused), poll this often to stay in the group"
    )
    max_poll_interval_ms: int = Field(
        60_000, ge=1000, description="Kafka max.poll.interval.ms: a worker not polling this long leaves the group"
    )
    stuck_batch_s: float = Field(
        60.0,
        gt=0,
        description="a batch in the model this long is stuck (a hung GPU): the worker stops polling, so the group "
        "hands its partitions to another worker after max_poll_interval_ms",
    )
    frame_fetch_timeout_s: float = Field(10.0, gt=0, description="reading an expired clip's frame back from `frames`")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port (0 or null: off)")

    @model_validator(mode="after")
    def keepalive_well_inside_the_poll_interval(self) -> CloudSettings:
        # A keepalive poll can be late by an event-loop hiccup; half the interval leaves room for it.
        if self.keepalive_s * 1000 > self.max_poll_interval_ms / 2:
            raise ValueError(
                f"keepalive_s ({self.keepalive_s}) must be at most half of max_poll_interval_ms "
                f"({self.max_poll_interval_ms}), or a slow batch costs the worker its partitions"
            )
        return self


class AlertRule(Section):
    """How alerting decides that a person is down, and alerts, escalates and closes (defaults, or `alerting.rooms`).

    The person-down state of a camera (see `alerting.rules`): down when k of the last n final verdicts
    are falls and the falls have lasted `down_for_s`, or at a sure cloud fall with a second fall close
    to it; up again after n − k + 1 non-fall verdicts in a row spanning `up_after_s`.
    """

    k: int = Field(3, ge=2, description="falls among the last n final verdicts that make a person down (one never)")
    n: int = Field(5, ge=1)
    window_s: float = Field(30.0, gt=0, description="verdicts captured this long before the newest are too late")
    down_for_s: float = Field(
        2.0, ge=0, description="...and the falls have lasted this long (first fall verdict to the newest)"
    )
    up_after_s: float = Field(
        2.0, ge=0, description="a person down is up again after n − k + 1 non-falls in a row spanning this long"
    )
    cooldown_s: float = Field(60.0, ge=0, description="no new alert for a camera this long after its last closed")
    cloud_confirm_probability: float = Field(
        0.9, ge=0, le=1, description="a final cloud fall verdict at least this sure confirms with one more fall"
    )
    confirm_within_s: float = Field(
        0.0, ge=0, description="... when that second fall verdict is at most this far from it (0: off)"
    )
    cloud_wait_s: float = Field(
        10.0, gt=0, description="D: wait this long for the cloud's verdict of an offloaded frame, then use the edge's"
    )
    escalate_after_s: float = Field(
        120.0, gt=0, description="E: an alert nobody acknowledged this long is re-sent on the escalation channel"
    )
    resolve_after_s: float = Field(
        120.0, gt=0, description="an acknowledged alert resolves after this long without a fall verdict"
    )

    @model_validator(mode="after")
    def k_at_most_n(self) -> AlertRule:
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must not exceed n ({self.n})")
        return self


class MqttSettings(Section):
    """MQTT delivery and Home Assistant discovery (`alerting.channels.mqtt`); off while `host` is empty."""

    host: str = Field("", description="broker host name (empty: no MQTT channel)")
    port: int = Field(1883, ge=1, le=65535, description="1883 plain, 8883 TLS by convention")
    username: str | None = Field(None, description="null: connect anonymously")
    password: SecretStr | None = Field(None, description="also FALLWATCH_ALERTING__MQTT__PASSWORD")
    password_file: Path | None = Field(None, description="a file holding the password (a mounted secret)")
    tls: bool = Field(False, description="connect with TLS")
    ca_file: Path | None = Field(None, description="TLS: CA certificate(s) of the broker (null: system)")
    topic_prefix: str = Field("fallwatch", pattern=r"^[A-Za-z0-9_/-]+$", description="root of fallwatch's topics")
    discovery_prefix: str = Field(
        "homeassistant", pattern=r"^[A-Za-z0-9_/-]+$", description="Home Assistant's discovery prefix"
    )
    keepalive_s: int = Field(30, ge=5, description="MQTT keep-alive; the broker publishes the will after 1.5 times")
    connect_timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def readable_password(self) -> MqttSettings:
        self.secret()
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.host)

    def secret(self) -> str | None:
        return read_secret(self.password, self.password_file, "password")


class AlertingSettings(AlertRule):
    app_id: str = "fallwatch-alerting"
    rooms: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="per-room overrides of the rule fields, e.g. {'101': {'k': 2}}"
    )
    tick_s: float = Field(0.5, gt=0, description="how often the cloud-wait and escalation deadlines are checked")
    session_timeout_s: float = Field(
        20.0, ge=6, description="a worker that died (kill -9) hands its cameras over after this long (faust: 60 s)"
    )
    webhook_urls: list[str] = Field(default_factory=list, description="POSTed every new alert")
    escalation_webhook_urls: list[str] = Field(default_factory=list, description="POSTed every escalated alert")
    webhook_secret: str = Field("", repr=False, description="HMAC-SHA256 key of the webhook signature")
    webhook_secret_file: Path | None = Field(None, description="file holding webhook_secret (a Docker secret)")
    webhook_attempts: int = Field(5, ge=1, description="tries per webhook delivery")
    webhook_backoff_s: float = Field(0.5, gt=0, description="first retry delay; doubles on each retry")
    webhook_timeout_s: float = Field(5.0, gt=0)
    snapshot_ttl_s: int = Field(3600, ge=1, description="TTL of an alert's evidence JPEG in Redis")
    max_verdict_bytes: int = Field(
        64 * 1024, ge=1024, description="a larger verdict record is dead-lettered (it would bloat the camera state)"
    )
    stream_maxlen: int = Field(10000, ge=1, description="approximate length cap of the caregiver Redis stream")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port (0 or null: off)")
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8088, ge=1, le=65535)
    dashboard_token: str = Field("", repr=False, description="bearer token of the dashboard; required to start it")
    dashboard_token_file: Path | None = Field(None, description="file holding dashboard_token (a Docker secret)")
    dashboard_url: str = Field(
        "", description="the dashboard as caregivers reach it, for snapshot links (empty: http://host:port)"
    )
    snapshot_link_ttl_s: int = Field(900, ge=1, description="how long a signed snapshot link stays valid")
    mqtt: MqttSettings = MqttSettings()

    @model_validator(mode="after")
    def valid_rooms_and_webhooks(self) -> AlertingSettings:
        for room in self.rooms:
            self.rule_for(room)
        self.dashboard_key()
        if (self.webhook_urls or self.escalation_webhook_urls) and not self.webhook_key():
            raise ValueError("webhook_secret (or webhook_secret_file) must be set when webhook urls are configured")
        return self

    def webhook_key(self) -> str:
        """The webhook signing key, from the setting or its file."""
        return secret_or_file(self.webhook_secret, self.webhook_secret_file, "webhook_secret")

    def dashboard_key(self) -> str:
        """The dashboard's bearer token, from the setting or its file ("" when neither is set)."""
        return secret_or_file(self.dashboard_token, self.dashboard_token_file, "dashboard_token")

    def public_dashboard_url(self) -> str:
        return (self.dashboard_url or f"http://{self.dashboard_host}:{self.dashboard_port}").rstrip("/")

    def rule_for(self, room: str) -> AlertRule:
        """The defaults with the room's overrides applied."""
        defaults = {name: getattr(self, name) for name in AlertRule.model_fields}
        try:
            return AlertRule(**{**defaults, **self.rooms.get(room, {})})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'rule'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"rooms.{room}: {problems}") from None


class AdaptSettings(Section):
    """`fallwatch dmd adapt`: the edge model learns the facility's frames (`dmd_offline.adapt`)."""

    trainable: str = Field(
        "all",
        pattern=r"^(all|head|last:[1-9][0-9]*)$",
        description="what of the edge model learns: all (a compact model), head (the VQA answer head), or "
        "last:N (the head and the last N transformer layers); the rest stays frozen",
    )
    original_data: Path | None = Field(
        None, description="image folder (labels.csv) the edge model learnt from: its train split is mixed in"
    )
    original_share: float = Field(
        0.5, ge=0, lt=1, description="share of each epoch's images drawn from original_data (not to forget)"
    )
    epochs: int = Field(4, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    folds: int = Field(2, ge=2, description="cross-fitting folds")
    cross_fit: Literal["camera", "time"] = Field(
        "camera",
        description="folds of whole cameras (the switcher learns the adapted edge's errors on rooms it did not "
        "learn), or of time blocks within each camera; camera needs at least `folds` cameras, else time is used",
    )
    gate_share: float = Field(
        0.3, gt=0, lt=1, description="share held out for the publish gate: of each camera's frames, or of the cameras"
    )
    gate_slice: Literal["time", "camera"] = Field(
        "time",
        description="the gate's held-out frames: each camera's latest (time), or every frame of a seeded share of "
        "the cameras (camera: how the version does on cameras it did not learn); camera needs two, else time is used",
    )
    gate_tolerance: float = Field(0.0, ge=0, le=1, description="how much worse than the running pair still passes")
    confidence_fallback: bool = Field(
        True,
        description="a learned switcher that does not earn its place (switcher_evidence) is replaced by one "
        "without weights that routes by the edge's confidence; off: it is published unless it routes worse than "
        "uncertainty deferral on the held-out slice, and then the candidate is refused",
    )
    switcher_evidence: float = Field(
        0.05,
        gt=0,
        le=1,
        description="with confidence_fallback, a learned switcher is published only where it routes better than "
        "uncertainty deferral on the held-out slice with a one-sided sign test's p-value at most this",
    )
    target_offload_share: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="the router's threshold defers this share of the candidate's held-out frames (by their scores)",
    )
    seed: int = 0


class DmdSettings(Section):
    workdir: Path = Field(Path("dmd-data"), description="DMD data set, trained switcher, threshold and report")
    source: Literal["kafka", "images", "videos"] = Field(
        "kafka", description="replay logged topics, a labelled image folder or an annotated video folder"
    )
    folder: Path | None = Field(None, description="images: folder with labels.csv; videos: folder with clips.csv")
    since: AwareDatetime | None = Field(None, description="kafka: replay records logged at or after this time")
    until: AwareDatetime | None = Field(None, description="kafka: replay records logged before this time")
    limit_per_split: int | None = Field(None, ge=1, description="images: only the first N images of each split")
    video_fps: float = Field(2.0, gt=0, le=30, description="videos: sampling rate, as a camera's")
    augment: int = Field(
        0, ge=0, le=50, description="images: augmented copies of each train / val image, both models answering each"
    )
    run_cloud_model: bool = Field(True, description="run the large model where no cloud verdict was logged")
    batch_size: int = Field(8, ge=1, description="inputs per model forward pass in the replay")
    shard_size: int = Field(512, ge=1, description="rows per data set shard (the unit of resuming)")
    seed: int = Field(0, description="switcher initialisation, shuffling, random baseline")
    val_share: float = Field(
        0.15, ge=0, lt=1, description="inputs without a split: share for validation (after train in time)"
    )
    test_share: float = Field(0.15, ge=0, lt=1, description="inputs without a split: the newest share, for testing")
    switcher_split: Literal["train", "val"] = Field(
        "train",
        description="split the switcher learns from; val when the model pair learnt from train (val_share of "
        "it is held out for early stopping, the pair's train rows are not used)",
    )
    switcher_inputs: Literal["hidden", "hidden+confidence", "hidden+confidence+history"] = Field(
        "hidden",
        description="the switcher reads the hidden vector (the paper's), or it and the edge's confidence, or also "
        "the edge's P(fall) on the camera's last `switcher_history` frames",
    )
    switcher_history: int = Field(
        4, ge=1, le=64, description="earlier frames of the camera a hidden+confidence+history switcher reads"
    )
    switcher_target: Literal["agreement", "deferral_helps"] = Field(
        "agreement",
        description="the models agree (the paper's), or deferral_helps: defer where the edge is wrong and the "
        "cloud right (rows with ground truth; the others keep agreement)",
    )
    learning_rate: float = Field(1e-4, gt=0, description="Adam, as the paper")
    train_batch_size: int = Field(32, ge=1)
    max_epochs: int = Field(200, ge=1)
    patience: int = Field(10, ge=1, description="early stopping: epochs without a better validation loss")
    buckets: int = Field(10, ge=1, description="threshold: buckets of the training split (the paper's 10)")
    bootstrap: int = Field(
        1000, ge=0, description="evaluate: bootstrap draws of whole groups (clips, cameras) for the F1 intervals"
    )
    target_offload_share: float | None = Field(
        None, ge=0, le=1, description="budget mode: defer this share instead of the bucket method's peak"
    )
    adapt: AdaptSettings = Field(default_factory=AdaptSettings)
    small_time_ms: float | None = Field(None, ge=0, description="edge time per frame where not measured")
    large_time_ms: float | None = Field(None, ge=0, description="cloud time per frame where not measured")
    small_energy_j: float | None = Field(None, ge=0, description="edge energy per frame (never measured)")
    large_energy_j: float | None = Field(None, ge=0, description="cloud energy per frame where not measured")

    @model_validator(mode="after")
    def shares_leave_training_data(self) -> DmdSettings:
        if self.val_share + self.test_share >= 1:
            raise ValueError(f"val_share + test_share ({self.val_share + self.test_share}) leaves nothing to train")
        return self


class CaptureTimeSettings(Section):
    """How far a record's capture time may be from the consumer's clock; records beyond are dead-lettered."""

    max_ahead_s: float = Field(
        300.0, gt=0, description="capture times later than now + this are refused (a camera clock gone wrong)"
    )
    max_age_h: float = Field(
        168.0, gt=0, description="capture times older than this are refused (beyond any backlog worth answering)"
    )

    def problem(self, captured_at: datetime, now: datetime) -> str | None:
        """Why `captured_at` cannot be trusted, or None."""
        if captured_at > now + timedelta(seconds=self.max_ahead_s):
            return f"capture time {captured_at.isoformat()} is more than {self.max_ahead_s:.0f} s in the future"
        if captured_at < now - timedelta(hours=self.max_age_h):
            return f"capture time {captured_at.isoformat()} is more than {self.max_age_h:g} h old"
        return None


class EvalSettings(Section):
    """`fallwatch eval`: labelled clips sampled as cameras, replayed through routing policies and the alert rule."""

    clips: Path | None = Field(None, description="folder with clips.csv (file,label,fall_start_s[,room])")
    fps: float = Field(2.0, gt=0, le=30, description="sampling rate, as a camera's (`producers.cameras[].fps`)")
    motion: MotionSettings = Field(MotionSettings(), description="the cameras' motion gate and heartbeat")
    resize: tuple[PositiveInt, PositiveInt] | None = Field(None, description="[width, height] as a camera's")
    jpeg_quality: int = Field(85, ge=10, le=100, description="as a camera's")
    edge_latency_s: float = Field(0.1, ge=0, description="capture → the edge verdict reaches alerting")
    cloud_latency_s: float = Field(1.0, ge=0, description="edge verdict → the cloud verdict reaches alerting")
    cloud_shares: list[float] = Field(
        default_factory=lambda: [0.1, 0.25, 0.5],
        description="cloud shares at which DMD, uncertainty and random deferral are compared",
    )
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples by clip for the confidence intervals")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the confidence intervals")
    seed: int = Field(0, description="bootstrap, random deferral, the edge model's patch order")
    batch_size: int = Field(8, ge=1, description="frames (edge) or clips (cloud) per model forward")
    cache_dir: Path = Field(Path(".cache/eval"), description="model outputs, keyed by clip, sampling and model")
    report_dir: Path = Field(Path("eval-report"), description="report.md, report.json and the PNG curves")

    @field_validator("cloud_shares")
    @classmethod
    def shares_are_shares(cls, shares: list[float]) -> list[float]:
        if any(not 0 <= share <= 1 for share in shares):
            raise ValueError(f"every cloud share must be within [0, 1], got {shares}")
        return sorted(set(shares))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FALLWATCH_", env_nested_delimiter="__", extra="forbid")

    state_dir: Path = Field(Path(".fallwatch"), description="pids, logs and data of the local stack")
    cache_dir: Path = Field(Path(".cache"), description="downloaded Kafka jars")
    log_level: str = "INFO"
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    producers: ProducerSettings = ProducerSettings()
    edge: EdgeSettings = EdgeSettings()
    cloud: CloudSettings = CloudSettings()
    alerting: AlertingSettings = AlertingSettings()
    dmd: DmdSettings = DmdSettings()
    eval: EvalSettings = EvalSettings()
    capture_time: CaptureTimeSettings = CaptureTimeSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [env_settings]
        config = os.environ.get(CONFIG_ENV)
        if config:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config))
        sources.append(LocalStackSource(settings_cls))
        unused = UNUSED_SECTIONS.get()
        if unused:
            sources = [WithoutSections(source, unused) for source in sources]
        return (init_settings, *sources)


# Sections every service reads (capture_time: every consumer); the others only the services that name them.
SHARED_SECTIONS = frozenset({"kafka", "redis", "capture_time"})
SECTIONS = frozenset(name for name, field in Settings.model_fields.items() if isinstance(field.default, BaseModel))
UNUSED_SECTIONS: ContextVar[frozenset[str]] = ContextVar("UNUSED_SECTIONS", default=frozenset())


class WithoutSections(PydanticBaseSettingsSource):
    """A settings source with some sections left out: those keep their defaults and are not validated."""

    def __init__(self, source: PydanticBaseSettingsSource, unused: frozenset[str]) -> None:
        super().__init__(source.settings_cls)
        self.source = source
        self.unused = unused

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {key: value for key, value in self.source().items() if key not in self.unused}


class LocalStackSource(PydanticBaseSettingsSource):
    """Kafka, Redis and MQTT addresses (and credentials) of the stack `fallwatch stack up` started, if it runs."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        state_file = local_stack_state_file()
        if not state_file.is_file():
            return {}
        state = json.loads(state_file.read_text())
        # addresses and, for a locked stack, credentials (written by fallwatch.stack.LocalStack.write_state)
        clients = state.get("clients", {})
        found = {"kafka": clients.get("kafka", {}), "redis": clients.get("redis", {})}
        if clients.get("mqtt"):
            found["alerting"] = {"mqtt": clients["mqtt"]}
        return found


def settings_data(settings: BaseModel) -> dict[str, Any]:
    """The settings as a config file holds them (JSON types), secrets in clear: the file another process
    reads them from must carry the password itself, not pydantic's mask of it."""
    data = settings.model_dump(mode="json")
    reveal_secrets(settings, data)
    return data


def reveal_secrets(model: BaseModel, data: dict[str, Any]) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            data[name] = value.get_secret_value()
        elif isinstance(value, BaseModel):
            reveal_secrets(value, data[name])
        elif isinstance(value, list):
            for item, dumped in zip(value, data[name], strict=True):
                if isinstance(item, BaseModel):
                    reveal_secrets(item, dumped)


def local_stack_state_file() -> Path:
    """Where `fallwatch stack up` keeps the running stack's addresses: `state_dir` of the environment, else
    of the config file (as the stack commands read it), else the default."""
    state_dir = (
        os.environ.get(STATE_DIR_ENV) or config_file_state_dir() or str(Settings.model_fields["state_dir"].default)
    )
    return Path(state_dir) / "stack.json"


def config_file_state_dir() -> str | None:
    config = os.environ.get(CONFIG_ENV)
    if not config:
        return None
    try:
        state_dir = config_file_sections(config).get("state_dir")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError):
        return None  # load_settings says what is wrong with the file
    return str(state_dir) if state_dir else None


def config_file_sections(config: str) -> dict[str, Any]:
    """The config file's top level; a ConfigError where it is not a mapping of sections."""
    top = yaml.safe_load(Path(config).read_text())
    if top is not None and not isinstance(top, dict):
        kind = type(top).__name__
        raise ConfigError(f"config file {config}: its top level must be sections (kafka:, …), not a {kind}")
    return top or {}


def load_settings(sections: Iterable[str] | None = None, **overrides: Any) -> Settings:
    """Settings from all sources; a mistake becomes one ConfigError listing each problem.

    `sections`: the sections the caller uses (besides kafka and redis); the others keep their
    defaults and are not validated. None: every section.
    """
    config = os.environ.get(CONFIG_ENV)
    if config and not Path(config).is_file():
        raise ConfigError(f"config file {config} does not exist")
    unused = frozenset() if sections is None else SECTIONS - SHARED_SECTIONS - set(sections)
    token = UNUSED_SECTIONS.set(unused)
    try:
        if config:
            config_file_sections(config)
        return Settings(**overrides)
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_problem(config or "", exc)) from None
    except SettingsError as exc:  # an environment variable that is not the JSON its section needs
        raise ConfigError(f"invalid settings: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {config} cannot be read: {exc}") from None
    except ValidationError as exc:
        raise settings_problem(exc) from None
    finally:
        UNUSED_SECTIONS.reset(token)


def yaml_problem(path: str, error: yaml.YAMLError) -> str:
    """A YAML syntax error as `config file F line L column C: problem`."""
    mark = getattr(error, "problem_mark", None)
    where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    return f"config file {path}{where}: {problem}" + (f" ({context})" if context else "")


def settings_problem(exc: ValidationError, where: str = "") -> ConfigError:
    """A validation error as the ConfigError a person reads: one line per problem, each naming its setting
    (under `where`, e.g. the command-line option that gave the values)."""
    problems = [
        f"{'.'.join([where, *(str(p) for p in err['loc'])]).strip('.')}: {readable(err)}" for err in exc.errors()
    ]
    if len(problems) == 1:
        return ConfigError(f"invalid settings: {problems[0]}")
    # one line per problem: a camera list with several mistakes reads as a list
    return ConfigError(f"invalid settings ({len(problems)} problems):\n  " + "\n  ".join(problems))


def readable(error: Any) -> str:
    """pydantic's message, in the words a person editing the YAML file expects."""
    if error["type"] == "extra_forbidden":
        return "unknown key"
    return str(error["msg"]).removeprefix("Value error, ")
