"""Facility adaptation with tiny models: a biased camera learnt, the gate, one version, rollback.

The edge model is the tiny ViLT leaning to "fall" (its "yes" answer raised) on every frame. Two cameras log cloud
answers: on cam-a the cloud mostly says "fall" too, on cam-b (the biased camera: a room the edge
model reads wrong) mostly "no fall". A fifth of the cloud's answers are flipped at random, as a
cloud model is sometimes wrong, so the switcher's out-of-fold rows hold disagreements.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from transformers import ViltForQuestionAnswering

from core.settings import ConfigError, Settings
from dmd_offline.adapt import (
    Adaptation,
    AdaptFrame,
    GateCheck,
    GateRefused,
    GateResult,
    KnownFalls,
    dmd_rows,
    frames_of,
    gate,
    held_out_slice,
    publish_candidate,
    routed_gate,
    running_pair,
    scores_of,
    targets,
)
from dmd_offline.dataset import with_history
from dmd_offline.finetune import TrainingImages, finetune
from dmd_offline.sources import ReplayItem
from dmd_offline.threshold import ThresholdChoice
from edge_workers.model import EdgeBatch, ViltEdgeModel
from edge_workers.registry import (
    PAIR_EDGE_DIR,
    ActivePointer,
    Calibration,
    PairRegistry,
    PairVersion,
    activate,
    read_active,
    read_pair_version,
    rollback,
    save_pair,
)
from edge_workers.switcher import Switcher, SwitcherMetadata
from fallwatch.devkit.models import ModelPaths
from tests.test_cloud_worker import load_tiny_cloud_model, small_clip
from tests.test_edge_worker_pairs import publish_version

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
    # a switcher cannot predict the cloud's random flips: the learned one wins nothing over uncertainty
    # deferral, so the version routes by the edge's confidence, bound to its edge model all the same
    assert candidate.gate.passed_over is not None and candidate.gate.passed_over.by_chance == 1.0
    assert loaded.switcher.metadata.inputs == "confidence"
    recorded = read_pair_version(registry, version)
    assert recorded.calibration == candidate.calibration and recorded.parent is None
    assert loaded.switcher.metadata.edge_model_revision == recorded.edge_sha256


def test_the_edge_learns_frames_of_mixed_sizes_as_it_is_served_them(fall_edge: Path, tmp_path: Path) -> None:
    # two cameras of other resolutions (4:3 and 16:9) and an original image folder of a third size,
    # in the same epochs and batches; every frame is "no fall" for an edge model that says "fall"
    rng = np.random.default_rng(2)
    sizes = [(96, 128), (72, 128), (128, 96)]
    images = [rng.integers(0, 255, size=(*sizes[i % 3], 3), dtype=np.uint8) for i in range(24)]
    settings = adapt_settings(fall_edge, tmp_path)
    edge = ViltEdgeModel.from_pretrained(str(fall_edge), settings.edge.question)
    assert (edge.predict(images).fall_probability > 0.5).all()

    facility = TrainingImages(images[:16], np.zeros(16, dtype=np.int64))
    original = TrainingImages(images[16:], np.zeros(8, dtype=np.int64))
    adapted = finetune(edge, facility, original, settings.dmd.adapt, seed=0)

    assert (adapted.predict(images).fall_probability < 0.5).all(), adapted.predict(images).fall_probability


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


def test_a_publish_judged_against_a_version_rolled_back_meanwhile_is_refused_and_a_rollback_needs_a_whole_version(
    fall_edge: Path, tmp_path: Path
) -> None:
    settings = adapt_settings(fall_edge, tmp_path, gate_tolerance=1.0, epochs=1)
    registry = tmp_path / "reg"
    first = publish_candidate(settings, Adaptation(settings, None, "synthetic").run(biased_frames(2)), "window 1")
    second = publish_candidate(settings, Adaptation(settings, None, "synthetic").run(biased_frames(3)), "window 2")
    late = Adaptation(settings, None, "synthetic").run(biased_frames(4))  # judged against the second
    assert rollback(registry) == (second, first)  # an operator's rollback while it was made
    versions = sorted(path.name for path in registry.iterdir())
    with pytest.raises(ConfigError, match=f"not published: ACTIVE moved from {second} to {first} while"):
        publish_candidate(settings, late, "window 3")
    assert read_active(registry) == ActivePointer(version=first, previous=[]), "ACTIVE unchanged"
    assert sorted(path.name for path in registry.iterdir()) == versions, "the refused version is not left behind"

    third = publish_candidate(settings, Adaptation(settings, None, "synthetic").run(biased_frames(5)), "window 4")
    shutil.rmtree(registry / first)  # deleted to free the disk, say
    with pytest.raises(ConfigError, match=f"cannot roll back to {first}: version {first} is not in"):
        rollback(registry)
    assert read_active(registry) == ActivePointer(version=third, previous=[first]), "ACTIVE unchanged"


def test_an_active_pointer_that_is_not_utf8_is_one_readable_error(tmp_path: Path) -> None:
    (tmp_path / "ACTIVE").write_text('{"version": "v1"}', encoding="utf-16")
    with pytest.raises(ConfigError, match="ACTIVE is not a pointer to a version: not UTF-8 text"):
        read_active(tmp_path)


def test_a_cloud_answer_of_nan_is_no_answer_and_no_target(tiny_models: ModelPaths) -> None:
    model = load_tiny_cloud_model(tiny_models)
    with torch.no_grad():  # an overflow somewhere in the model: every logit NaN
        model.model.get_output_embeddings().weight.fill_(float("nan"))
    image = np.full((64, 64, 3), 120, np.uint8)
    item = ReplayItem("f1", "f1.jpg", "cam-a", "", 0.0, image, lambda: small_clip(1), None)
    frames = frames_of([item], model, 8, labels_are_caregivers=True)
    assert frames[0].cloud_probability is None
    assert targets(frames, 0.5).tolist() == [-1], "neither a label nor a cloud answer: not learnt from"


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
    none = np.zeros(20, dtype=bool)  # neither switcher defers a frame
    result = gate(frames, candidate, none, running, none, settings)
    assert [(c.name, c.candidate, c.running, c.passed) for c in result.checks[:2]] == [
        ("caregiver labels", 0.8, 0.2, True),
        ("caregiver falls", 0.0, 1.0, False),
    ]
    assert result.refusal() == (
        "not published: the candidate pair says fall on 0.0% of the 2 caregiver-acknowledged fall frames, "
        "the running pair on 100.0% (held-out slice of 20 frames)"
    )
    # the same slice without an answer: agreement with the cloud decides, and refuses too
    for frame in frames:
        frame.label = None
    unlabelled = gate(frames, candidate, none, running, none, settings)
    assert unlabelled.refusal().startswith("not published: the candidate agrees with the cloud on 0.0% of the held")
    # a candidate that keeps the falls passes on the labels, however much less it agrees with the cloud
    frames_back = [AdaptFrame(f.input_id, f.group, f.order_key, f.image_rgb, 0.9, label)
                   for f, label in zip(frames, labels, strict=True)]  # fmt: skip
    keeps = EdgeBatch(np.array([0.1] * 8 + [0.9] * 2 + [0.1] * 10), hidden)
    assert gate(frames_back, keeps, none, running, none, settings).passed


def test_the_gate_holds_out_each_cameras_latest_frames_or_whole_cameras() -> None:
    # four frames of each of five cameras, the newest first
    frames = [AdaptFrame(f"{camera}#{i}", camera, float(3 - i), np.zeros((4, 4, 3), np.uint8), 0.1, None)
              for camera in ("c1", "c2", "c3", "c4", "c5") for i in range(4)]  # fmt: skip
    by_time = held_out_slice(frames, 0.3)
    assert [f.input_id for f, held in zip(frames, by_time, strict=True) if held] == [f"c{n}#0" for n in range(1, 6)]

    by_camera = held_out_slice(frames, 0.3, "camera", seed=0)
    cameras = {f.group for f, held in zip(frames, by_camera, strict=True) if held}
    assert len(cameras) == 2, "round(0.3 × 5) cameras"
    assert by_camera.tolist() == [f.group in cameras for f in frames], "every frame of those, none of the others"
    assert held_out_slice(frames, 0.3, "camera", seed=0).tolist() == by_camera.tolist(), "seeded"
    two = [f for f in frames if f.group in {"c1", "c2"}]
    assert held_out_slice(two, 0.9, "camera").sum() == 4, "one camera is left to learn from"
    one = [f for f in frames if f.group == "c1"]
    assert held_out_slice(one, 0.3, "camera").tolist() == held_out_slice(one, 0.3).tolist(), "one camera: by time"


def test_adaptation_gated_on_a_camera_it_did_not_learn(fall_edge: Path, tmp_path: Path) -> None:
    settings = adapt_settings(fall_edge, tmp_path, gate_slice="camera", epochs=2)
    candidate = Adaptation(settings, None, "synthetic").run(biased_frames())
    # one of the two cameras is held out whole; the other one's frames are all there is to learn from
    assert candidate.gate.frames == candidate.adaptation_frames == FRAMES_PER_CAMERA
    assert len({row.group for row in candidate.rows.rows}) == 1


def test_without_labels_a_candidate_agreeing_more_by_dropping_the_falls_is_refused() -> None:
    # the cloud calls 4 of 20 held-out frames a fall; the running edge says "fall" on all of them
    frames = [AdaptFrame(f"f{i}", "cam-a", float(i), np.zeros((4, 4, 3), np.uint8), 0.9 if i < 4 else 0.1, None)
              for i in range(20)]  # fmt: skip
    hidden, none = np.zeros((20, 2), dtype=np.float32), np.zeros(20, dtype=bool)
    running = EdgeBatch(np.full(20, 0.9), hidden)
    silent = gate(frames, EdgeBatch(np.full(20, 0.1), hidden), none, running, none, Settings())
    assert [(c.name, c.candidate, c.running, c.passed) for c in silent.checks[:2]] == [
        ("cloud agreement", 0.8, 0.2, True),
        ("cloud falls F1", 0.0, pytest.approx(1 / 3), False),
    ]
    assert silent.refusal() == (
        "not published: the candidate's F1 on the cloud's fall answers is 0.0%, the running pair's 33.3% "
        "(held-out slice of 20 frames)"
    )
    # one that learnt the room keeps the cloud's falls and passes
    learnt = EdgeBatch(np.array([0.9] * 4 + [0.1] * 16), hidden)
    assert gate(frames, learnt, none, running, none, Settings()).passed


def test_with_false_alarms_only_the_falls_are_judged_on_the_original_data() -> None:
    # the slice's only label is a false alarm (alerts come where the running pair said "fall"): a
    # candidate that never says "fall" is right on it, and the falls it lost show only elsewhere
    frames = [AdaptFrame(f"f{i}", "cam-a", float(i), np.zeros((4, 4, 3), np.uint8), 0.9 if i < 4 else 0.1, None)
              for i in range(20)]  # fmt: skip
    frames[10].label = 0
    hidden, none = np.zeros((20, 2), dtype=np.float32), np.zeros(20, dtype=bool)
    silent, running = EdgeBatch(np.full(20, 0.1), hidden), EdgeBatch(np.full(20, 0.9), hidden)
    blind = KnownFalls(candidate=np.zeros(5, dtype=bool), running=np.ones(5, dtype=bool))
    refused = gate(frames, silent, none, running, none, Settings(), blind)
    assert [(c.name, c.passed) for c in refused.checks] == [
        ("caregiver labels", True),
        ("caregiver falls", True),  # nothing acknowledged to judge
        ("original falls", False),
        ("switcher vs uncertainty", True),
    ]
    assert refused.refusal() == (
        "not published: no caregiver acknowledged a fall on the held-out slice, and the candidate says fall on "
        "0.0% of the 5 fall images of original_data's held-out splits, the running edge on 100.0% "
        "(held-out slice of 20 frames)"
    )
    keeps = KnownFalls(candidate=np.ones(5, dtype=bool), running=np.ones(5, dtype=bool))
    assert gate(frames, silent, none, running, none, Settings(), keeps).passed
    # with an acknowledged fall on the slice, that decides, not the original data
    frames[0].label = 1
    assert [c.name for c in gate(frames, silent, none, running, none, Settings(), blind).checks] == [
        "caregiver labels",
        "caregiver falls",
        "switcher vs uncertainty",
    ]


def test_an_adaptation_with_false_alarms_only_reads_the_original_falls(fall_edge: Path, tmp_path: Path) -> None:
    folder = tmp_path / "original"
    (folder / "images").mkdir(parents=True)
    rows = ["image,label,split"]
    rng = np.random.default_rng(1)
    for index, (label, split) in enumerate([("fall", "train"), ("fall", "val"), ("no_fall", "val"),
                                            ("fall", "val"), ("fall", "test"), ("no_fall", "test")]):  # fmt: skip
        cv2.imwrite(str(folder / "images" / f"{index}.png"), rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
        rows.append(f"images/{index}.png,{label},{split}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    settings = adapt_settings(fall_edge, tmp_path, gate_tolerance=1.0, original_data=str(folder))
    frames = biased_frames()
    for frame in frames[FRAMES_PER_CAMERA:]:
        frame.label = 0  # every alert of cam-b answered "false alarm"
    candidate = Adaptation(settings, None, "synthetic").run(frames)
    check = next(c for c in candidate.gate.checks if c.name == "original falls")
    assert candidate.gate.original_falls == 3, "the fall images of the val and test splits"
    assert check.running == 1.0, "the fall-leaning running edge calls each of them a fall"
    assert check.candidate is not None and 0.0 <= check.candidate <= 1.0
    assert type(check.candidate) is float and type(check.passed) is bool, "plain values: reports write them as JSON"


def test_gate_on_caregiver_labels_judges_what_each_pair_serves() -> None:
    # held out: 4 false alarms (a person lying on a bed, the cloud says "fall"), then 2 acknowledged
    # falls (the cloud says "fall" too); the candidate's edge says "no fall" on all six
    frames = [AdaptFrame(f"f{i}", "cam-a", float(i), np.zeros((4, 4, 3), np.uint8), 0.9, label)
              for i, label in enumerate([0, 0, 0, 0, 1, 1])]  # fmt: skip
    settings = Settings()
    hidden = np.zeros((6, 2), dtype=np.float32)
    candidate = EdgeBatch(np.array([0.1, 0.1, 0.2, 0.2, 0.4, 0.4]), hidden)  # least sure on the falls
    running, never = EdgeBatch(np.full(6, 0.9), hidden), np.zeros(6, dtype=bool)

    # its switcher sends the two falls to the cloud: the pair serves "fall" there and passes
    to_cloud = np.array([False] * 4 + [True] * 2)
    served = gate(frames, candidate, to_cloud, running, never, settings)
    assert [(c.name, c.candidate, c.running) for c in served.checks] == [
        ("caregiver labels", 1.0, 2 / 6),
        ("caregiver falls", 1.0, 1.0),
        ("switcher vs uncertainty", 1.0, 1.0),  # uncertainty defers the same two frames
    ]
    assert served.passed and served.cloud_share == pytest.approx(1 / 3)
    # the running pair's switcher deferring the false alarms changes nothing: the cloud says "fall" there too
    assert gate(frames, candidate, to_cloud, running, ~to_cloud, settings).checks[0].running == 2 / 6

    # a switcher that sends two of the false alarms instead: the cloud answers "fall" on them and the pair
    # misses both falls (right on 2 of 6, as the running pair); uncertainty deferral of two frames would
    # have been right on all six
    wrong = np.array([True, True] + [False] * 4)
    refused = gate(frames, candidate, wrong, running, never, settings)
    assert [c.name for c in refused.checks if not c.passed] == ["caregiver falls", "switcher vs uncertainty"]
    assert "the candidate's switcher is right on 33.3% with 33% to the cloud, uncertainty deferral on 100.0%" in (
        refused.refusal()
    )
    # a frame without a cloud answer cannot be answered by the cloud, whatever the switcher says
    frames[4].cloud_probability = frames[5].cloud_probability = None
    unanswered = gate(frames, candidate, to_cloud, running, never, settings)
    assert unanswered.checks[1] == GateCheck("caregiver falls", 0.0, 1.0, False)


def first_coordinate_switcher(hidden_size: int) -> Switcher:
    """A learned switcher by its weights: its score is sigmoid(hidden[0]) for hidden[0] ≥ 0."""
    switcher = Switcher(hidden_size)
    with torch.no_grad():
        for layer in (m for m in switcher.layers if isinstance(m, torch.nn.Linear)):
            layer.weight.zero_()
            layer.bias.zero_()
            layer.weight[0, 0] = 1.0
    return switcher.eval()


def bed_room_slice() -> tuple[list[AdaptFrame], EdgeBatch, EdgeBatch]:
    """Six caregiver false alarms (a person lying on a bed) and four acknowledged falls, the cloud saying
    "fall" on all ten. The candidate's edge is sure of the false alarms and unsure of the falls; the
    hidden vector's first coordinate is 0–0.5 on the false alarms and 5 on the falls."""
    labels = [0] * 6 + [1] * 4
    frames = [AdaptFrame(f"f{i}", "cam-a", float(i), np.zeros((4, 4, 3), np.uint8), 0.9, label)
              for i, label in enumerate(labels)]  # fmt: skip
    hidden = np.zeros((10, 4), dtype=np.float32)
    hidden[:6, 0] = np.arange(6) / 10
    hidden[6:, 0] = 5.0
    candidate = EdgeBatch(np.array([0.05] * 6 + [0.45, 0.44, 0.43, 0.42]), hidden)
    return frames, candidate, EdgeBatch(np.full(10, 0.9), hidden)


