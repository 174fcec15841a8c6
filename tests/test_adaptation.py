"""Facility adaptation with tiny models: a biased camera learnt, the gate, one version, rollback.

The edge model is the tiny ViLT leaning to "fall" (its "yes" answer raised) on every frame. Two cameras log cloud
answers: on cam-a the cloud mostly says "fall" too, on cam-b (the biased camera: a room the edge
model reads wrong) mostly "no fall". A fifth of the cloud's answers are flipped at random, as a
cloud model is sometimes wrong, so the switcher's out-of-fold rows hold disagreements.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ViltForQuestionAnswering

from core.settings import ConfigError, Settings
from dmd_offline.adapt import Adaptation, AdaptFrame, GateRefused, gate, held_out_slice, publish_candidate
from edge_workers.model import EdgeBatch, ViltEdgeModel
from edge_workers.registry import (
    PAIR_EDGE_DIR,
    PairRegistry,
    read_active,
    read_pair_version,
    rollback,
)
from fallwatch.devkit.models import ModelPaths

FRAMES_PER_CAMERA = 40
FLIPPED = 0.2


def camera_frames(camera: str, colour: int, cloud_says_fall: bool, rng: np.random.Generator) -> list[AdaptFrame]:
    """Noise frames tinted by one channel (what tells the rooms apart) with the cloud's logged answers."""
    frames = []
    for index in range(FRAMES_PER_CAMERA):
        image = rng.integers(0, 32, size=(96, 128, 3), dtype=np.uint8)
        image[..., colour] += 150
        fall = cloud_says_fall != (rng.random() < FLIPPED)
        frames.append(AdaptFrame(f"{camera}#{index}", camera, float(index), image, 0.9 if fall else 0.1, None))
    return frames


def biased_frames(seed: int = 0) -> list[AdaptFrame]:
    rng = np.random.default_rng(seed)
    return camera_frames("cam-a", 0, True, rng) + camera_frames("cam-b", 2, False, rng)


FALL_LEAN = 3.0  # logits: P(fall) ≈ 0.95 on these frames, while the weights below stay random and learn


def fall_leaning_copy(source: Path, edge: Path) -> Path:
    shutil.copytree(source, edge)
    model = ViltForQuestionAnswering.from_pretrained(edge)
    with torch.no_grad():
        model.classifier[-1].bias[model.config.label2id["yes"]] += FALL_LEAN
    model.save_pretrained(edge)
    return edge


@pytest.fixture
def fall_edge(tiny_models: ModelPaths, tmp_path: Path) -> Path:
    return fall_leaning_copy(tiny_models.edge, tmp_path / "edge-vilt")


def adapt_settings(edge: Path, tmp_path: Path, **adapt: object) -> Settings:
    return Settings(
        edge={"model": str(edge), "switcher_registry": str(tmp_path / "none"), "model_registry": str(tmp_path / "reg")},
        dmd={
            "learning_rate": 3e-3,
            "max_epochs": 40,
            "patience": 5,
            "switcher_inputs": "hidden+confidence",
            "adapt": {"learning_rate": 5e-3, "epochs": 8, "batch_size": 8, **adapt},
        },
    )


def agreement(check_name: str, candidate) -> tuple[float, float]:
    check = next(check for check in candidate.gate.checks if check.name == check_name)
    return check.candidate, check.running


def test_adaptation_fixes_the_biased_camera_on_held_out_frames_and_publishes_one_version(
    fall_edge: Path, tmp_path: Path
) -> None:
    # the cloud's random flips are noise that no switcher predicts: this test is about the edge model
    settings = adapt_settings(fall_edge, tmp_path, gate_tolerance=0.2)
    frames = biased_frames()
    candidate = Adaptation(settings, None, "synthetic").run(frames)

    held = [frame for frame, out in zip(frames, held_out_slice(frames, 0.3), strict=True) if out]
    assert {frame.group for frame in held} == {"cam-a", "cam-b"} and len(held) == 24  # the latest of each camera
    ours, theirs = agreement("cloud agreement", candidate)
    assert theirs == pytest.approx(np.mean([frame.cloud_probability > 0.5 for frame in held]))  # says fall always
    assert ours >= 0.7 > theirs + 0.15, (ours, theirs)
    cam_b = np.array([frame.group == "cam-b" for frame in held])
    assert candidate.calibration.fall_rate < 0.75  # no longer "fall" everywhere
    assert len(candidate.rows.rows) == candidate.adaptation_frames == 2 * FRAMES_PER_CAMERA - 24
    assert candidate.gate.passed, candidate.gate.refusal()
    assert cam_b.sum() == 12

    version = publish_candidate(settings, candidate, "synthetic window")
    registry = tmp_path / "reg"
    assert read_active(registry).version == version
    loaded = PairRegistry(registry, lambda d: ViltEdgeModel.from_pretrained(str(d), "is someone lying on the floor"),
                          3600, None).load_active()  # fmt: skip
    assert loaded.model.name == f"{version}/{PAIR_EDGE_DIR}" == loaded.switcher.metadata.edge_model
    assert loaded.switcher.metadata.inputs == "hidden+confidence"
    recorded = read_pair_version(registry, version)
    assert recorded.calibration == candidate.calibration and recorded.parent is None
    assert loaded.switcher.metadata.edge_model_revision == recorded.edge_sha256


