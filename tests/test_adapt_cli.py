"""`fallwatch dmd adapt` and `dmd rollback` on logged traffic in the real Kafka, announced through Redis.

The traffic is test_adaptation's biased case as a facility logs it: frames on `frames`, the cloud's
answers on `verdicts`, a caregiver's "false alarm" on `labels`. A second window, where the cloud
changed its answers after the learning part, gives a candidate that the gate refuses.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from redis import Redis

from core.images import encode_jpeg_rgb
from core.settings import Settings
from dmd_offline.adapt import predict
from edge_workers.model import ViltEdgeModel
from edge_workers.registry import PAIR_EDGE_DIR, read_active, read_pair_version
from fallwatch.devkit.models import ModelPaths
from schemas import Frame, Label, OperatorEvent
from tests.conftest import consume_until, settings_for, write_config
from tests.test_adaptation import FRAMES_PER_CAMERA, biased_frames, camera_frames, fall_leaning_copy
from tests.test_dmd_pipeline import logged_cloud_verdict, publish_traffic, run_cli

FRAMES = FRAMES_PER_CAMERA
HELD = 12  # each camera's latest 30 % of frames: the gate's held-out slice
START = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)


def as_logged(adapt_frames, start: datetime) -> tuple[list[Frame], list]:
    frames, verdicts = [], []
    for seq, adapt_frame in enumerate(adapt_frames):
        captured_at = start + timedelta(seconds=0.5 * int(adapt_frame.order_key))
        camera = adapt_frame.group
        frame = Frame(
            frame_id=Frame.make_id(camera, captured_at, seq),
            camera_id=camera,
            room=camera,
            seq=seq,
            captured_at=captured_at,
            width=128,
            height=96,
            jpeg=encode_jpeg_rgb(adapt_frame.image_rgb),
        )
        frames.append(frame)
        verdicts.append(logged_cloud_verdict(frame, adapt_frame.cloud_probability, "exploration"))
    return frames, verdicts


def adapt_run(stack_state, tiny_models: ModelPaths, tmp_path: Path) -> tuple[Settings, Path]:
    """A run whose edge model leans to "fall", with a pair registry, and its config file for the CLI."""
    edge = fall_leaning_copy(tiny_models.edge, tmp_path / "edge-vilt")
    settings = settings_for(
        stack_state,
        tmp_path,
        edge={
            "model": str(edge),
            "switcher_registry": str(tmp_path / "no-switchers"),
            "model_registry": str(tmp_path / "registry"),
            "registry_announce_key": f"test:{uuid.uuid4().hex}:announced",
        },
        cloud={"model": str(tiny_models.cloud)},
        dmd={
            "learning_rate": 3e-3,
            "max_epochs": 40,
            "run_cloud_model": False,
            # the learned switcher is served wherever it loses by no more than the tolerance: these tests are
            # about the command's steps, and the evidence it must show otherwise is test_adaptation's
            "adapt": {"learning_rate": 5e-3, "epochs": 8, "batch_size": 8, "gate_tolerance": 0.2,
                      "switcher_evidence": 1.0},
        },
    )  # fmt: skip
    config = tmp_path / "fallwatch.yaml"
    write_config(settings, config)
    return settings, config


def test_adapt_publishes_from_logged_traffic_refuses_a_worse_window_and_rolls_back(
    stack_state, tiny_models: ModelPaths, tmp_path: Path
) -> None:
    settings, config = adapt_run(stack_state, tiny_models, tmp_path)
    frames, verdicts = as_logged(biased_frames(), START)
    # the caregiver answered an alert on cam-b: its evidence frames are no fall, whatever the cloud said
    evidence = [frame.frame_id for frame in frames if frame.camera_id == "cam-b"][:5]
    label = Label(label_id="l1", alert_id="a1", camera_id="cam-b", room="cam-b", frame_ids=evidence,
                  verdict="false_alarm", labelled_by="caregiver")  # fmt: skip
    asyncio.run(publish_traffic(settings, frames, verdicts, [label]))
    between = datetime.now(UTC)

    result = run_cli("dmd", "adapt", "--until", between.isoformat(), config=config)
    assert result.returncode == 0, result.stderr[-3000:]
    registry = tmp_path / "registry"
    active = read_active(registry)
    assert active is not None and f"published version {active.version}" in result.stdout
    assert "adapted on 56 frames" in result.stdout
    assert re.search(r"held out 24: cloud agreement \d+\.\d% vs \d+\.\d%, cloud falls F1 ", result.stdout)
    version = read_pair_version(registry, active.version)
    assert version.gate["gate_cloud_agreement_candidate"] >= 0.7 > version.gate["gate_cloud_agreement_running"]
    with Redis.from_url(stack_state.redis_url) as redis:
        assert redis.get(settings.edge.registry_announce_key) == active.version.encode()

    rollback = run_cli("dmd", "rollback", config=config)
    assert rollback.returncode == 2 and rollback.stderr.strip().splitlines() == [
        f"error: nothing to roll back to: {active.version} is the first version in {registry}"
    ]

    # a later window where the cloud swapped its answers for the two rooms after the learning part
    # (a cloud model update, say): the candidate learns the old answers and disagrees afterwards
    rng = np.random.default_rng(1)
    cam_a, cam_b = camera_frames("cam-a", 0, False, rng), camera_frames("cam-b", 2, True, rng)
    for camera, now_says in ((cam_a, 0.9), (cam_b, 0.1)):
        for adapt_frame in camera[-12:]:
            adapt_frame.cloud_probability = now_says
    later = cam_a + cam_b
    frames, verdicts = as_logged(later, START + timedelta(minutes=30))
    asyncio.run(publish_traffic(settings, frames, verdicts, []))
    refused = run_cli("dmd", "adapt", "--since", between.isoformat(), config=config)
    assert refused.returncode == 1, refused.stderr[-3000:]
    lines = [line for line in refused.stdout.splitlines() if line.startswith("not published")]
    assert len(lines) == 1 and "Traceback" not in refused.stderr
    assert lines[0].startswith("not published: the candidate agrees with the cloud on") and "running pair" in lines[0]
    assert read_active(registry) == active, "the refused candidate changed nothing"


def alerts_answered(frames: list[Frame], indices: range, verdict: str, name: str) -> list[Label]:
    """The caregiver's answers on alerts of five evidence frames each, covering `indices` of one camera."""
    camera = frames[0].camera_id
    return [
        Label(
            label_id=f"{name}-{start}",
            alert_id=f"{name}-{start}",
            camera_id=camera,
            room=camera,
            frame_ids=[frames[i].frame_id for i in range(start, min(start + 5, indices.stop))],
            verdict=verdict,
            labelled_by="caregiver",
        )
        for start in indices[::5]
    ]


