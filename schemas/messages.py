"""Message models for every topic in DESIGN.md (pydantic v2).

Every message carries `schema_version`; a consumer that meets another version
rejects the record (it goes to `dead-letters`) instead of guessing.
Bytes fields (JPEGs, raw records) travel as base64 inside JSON so every topic
stays readable with ordinary Kafka tools.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

SCHEMA_VERSION: Literal[1] = 1


def utc_now() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    """Base of every topic value: strict about unknown fields and the version."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    schema_version: Literal[1] = SCHEMA_VERSION


class Frame(Message):
    """One sampled camera frame (topic `frames`); the source of truth for replays."""

    frame_id: str = Field(description="unique id: camera id, capture time in ms and sequence number")
    camera_id: str
    room: str
    seq: int = Field(ge=0, description="per-camera sequence number, increasing")
    captured_at: AwareDatetime
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    jpeg: bytes = Field(repr=False)
    no_alert_zones: list[list[tuple[float, float]]] = Field(
        default_factory=list, description="the camera's `alerts: false` zones (normalised polygons), for the edge"
    )

    @staticmethod
    def make_id(camera_id: str, captured_at: datetime, seq: int) -> str:
        return f"{camera_id}-{int(captured_at.timestamp() * 1000)}-{seq}"


# Kafka offsets are signed 64-bit; a position outside what a consumer can seek to is refused on decoding
MAX_KAFKA_OFFSET = 2**63 - 1


class KafkaPosition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str = Field(min_length=1)
    partition: int = Field(ge=0)
    offset: int = Field(ge=0, le=MAX_KAFKA_OFFSET)


class EdgeOutput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fall_probability: float = Field(ge=0.0, le=1.0)
    decision: bool
    model: str


OffloadReason = Literal["switcher", "exploration"]


class CloudRequest(Message):
    """A frame the edge offloads (topic `cloud-requests`); the clip goes by claim check."""

    frame_id: str
    camera_id: str
    room: str
    captured_at: AwareDatetime
    frame_position: KafkaPosition = Field(description="where the frame itself sits in `frames` (fallback)")
    clip_keys: list[str] = Field(description="Redis keys of the clip's JPEGs, oldest first, ending with this frame")
    clip_frame_ids: list[str]
    edge: EdgeOutput
    switcher_score: float = Field(ge=0.0, le=1.0, description="predicted probability that the models agree")
    switcher_version: str
    reason: OffloadReason
    deadline: AwareDatetime
    requested_at: AwareDatetime = Field(default_factory=utc_now)