def test_gate_refuses_a_worse_candidate_and_says_why(fall_edge: Path, tmp_path: Path) -> None:
    # the cloud said "no fall" for the whole learning window and "fall" afterwards (an outage of its
    # own, say): the candidate learns "no fall" and disagrees on the held-out slice, the running pair agrees
    rng = np.random.default_rng(1)
    frames = camera_frames("cam-a", 0, False, rng)
    for frame in frames[-12:]:
        frame.cloud_probability = 0.9
    settings = adapt_settings(fall_edge, tmp_path)
    candidate = Adaptation(settings, None, "synthetic").run(frames)
    assert not candidate.gate.passed
    refusal = candidate.gate.refusal()
    assert "\n" not in refusal and refusal.startswith("not published: the candidate agrees with the cloud on")
    assert "the running pair on 100.0%" in refusal and "(held-out slice of 12 frames)" in refusal
    with pytest.raises(GateRefused, match="not published"):
        publish_candidate(settings, candidate, "synthetic window")
    assert not (tmp_path / "reg").exists()
    with pytest.raises(ConfigError, match="no version is active"):
        rollback(tmp_path / "reg")


def test_rollback_returns_to_the_previous_version_and_stops_at_the_first(fall_edge: Path, tmp_path: Path) -> None:
    settings = adapt_settings(fall_edge, tmp_path, gate_tolerance=1.0, epochs=1)
    candidate = Adaptation(settings, None, "synthetic").run(biased_frames(2))
    first = publish_candidate(settings, candidate, "window 1")
    second = publish_candidate(settings, Adaptation(settings, None, "synthetic").run(biased_frames(3)), "window 2")
    registry = tmp_path / "reg"
    assert read_pair_version(registry, second).parent == first  # made from the running version
    assert read_active(registry).version == second
    assert rollback(registry) == (second, first)
    assert read_active(registry).version == first
    with pytest.raises(ConfigError, match=f"nothing to roll back to: {first} is the first version"):
        rollback(registry)


def test_gate_on_caregiver_labels_checks_the_acknowledged_falls_on_their_own() -> None:
    # held out: 8 false alarms and 2 acknowledged falls, and 10 frames nobody answered; the cloud says
    # "fall" on all 20. The candidate is right on 8 of the 10 labelled frames (the running pair on 2)
    # and disagrees with the cloud everywhere, but it misses both falls the caregivers acknowledged
    labels = [0] * 8 + [1] * 2 + [None] * 10
    frames = [AdaptFrame(f"f{i}", "cam-a", float(i), np.zeros((4, 4, 3), np.uint8), 0.9, label)
              for i, label in enumerate(labels)]  # fmt: skip
    settings = Settings()
    hidden = np.zeros((20, 2), dtype=np.float32)
    candidate, running = EdgeBatch(np.full(20, 0.1), hidden), EdgeBatch(np.full(20, 0.9), hidden)
    result = gate(frames, candidate, np.ones(20), 0.5, running, settings)
    assert [(c.name, c.candidate, c.running, c.passed) for c in result.checks[:2]] == [
        ("caregiver labels", 0.8, 0.2, True),
        ("caregiver falls", 0.0, 1.0, False),
    ]
    assert result.refusal() == (
        "not published: the candidate says fall on 0.0% of the 2 caregiver-acknowledged fall frames, "
        "the running pair on 100.0% (held-out slice of 20 frames)"
    )
    # the same slice without an answer: agreement with the cloud decides, and refuses too
    for frame in frames:
        frame.label = None
    unlabelled = gate(frames, candidate, np.ones(20), 0.5, running, settings)
    assert unlabelled.refusal().startswith("not published: the candidate agrees with the cloud on 0.0% of the held")
    # a candidate that keeps the falls passes on the labels, however much less it agrees with the cloud
    frames_back = [AdaptFrame(f.input_id, f.group, f.order_key, f.image_rgb, 0.9, label)
                   for f, label in zip(frames, labels, strict=True)]  # fmt: skip
    keeps = EdgeBatch(np.array([0.1] * 8 + [0.9] * 2 + [0.1] * 10), hidden)
    assert gate(frames_back, keeps, np.ones(20), 0.5, running, settings).passed