def test_a_learned_switcher_routing_worse_than_the_edges_confidence_gives_way_to_it() -> None:
    frames, candidate, running = bed_room_slice()
    oof = dmd_rows(frames, candidate, 0.5, 0.5, "synthetic", 0)  # the switcher's rows: the same frames, say
    learned = first_coordinate_switcher(4)
    # set on the out-of-fold rows, a threshold deferring every held-out frame: each router's own
    # threshold defers the target share of the candidate's scores of the held-out frames instead
    choice = ThresholdChoice("budget", threshold=0.999, deferred_share=0.4, f1=0.0, target_share=0.4)
    settings = Settings(dmd={"adapt": {"target_offload_share": 0.4}})
    never = np.zeros(10, dtype=bool)

    router, routed_choice, result, calibration = routed_gate(
        frames, oof, learned, choice, candidate, running, never, settings
    )
    # served by the learned switcher: the cloud's "fall" on the four least-scored false alarms, the edge's
    # "no fall" on the falls (right on two of ten); uncertainty deferral of four frames: the four falls
    # it wins on none of the frames where the two routings differ: p = 1
    assert result.passed_over == GateCheck("switcher vs uncertainty", pytest.approx(0.2), 1.0, False, 1.0)
    assert router.inputs == "confidence" and not list(router.parameters())
    # the confidence router defers the 40 % least sure, the four falls, where the cloud is right
    assert result.cloud_share == pytest.approx(0.4) and calibration.offload_share == pytest.approx(0.4)
    assert routed_choice.deferred_share == pytest.approx(0.4) and routed_choice.threshold < choice.threshold
    assert [(c.name, c.candidate, c.passed) for c in result.checks] == [
        ("caregiver labels", 1.0, True),
        ("caregiver falls", 1.0, True),
    ]
    assert result.passed and routed_choice.target_share == 0.4
    metrics = result.as_metrics()
    assert metrics["gate_learned_switcher_vs_uncertainty_candidate"] == pytest.approx(0.2)
    assert metrics["gate_learned_switcher_vs_uncertainty_running"] == 1.0
    assert metrics["gate_learned_switcher_vs_uncertainty_by_chance"] == 1.0

    # without the fallback the candidate is refused, for its switcher and for the falls it would miss
    settings.dmd.adapt.confidence_fallback = False
    kept, kept_choice, refused, _ = routed_gate(frames, oof, learned, choice, candidate, running, never, settings)
    assert kept is learned and not refused.passed and refused.passed_over is None
    assert scores_of(learned, candidate, frames)[3] < kept_choice.threshold < scores_of(learned, candidate, frames)[4]
    assert "the candidate's switcher is right on 20.0% with 40% to the cloud, uncertainty deferral on 100.0%" in (
        refused.refusal()
    )