class Routing(BaseModel):
    """The edge's routing policy in force for a frame, and whether the budget refused its offload."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(ge=0.0, le=1.0, description="agreement probability below which a frame asks for the cloud")
    max_offload_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    max_offload_fps: float | None = Field(default=None, ge=0.0)
    window_s: float = Field(gt=0.0, description="sliding window of the offload budget")
    exploration_rate: float = Field(ge=0.0, le=1.0)
    over_budget: bool = Field(default=False, description="the switcher asked for the cloud; the budget said no")


VerdictSource = Literal["edge", "cloud", "edge-fallback"]


class Verdict(Message):
    """The answer for one frame (topic `verdicts`).

    `final=False` marks the edge's provisional answer for an offloaded frame; the
    cloud's (or the alerting fallback's) answer for the same `frame_id` is final.
    """

    frame_id: str
    camera_id: str
    room: str
    captured_at: AwareDatetime
    source: VerdictSource
    final: bool
    fall_probability: float = Field(ge=0.0, le=1.0)
    decision: bool
    switcher_score: float | None = Field(default=None, ge=0.0, le=1.0)
    offload_reason: OffloadReason | None = None
    edge_model: str
    cloud_model: str | None = None
    switcher_version: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    energy_j: float | None = Field(default=None, description="this frame's share of its batch's measured energy")
    batch_size: int | None = Field(default=None, ge=1, description="frames answered by the same model forward")
    gpu_memory_mb: float | None = Field(default=None, ge=0.0, description="peak GPU memory of that forward")
    routing: Routing | None = Field(default=None, description="the edge's routing policy (edge verdicts)")
    person_at: tuple[float, float] | None = Field(
        default=None, description="normalised hip centre of the person, located on a zoned camera's fall frames"
    )
    in_no_alert_zone: bool = Field(default=False, description="the person lies inside an `alerts: false` zone")
    produced_at: AwareDatetime = Field(default_factory=utc_now)

    @classmethod
    def for_frame(cls, frame: Frame | CloudRequest, **answer: Any) -> Verdict:
        """The verdict on `frame` (a frame, or the request that offloaded it): its identity, and `answer`."""
        return cls(
            frame_id=frame.frame_id, camera_id=frame.camera_id, room=frame.room, captured_at=frame.captured_at, **answer
        )

    @classmethod
    def for_request(
        cls, request: CloudRequest, source: VerdictSource, fall_probability: float, decision: bool, **answer: Any
    ) -> Verdict:
        """The final verdict on an offloaded frame, carrying what the edge recorded about it."""
        return cls.for_frame(
            request,
            source=source,
            final=True,
            fall_probability=fall_probability,
            decision=decision,
            switcher_score=request.switcher_score,
            offload_reason=request.reason,
            edge_model=request.edge.model,
            switcher_version=request.switcher_version,
            **answer,
        )


AlertState = Literal["open", "acknowledged", "resolved", "false_alarm"]


class FallEvent(Message):
    """An alert and each change of its state (topic `fall-events`)."""

    alert_id: str
    camera_id: str
    room: str
    state: AlertState
    opened_at: AwareDatetime
    updated_at: AwareDatetime = Field(default_factory=utc_now)
    first_fall_at: AwareDatetime = Field(description="capture time of the first fall frame that led to the alert")
    confidence: float = Field(ge=0.0, le=1.0)
    evidence_frame_ids: list[str]
    rule: str = Field(description="which confirmation rule fired, e.g. '3 of 5'")
    drill: bool = Field(False, description="a fire drill (`fallwatch alerts test`): delivered, never a label")
    answered_by: str | None = Field(None, description="who acknowledged, resolved or dismissed it, and where")


class PersonDown(Message):
    """A camera's person-down state changed (topic `person-down`, keyed by camera id, compacted).

    The newest record of a camera is its state, so a channel (an MQTT binary sensor per room, a
    dashboard badge) forwards `down` as it comes and a late subscriber reads the current state.
    """

    camera_id: str
    room: str
    down: bool
    since: AwareDatetime = Field(
        description="down: capture time of the first fall verdict of the episode; up: when the person was seen up"
    )
    changed_at: AwareDatetime = Field(description="capture time of the verdict that changed the state")
    episode_id: str = Field(description="the down episode; an alert it opens has this id")
    rule: str = Field(description="which confirmation made the person count as down")
    confidence: float = Field(ge=0.0, le=1.0, description="mean P(fall) of the verdicts that made the person down")
    evidence_frame_ids: list[str]
    updated_at: AwareDatetime = Field(default_factory=utc_now, description="wall clock of the change")


LabelVerdict = Literal["true_fall", "false_alarm"]


class Label(Message):
    """A caregiver's answer on an alert (topic `labels`): ground truth for the frames that confirmed it.

    `label_id` is deterministic (alert id and verdict), so a repeated click or a
    redelivery is the same label; consumers dedupe by it.
    """

    label_id: str
    alert_id: str
    camera_id: str
    room: str
    frame_ids: list[str] = Field(min_length=1, description="the frames the label applies to (the alert's evidence)")
    verdict: LabelVerdict
    labelled_by: str = Field(min_length=1, description="who answered (caregiver or dashboard user)")
    labelled_at: AwareDatetime = Field(default_factory=utc_now)


OperatorEventKind = Literal[
    "drift_flagged",  # a camera is off its version's calibration
    "drift_cleared",
    "learning_started",  # a camera's exploration is raised (new, or flagged)
    "learning_ended",
    "version_published",  # `dmd adapt` made a version ACTIVE
    "candidate_refused",  # `dmd adapt`'s gate refused its candidate
    "version_rolled_back",
    "version_refused",  # an edge worker's hot-reload check refused the ACTIVE version
]


class OperatorEvent(Message):
    """What an operator should know about the models (topic `operator-events`), beside its log line."""

    kind: OperatorEventKind
    service: str = Field(min_length=1, description="who saw it: edge_workers, dmd_offline")
    message: str = Field(min_length=1, description="the log line, one line")
    camera_id: str | None = None
    version: str | None = Field(None, description="the model version it concerns")
    at: AwareDatetime = Field(default_factory=utc_now)


class DeadLetter(Message):
    """A record a service could not process (topic `dead-letters`), by reference: never its bytes.

    The record itself stays at its position (topic, partition, offset) for that topic's retention;
    a copy here would keep residents' images for the dead letters' retention instead, and could
    itself exceed the size limit that made the record a dead letter.
    """

    service: str
    reason: str
    source_topic: str
    source_partition: int | None = None
    source_offset: int | None = None
    key: bytes | None = Field(None, description="the record's key (a camera id), when short")
    size: int = Field(ge=0, description="bytes of the record's value")
    failed_at: AwareDatetime = Field(default_factory=utc_now)
