"""Contracts between fallwatch services: topic value models and their codec."""

from schemas.codec import SchemaError, decode, encode
from schemas.messages import (
    SCHEMA_VERSION,
    AlertState,
    CloudRequest,
    DeadLetter,
    EdgeOutput,
    FallEvent,
    Frame,
    KafkaPosition,
    Label,
    LabelVerdict,
    Message,
    OffloadReason,
    PersonDown,
    Routing,
    Verdict,
    VerdictSource,
    utc_now,
)
from schemas.topics import Topics

__all__ = [
    "SCHEMA_VERSION",
    "AlertState",
    "CloudRequest",
    "DeadLetter",
    "EdgeOutput",
    "FallEvent",
    "Frame",
    "KafkaPosition",
    "Label",
    "LabelVerdict",
    "Message",
    "OffloadReason",
    "PersonDown",
    "Routing",
    "SchemaError",
    "Topics",
    "Verdict",
    "VerdictSource",
    "decode",
    "encode",
    "utc_now",
]
