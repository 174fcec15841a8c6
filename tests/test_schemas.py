"""Round trips and rejections of every topic's message model."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from schemas import (
    CloudRequest,
    DeadLetter,
    EdgeOutput,
    FallEvent,
    Frame,
    KafkaPosition,
    Message,
    SchemaError,
    Verdict,
    decode,
    encode,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def sample_messages() -> list[Message]:
    frame = Frame(
        frame_id=Frame.make_id("cam-1", NOW, 7),
        camera_id="cam-1",
        room="101",
        seq=7,
        captured_at=NOW,
        width=640,
        height=480,
        jpeg=b"\xff\xd8\xff\xe0 not really a jpeg \x00\x01",
    )
    request = CloudRequest(
        frame_id=frame.frame_id,
        camera_id="cam-1",
        room="101",
        captured_at=NOW,
        frame_position=KafkaPosition(topic="frames", partition=2, offset=41),
        clip_keys=["fallwatch:frame:a", "fallwatch:frame:b"],
        clip_frame_ids=["a", "b"],
        edge=EdgeOutput(fall_probability=0.4, decision=False, model="vilt"),
        switcher_score=0.2,
        switcher_version="v1",
        reason="switcher",
        deadline=NOW + timedelta(seconds=10),
    )
    verdict = Verdict(
        frame_id=frame.frame_id,
        camera_id="cam-1",
        room="101",
        captured_at=NOW,
        source="cloud",
        final=True,
        fall_probability=0.9,
        decision=True,
        switcher_score=0.2,
        edge_model="vilt",
        cloud_model="llava",
        timings_ms={"cloud_model": 812.5},
    )
    event = FallEvent(
        alert_id="a1",
        camera_id="cam-1",
        room="101",
        state="open",
        opened_at=NOW,
        first_fall_at=NOW,
        confidence=0.8,
        evidence_frame_ids=[frame.frame_id],
        rule="3 of 5",
    )
    dead = DeadLetter(service="edge_workers", reason="bad", source_topic="frames", size=8)
    return [frame, request, verdict, event, dead]


@pytest.mark.parametrize("message", sample_messages(), ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    raw = encode(message)
    assert decode(type(message), raw) == message
    assert json.loads(raw)["schema_version"] == 1


def test_bytes_travel_as_base64_json() -> None:
    frame = sample_messages()[0]
    assert isinstance(frame, Frame)
    payload = json.loads(encode(frame))
    assert isinstance(payload["jpeg"], str)
    assert decode(Frame, encode(frame)).jpeg == frame.jpeg


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (lambda d: d.update(schema_version=2), "schema_version"),
        (lambda d: d.pop("camera_id"), "camera_id"),
        (lambda d: d.update(surprise=1), "surprise"),
        (lambda d: d.update(fall_probability=1.5), "fall_probability"),
        (lambda d: d.update(source="satellite"), "source"),
    ],
)
def test_rejections_name_the_problem(mutation, expected: str) -> None:
    verdict = sample_messages()[2]
    data = json.loads(encode(verdict))
    mutation(data)
    with pytest.raises(SchemaError, match=expected):
        decode(Verdict, json.dumps(data).encode())


@pytest.mark.parametrize("raw", [b"", None, b"not json", b"[1, 2]", b'{"schema_version": 1}'])
def test_garbage_raises_the_one_typed_error(raw: bytes | None) -> None:
    with pytest.raises(SchemaError):
        decode(Frame, raw)


def test_a_verdict_is_not_a_frame() -> None:
    with pytest.raises(SchemaError):
        decode(Frame, encode(sample_messages()[2]))


def test_a_verdict_on_an_offloaded_frame_carries_the_edge_record_of_its_request() -> None:
    frame, request = sample_messages()[:2]
    assert isinstance(frame, Frame) and isinstance(request, CloudRequest)
    verdict = Verdict.for_request(request, "cloud", 0.9, True, cloud_model="llava", batch_size=4)
    identity = ("frame_id", "camera_id", "room", "captured_at")
    assert [getattr(verdict, name) for name in identity] == [getattr(request, name) for name in identity]
    assert (verdict.source, verdict.final, verdict.fall_probability, verdict.decision) == ("cloud", True, 0.9, True)
    assert (verdict.switcher_score, verdict.offload_reason, verdict.edge_model, verdict.switcher_version) == (
        0.2,
        "switcher",
        "vilt",
        "v1",
    )
    assert (verdict.cloud_model, verdict.batch_size) == ("llava", 4)
    edge = Verdict.for_frame(frame, source="edge", final=False, fall_probability=0.4, decision=False, edge_model="v")
    assert [getattr(edge, name) for name in identity] == [getattr(frame, name) for name in identity]


def test_frames_and_verdicts_written_before_the_no_alert_zones_still_decode() -> None:
    frame, verdict = (m for m in sample_messages() if isinstance(m, Frame | Verdict))
    for message, new_fields in ((frame, ("no_alert_zones",)), (verdict, ("person_at", "in_no_alert_zone"))):
        old = json.loads(encode(message))
        for name in new_fields:
            del old[name]
        assert decode(type(message), json.dumps(old).encode()) == message