def test_a_learned_switcher_is_served_only_where_its_win_over_the_edges_confidence_is_more_than_chance() -> None:
    # six false alarms, four acknowledged falls, the cloud saying "fall" on all ten. The candidate's edge says
    # "no fall" everywhere: least sure on four of the false alarms, sure of the falls. The learned switcher
    # scores the falls lowest (hidden[0] 0–0.3 against 5), so it defers them; uncertainty defers false alarms.
    labels = [0] * 6 + [1] * 4
    frames = [AdaptFrame(f"f{i}", "cam-a", float(i), np.zeros((4, 4, 3), np.uint8), 0.9, label)
              for i, label in enumerate(labels)]  # fmt: skip
    hidden = np.zeros((10, 4), dtype=np.float32)
    hidden[:6, 0], hidden[6:, 0] = 5.0, np.arange(4) / 10
    candidate = EdgeBatch(np.array([0.45, 0.44, 0.43, 0.42, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]), hidden)
    running, never = EdgeBatch(np.full(10, 0.9), hidden), np.zeros(10, dtype=bool)
    oof = dmd_rows(frames, candidate, 0.5, 0.5, "synthetic", 0)
    learned = first_coordinate_switcher(4)
    choice = ThresholdChoice("budget", threshold=0.5, deferred_share=0.2, f1=0.0, target_share=0.2)

    def routed(share: float) -> tuple[Switcher, GateResult]:
        settings = Settings(dmd={"adapt": {"target_offload_share": share}})
        router, _, result, _ = routed_gate(frames, oof, learned, choice, candidate, running, never, settings)
        return router, result

    # two frames each: the switcher is right on 8 of 10, uncertainty on 4; they differ on four frames and
    # the switcher is right on all four, which a routing no better does with p = 1/16: not evidence
    router, result = routed(0.2)
    assert router is not learned and router.inputs == "confidence"
    assert result.passed_over == GateCheck("switcher vs uncertainty", 0.8, 0.4, True, 1 / 16)
    assert result.fallback_line(0.05) == (
        "the learned switcher is right on 80.0% of the held-out frames it routes, uncertainty deferral on 40.0%: "
        "no evidence it routes better (sign test p = 0.06, at most 0.05 needed): "
        "the version routes by the edge's confidence instead"
    )
    # four frames each: right on all ten against two, winning on all eight frames they differ on (p = 1/256)
    router, result = routed(0.4)
    assert router is learned and result.passed_over is None and result.passed
    assert result.checks[-1] == GateCheck("switcher vs uncertainty", 1.0, 0.2, True, 1 / 256)


