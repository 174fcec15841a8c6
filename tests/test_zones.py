"""No-alert zones on the shared bed-falls clips: BlazePose finds the person in or out of the bed, and a
person lying in a camera's `alerts: false` zone opens no alert end to end (producer → edge → cloud →
alerting on the real Kafka and Redis) while the same stream without the zone opens exactly one.

The bed polygons were drawn by hand on one frame of each clip, as an installer draws a zone on the
camera's view: configuration of these rooms, not a value tuned to the clips.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import cv2
import numpy as np

from cloud_workers.loading import load_cloud_model
from cloud_workers.service import CloudWorker
from core.pose import PoseEstimator, inside_any, person_location
from core.settings import CameraSettings
from edge_workers.model import load_edge_model
from edge_workers.service import EdgeWorker
from producers.service import run_producers
from schemas import FallEvent, Verdict
from tests.conftest import (
    SHARED_DATASETS,
    consume_until,
    fall_saying_models,
    read_all,
    running,
    service_process,
    settings_for,
    until_caught_up,
)

CLIPS = SHARED_DATASETS / "bed-falls-t2v"
GET_INTO_BED = CLIPS / "mage_geton_001.mp4"  # walks to the bed, sits, lies down on it
BED_EXIT_FALL = CLIPS / "mage_fall_002.mp4"  # lies on the bed, rolls off, ends on the floor
# the mattress of each room, [x, y] in 0..1 of the 864x496 frame
BEDS = {
    GET_INTO_BED.name: [(0.21, 0.38), (0.43, 0.25), (0.69, 0.56), (0.50, 0.89), (0.25, 0.55)],
    BED_EXIT_FALL.name: [(0.197, 0.282), (0.399, 0.192), (0.642, 0.333), (0.642, 0.403), (0.48, 0.605), (0.22, 0.423)],
}
ON_THE_BED_FROM_S = 1.0  # GET_INTO_BED from here on: sitting, then lying, on the bed


def video_frames(path: Path) -> tuple[list[np.ndarray], float]:
    """Every frame of the video (BGR) and its frame rate."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while (read := capture.read())[0]:
        frames.append(read[1])
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


def test_the_locator_puts_the_person_in_the_bed_or_on_the_floor() -> None:
    estimator = PoseEstimator()
    try:

        def where(path: Path, index: int) -> tuple[float, float]:
            frame = video_frames(path)[0][index]
            pose = estimator(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            assert pose is not None, f"nobody found in frame {index} of {path.name}"
            return person_location(pose)

        lying_in_bed = where(GET_INTO_BED, -1)
        before_the_roll, on_the_floor = where(BED_EXIT_FALL, 0), where(BED_EXIT_FALL, -1)
    finally:
        estimator.close()
    assert inside_any(lying_in_bed, [BEDS[GET_INTO_BED.name]]), lying_in_bed
    assert inside_any(before_the_roll, [BEDS[BED_EXIT_FALL.name]]), before_the_roll
    assert not inside_any(on_the_floor, [BEDS[BED_EXIT_FALL.name]]), on_the_floor


def on_the_bed(path: Path) -> Path:
    """GET_INTO_BED from ON_THE_BED_FROM_S on: a person lying confined to the bed."""
    frames, fps = video_frames(GET_INTO_BED)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
    for frame in frames[round(ON_THE_BED_FROM_S * fps) :]:
        writer.write(frame)
    writer.release()
    return path


def test_a_person_lying_in_a_no_alert_zone_opens_no_alert(stack_state, tmp_path: Path, tiny_models) -> None:
    """Two cameras on the same stream, edge and cloud models that call every frame a fall; one camera
    has the bed as a no-alert zone. Only the other opens an alert."""
    clip = on_the_bed(tmp_path / "on-the-bed.mp4")
    fall = fall_saying_models(tiny_models, tmp_path / "fall-models")
    sections = fall.settings_sections()
    sections["edge"].update(switcher_registry=str(fall.switcher_registry), batch_size=4)
    sections["cloud"].update(batch_size=4, num_frames=4)
    common = {"url": str(clip), "fps": 4.0, "realtime": False, "motion": {"enabled": False}}
    bed = {"name": "bed", "polygon": BEDS[GET_INTO_BED.name]}
    zoned = CameraSettings(id="cam-bed", room="201", zones=[bed], **common)
    plain = CameraSettings(id="cam-plain", room="202", **common)
    alerting = {"k": 3, "n": 5, "down_for_s": 0.0, "up_after_s": 0.0, "confirm_within_s": 2.0, "tick_s": 0.2}
    settings = settings_for(
        stack_state,
        tmp_path,
        producers={"cameras": [zoned.model_dump(), plain.model_dump()]},
        alerting={**alerting, "app_id": f"zones-{tmp_path.name[-8:]}"},
        **sections,
    )
    topics = settings.kafka.topics

    async def scenario() -> tuple[dict[str, int], list[Verdict], list[FallEvent]]:
        published = await run_producers(settings, asyncio.Event())
        async with (
            running(EdgeWorker(settings, load_edge_model(settings))) as edge,
            running(CloudWorker(settings, load_cloud_model(settings))),
        ):
            frames = sum(published.values())
            verdicts = await consume_until(
                settings, topics.verdicts, Verdict, lambda m: len({v.frame_id for v in m if v.final}) >= frames
            )
            assert isinstance(edge.pose, PoseEstimator), "BlazePose located the zoned camera's person"
        assert edge.pose is None, "BlazePose closed with the worker"
        await until_caught_up(settings, settings.alerting.app_id, topics.verdicts)
        return published, verdicts, await read_all(settings, topics.fall_events, FallEvent)

    with service_process("alerting", settings, tmp_path):
        published, verdicts, events = asyncio.run(scenario())

    assert published["cam-bed"] == published["cam-plain"] >= 8
    finals = [v for v in verdicts if v.final]
    assert all(v.decision for v in finals), "the fall-saying models call every frame a fall"
    edge_verdicts = {v.frame_id: v for v in verdicts if v.source == "edge"}
    in_bed = [edge_verdicts[v.frame_id] for v in finals if v.camera_id == "cam-bed"]
    assert all(v.in_no_alert_zone and v.person_at is not None for v in in_bed), [v.person_at for v in in_bed]
    assert all(v.person_at is None for v in verdicts if v.camera_id == "cam-plain"), "only zoned cameras locate"
    opened = [e for e in events if e.state == "open"]
    assert [e.camera_id for e in opened] == ["cam-plain"], events