def test_adapt_follows_caregivers_over_a_wrong_cloud_and_refuses_a_candidate_losing_their_falls(
    stack_state, tiny_models: ModelPaths, tmp_path: Path
) -> None:
    settings, config = adapt_run(stack_state, tiny_models, tmp_path)
    # cam-b is a bed room: the cloud says "fall" on a person lying in bed, and every alert there was a
    # false alarm; on cam-a the cloud is right, and two of its alerts were acknowledged falls
    rng = np.random.default_rng(4)
    cam_a, cam_b = camera_frames("cam-a", 0, True, rng), camera_frames("cam-b", 2, True, rng)
    frames, verdicts = as_logged(cam_a + cam_b, START)
    a_frames, b_frames = frames[:FRAMES], frames[FRAMES:]
    labels = alerts_answered(a_frames, range(10, 15), "true_fall", "a") + alerts_answered(
        a_frames, range(30, 35), "true_fall", "a"
    )
    labels += alerts_answered(b_frames, range(FRAMES), "false_alarm", "b")
    asyncio.run(publish_traffic(settings, frames, verdicts, labels))
    between = datetime.now(UTC)

    result = run_cli("dmd", "adapt", "--until", between.isoformat(), config=config)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    registry = tmp_path / "registry"
    active = read_active(registry)
    assert active is not None and f"published version {active.version}" in result.stdout
    gate = read_pair_version(registry, active.version).gate
    assert gate["gate_labelled_frames"] == 12 + 5  # cam-b's held-out frames and one cam-a alert's
    # judged on what each pair serves: the candidate's edge follows the caregivers, and its router sends
    # its share of the held-out frames (30 %) to the cloud, wrong wherever it says "fall" in the bed room
    assert gate["gate_caregiver_labels_candidate"] >= gate["gate_caregiver_labels_running"] + 0.25
    assert gate["gate_cloud_share"] == pytest.approx(0.3, abs=0.05)
    assert gate["gate_caregiver_falls_candidate"] >= 0.8 and "gate_cloud_agreement_candidate" not in gate
    # the published edge disagrees with the cloud on the held-out slice more than the running edge: the
    # cloud-agreement check alone would have refused it
    held = cam_a[-HELD:] + cam_b[-HELD:]
    cloud = np.array([f.cloud_probability >= 0.5 for f in held])
    published = predict_held(registry / active.version / PAIR_EDGE_DIR, held)
    running = predict_held(Path(settings.edge.model), held)
    assert np.mean(published == cloud) + 0.2 < np.mean(running == cloud), (published, running, cloud)
    assert not published[HELD:].any() and published[:HELD].mean() >= 0.8

    # a later window where the cloud says "no fall" on cam-a all along, and the caregivers acknowledged
    # falls there at its end: the candidate learns the cloud's "no fall" and loses them
    rng = np.random.default_rng(5)
    later = camera_frames("cam-a", 0, False, rng)
    frames, verdicts = as_logged(later, START + timedelta(minutes=30))
    labels = alerts_answered(frames, range(FRAMES - 10, FRAMES), "true_fall", "later")
    asyncio.run(publish_traffic(settings, frames, verdicts, labels))
    refused = run_cli("dmd", "adapt", "--since", between.isoformat(), config=config)
    assert refused.returncode == 1, refused.stdout[-2000:] + refused.stderr[-3000:]
    lines = [line for line in refused.stdout.splitlines() if line.startswith("not published")]
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stdout
    assert "of the 10 caregiver-acknowledged fall frames, the running pair on 100.0%" in lines[0], lines[0]
    assert "agrees with the cloud" not in lines[0] and "(held-out slice of 12 frames)" in lines[0]
    assert read_active(registry) == active, "the refused candidate changed nothing"

    events = asyncio.run(consume_until(settings, settings.kafka.topics.operator_events, OperatorEvent,
                                       lambda m: len(m) >= 2))  # fmt: skip
    assert [(e.kind, e.service, e.version) for e in events] == [
        ("version_published", "dmd_offline", active.version),
        ("candidate_refused", "dmd_offline", active.version),  # the running version it did not replace
    ]
    assert events[0].message.startswith(f"published version {active.version}") and events[1].message == lines[0]


def predict_held(edge_dir: Path, held) -> np.ndarray:
    model = ViltEdgeModel.from_pretrained(str(edge_dir), Settings().edge.question)
    return predict(model, [f.image_rgb for f in held]).fall_probability >= 0.5