def test_a_learned_switcher_nothing_can_judge_gives_way_to_the_confidence_router() -> None:
    # no held-out frame has a cloud answer or a caregiver's label: the switcher's routing cannot be judged
    frames, candidate, running = bed_room_slice()
    oof = dmd_rows(frames, candidate, 0.5, 0.5, "synthetic", 0)
    for frame in frames:
        frame.cloud_probability, frame.label = None, None
    choice = ThresholdChoice("budget", threshold=0.5, deferred_share=0.4, f1=0.0, target_share=0.4)
    never = np.zeros(10, dtype=bool)
    learned = first_coordinate_switcher(4)

    router, _, result, _ = routed_gate(frames, oof, learned, choice, candidate, running, never, Settings())

    assert router is not learned and router.inputs == "confidence"
    assert result.passed_over == GateCheck("switcher vs uncertainty", None, None, True)
    assert result.fallback_line(0.05) == (
        "no held-out frame has a cloud answer or a caregiver label to judge the learned switcher: "
        "the version routes by the edge's confidence instead"
    )


def test_the_confidence_router_is_published_and_served_as_a_switcher(tiny_models: ModelPaths, tmp_path: Path) -> None:
    edge = ViltEdgeModel.from_pretrained(str(tiny_models.edge), Settings().edge.question)
    router = Switcher(edge.hidden_size, "confidence")
    registry = tmp_path / "reg"
    metadata = SwitcherMetadata(
        version="v1", input_dim=router.input_dim, inputs="confidence", threshold=0.3, edge_model=PAIR_EDGE_DIR,
        created_at=datetime.now(UTC), trained=False,
    )  # fmt: skip
    calibration = Calibration(frames=3, fall_rate=0.0, offload_share=0.3, score_quantiles=[])
    pair = PairVersion(version="v1", created_at=metadata.created_at, parent=None, edge_base=str(tiny_models.edge),
                       edge_sha256="", switcher_sha256="", training_window="test", calibration=calibration)  # fmt: skip
    save_pair(registry, pair, tiny_models.edge, router, metadata)
    activate(registry, "v1", replacing=None)
    loaded = PairRegistry(registry, lambda d: ViltEdgeModel.from_pretrained(str(d), Settings().edge.question),
                          3600, None).load_active()  # fmt: skip
    output = loaded.model.predict([np.full((64, 64, 3), value, np.uint8) for value in (0, 120, 255)])
    served = loaded.switcher.switcher
    assert loaded.switcher.metadata.inputs == "confidence"
    scores = served.agreement_probability(output.hidden, output.fall_probability, None)
    np.testing.assert_allclose(scores, np.abs(2 * output.fall_probability - 1), rtol=1e-6)
    with pytest.raises(ValueError, match="needs the edge's fall probabilities"):
        served.agreement_probability(output.hidden)
    with pytest.raises(ValueError, match="hidden vectors of shape"):
        served.agreement_probability(output.hidden[:, :2], output.fall_probability)


def test_adaptation_starts_from_the_served_pair_at_the_served_threshold(
    tiny_models: ModelPaths, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    settings = Settings(edge={**tiny_models.settings_sections()["edge"], "model_registry": registry})
    first = running_pair(settings)  # nothing published yet: edge.model with the newest switcher
    assert (first.edge_dir, first.version) == (tiny_models.edge, None)

    publish_version(registry, tiny_models, tmp_path, fall=True, version="v1")
    running = running_pair(settings)
    assert (running.edge_dir, running.version, running.threshold) == (registry / "v1" / PAIR_EDGE_DIR, "v1", 0.0)
    settings.edge.switcher_threshold = 0.4  # the gate compares with what the workers route by
    assert running_pair(settings).threshold == 0.4


def test_the_switchers_history_is_read_from_every_frame_not_only_those_the_cloud_answered() -> None:
    # a camera's frames, the cloud answering every other one, as logged traffic does
    frames = [AdaptFrame(f"f{i}", "cam-a", float(i), np.zeros((4, 4, 3), np.uint8), 0.9 if i % 2 else None, None)
              for i in range(40)]  # fmt: skip
    probabilities = np.arange(40, dtype=np.float32) / 40
    hidden = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    rows = dmd_rows(frames, EdgeBatch(probabilities, hidden), 0.5, 0.5, "synthetic", 2)
    assert [row.input_id for row in rows.rows[:2]] == ["f1", "f3"]
    assert rows.history is not None
    np.testing.assert_allclose(rows.history[1], probabilities[[2, 1]])  # f3's last two: f2 (unanswered), f1
    # the switcher is trained on the history the rows came with (`switcher_on` reads it through this)
    np.testing.assert_array_equal(with_history(rows, 2).history, rows.history)


def test_the_gate_and_the_calibration_judge_the_threshold_the_workers_route_by() -> None:
    frames, candidate, running = bed_room_slice()
    oof = dmd_rows(frames, candidate, 0.5, 0.5, "synthetic", 0)
    choice = ThresholdChoice("budget", threshold=0.5, deferred_share=0.4, f1=0.0, target_share=0.4)
    never = np.zeros(10, dtype=bool)
    # an operator pins the threshold at 0: the workers send nothing the switcher doubts to the cloud
    settings = Settings(edge={"switcher_threshold": 0.0}, dmd={"adapt": {"target_offload_share": 0.4}})
    _, routed_choice, result, calibration = routed_gate(
        frames, oof, first_coordinate_switcher(4), choice, candidate, running, never, settings
    )
    assert result.cloud_share == 0.0 and calibration.offload_share == 0.0
    assert routed_choice.threshold > 0, "the version keeps its own threshold, for when the override goes"
