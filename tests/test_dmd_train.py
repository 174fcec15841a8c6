"""Switcher training (paper A.3): input size from the data, seeded, imbalance weighted, early stopping."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from core.settings import ConfigError, DmdSettings
from dmd_offline.dataset import UNKNOWN, DatasetManifest, DmdData, DmdRow, agreement_scores
from dmd_offline.train import load_trained, save_trained, switcher_targets, train_switcher
from edge_workers.switcher import CameraHistory, history_by_camera

HIDDEN = 24


def agreement_data(n: int, seed: int, agree_share: float = 0.75) -> DmdData:
    """Hidden vectors whose first coordinate tells agreement (1) from disagreement (0), with noise elsewhere."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < agree_share).astype(int)
    hidden = rng.normal(0, 1, (n, HIDDEN)).astype(np.float32)
    hidden[:, 0] = np.where(labels == 1, 2.0, -2.0) + rng.normal(0, 0.3, n)
    rows = [
        DmdRow(
            input_id=str(i),
            image_path=f"{i}.jpg",
            group="",
            split="",
            order_key=float(i),
            small_fall_probability=0.5,
            large_fall_probability=0.5,
            small_prediction=0,
            large_prediction=1 - label,
            label=int(label),
            ground_truth=0,
            large_source="computed",
            offload_reason="",
            small_time_ms=1.0,
            large_time_ms=1.0,
            small_energy_j=float("nan"),
            large_energy_j=float("nan"),
        )
        for i, label in enumerate(labels)
    ]
    manifest = DatasetManifest(source="synthetic", edge_model="e", cloud_model="c", hidden_size=HIDDEN)
    return DmdData(manifest, rows, hidden)


SETTINGS = DmdSettings(learning_rate=3e-3, max_epochs=30, patience=5, train_batch_size=16, seed=3)


def test_switcher_learns_agreement_with_the_papers_architecture() -> None:
    switcher, report = train_switcher(agreement_data(160, 1), agreement_data(60, 2), SETTINGS)
    assert switcher.input_dim == HIDDEN == report.input_dim  # read from the data
    assert [layer.out_features for layer in switcher.layers if isinstance(layer, torch.nn.Linear)] == [512, 128, 1]
    assert report.val_accuracy > 0.95
    assert report.best_val_loss == pytest.approx(min(report.val_losses))
    assert not switcher.training  # handed back ready for inference


def test_class_imbalance_is_weighted_and_reported() -> None:
    train = agreement_data(200, 4, agree_share=0.8)
    _, report = train_switcher(train, agreement_data(40, 5), SETTINGS)
    agreements = int(train.column("label").sum())
    assert report.agreement_share_train == pytest.approx(agreements / 200)
    assert report.positive_class_weight == pytest.approx((200 - agreements) / agreements)


def test_same_seed_same_switcher_and_another_seed_another() -> None:
    train, val = agreement_data(80, 6), agreement_data(30, 7)
    first, _ = train_switcher(train, val, SETTINGS)
    again, _ = train_switcher(train, val, SETTINGS)
    other, _ = train_switcher(train, val, SETTINGS.model_copy(update={"seed": 4}))
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not torch.equal(first.layers[0].weight, other.layers[0].weight)


def test_early_stopping_stops_when_validation_stops_improving() -> None:
    # validation labels are unrelated to the inputs: the validation loss soon stops improving
    val = agreement_data(40, 8)
    shuffled = DmdData(val.manifest, val.rows, np.random.default_rng(0).permutation(val.hidden))
    settings = SETTINGS.model_copy(update={"max_epochs": 500, "patience": 3})
    _, report = train_switcher(agreement_data(80, 9), shuffled, settings)
    assert report.epochs_run == report.best_epoch + 3 < 500


def test_one_class_training_data_is_a_readable_error() -> None:
    only_agreements = agreement_data(30, 10, agree_share=1.0)
    with pytest.raises(ConfigError, match="only agreements"):
        train_switcher(only_agreements, agreement_data(10, 11), SETTINGS)


def test_trained_switcher_round_trips(tmp_path: Path) -> None:
    switcher, report = train_switcher(agreement_data(60, 12), agreement_data(20, 13), SETTINGS)
    save_trained(tmp_path, switcher, report)
    loaded, loaded_report = load_trained(tmp_path)
    probe = agreement_data(10, 14).hidden
    assert np.array_equal(loaded.agreement_probability(probe), switcher.agreement_probability(probe))
    assert loaded_report == report


def confidence_data(n: int, seed: int, ground_truth: int = 0) -> DmdData:
    """Disagreement only where the edge is unsure (P(fall) near 0.5); the hidden vectors are pure noise."""
    base = agreement_data(n, seed)
    rng = np.random.default_rng(seed + 100)
    probability = rng.random(n)
    unsure = np.abs(probability - 0.5) < 0.2
    rows = [
        replace(row, small_fall_probability=float(p), label=int(not doubt), ground_truth=ground_truth)
        for row, p, doubt in zip(base.rows, probability, unsure, strict=True)
    ]
    return DmdData(base.manifest, rows, rng.normal(0, 1, base.hidden.shape).astype(np.float32))


def test_confidence_inputs_learn_what_the_hidden_vector_does_not_say() -> None:
    train, val = confidence_data(300, 20), confidence_data(100, 21)
    with_confidence = SETTINGS.model_copy(update={"switcher_inputs": "hidden+confidence"})
    switcher, report = train_switcher(train, val, with_confidence)
    _, hidden_only = train_switcher(train, val, SETTINGS)
    assert switcher.input_dim == HIDDEN + 3 == report.input_dim and report.inputs == "hidden+confidence"
    assert report.val_accuracy > 0.85 > hidden_only.val_accuracy + 0.1
    with pytest.raises(ValueError, match="needs the edge's fall probabilities"):
        switcher.agreement_probability(val.hidden)


def test_confidence_switcher_round_trips_with_its_inputs(tmp_path: Path) -> None:
    settings = SETTINGS.model_copy(update={"switcher_inputs": "hidden+confidence"})
    data = confidence_data(60, 22)
    switcher, report = train_switcher(data, confidence_data(20, 23), settings)
    save_trained(tmp_path, switcher, report)
    loaded, _ = load_trained(tmp_path)
    assert loaded.inputs == "hidden+confidence"
    assert np.array_equal(agreement_scores(loaded, data), agreement_scores(switcher, data))


def test_deferral_helps_target_marks_only_frames_the_cloud_gets_right() -> None:
    data = agreement_data(4, 30)
    # edge wrong + cloud right, edge wrong + cloud wrong, edge right + cloud wrong, no ground truth (disagree)
    cases = [(1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 1, UNKNOWN)]
    rows = [
        replace(row, small_prediction=small, large_prediction=large, ground_truth=truth, label=int(small == large))
        for row, (small, large, truth) in zip(data.rows, cases, strict=True)
    ]
    labelled = DmdData(data.manifest, rows, data.hidden)
    assert switcher_targets(labelled, "agreement").tolist() == [0, 1, 0, 0]
    assert switcher_targets(labelled, "deferral_helps").tolist() == [0, 1, 1, 0]


def history_data(clips: int, seed: int) -> DmdData:
    """Clips of 8 frames whose rows come shuffled: the cloud disagrees on a frame right after one where the
    edge said "fall", whatever the edge says now; hidden vectors are noise, the frame's own P(fall) too."""
    rng = np.random.default_rng(seed)
    base = agreement_data(clips * 8, seed)
    rows, previous = [], {}
    for index in rng.permutation(clips * 8):
        clip, position = divmod(int(index), 8)
        rows.append((clip, position, float(rng.choice([0.1, 0.9]))))
    by_frame = {(clip, position): p for clip, position, p in rows}
    for (clip, position), p in by_frame.items():
        previous[(clip, position)] = by_frame.get((clip, position - 1), p)
    data_rows = [
        replace(base.rows[i], group=f"clip-{clip}", order_key=float(position), small_fall_probability=p,
                label=int(previous[(clip, position)] < 0.5))
        for i, (clip, position, p) in enumerate(rows)
    ]  # fmt: skip
    return DmdData(base.manifest, data_rows, rng.normal(0, 1, base.hidden.shape).astype(np.float32))


def test_history_inputs_learn_what_a_frame_alone_does_not_say(tmp_path: Path) -> None:
    train, val = history_data(40, 40), history_data(15, 41)
    history = SETTINGS.model_copy(update={"switcher_inputs": "hidden+confidence+history", "switcher_history": 3})
    switcher, report = train_switcher(train, val, history)
    _, confidence = train_switcher(train, val, SETTINGS.model_copy(update={"switcher_inputs": "hidden+confidence"}))
    assert switcher.input_dim == HIDDEN + 3 + 3 == report.input_dim and report.history == switcher.history == 3
    assert report.val_accuracy > 0.85 > confidence.val_accuracy + 0.15, (report.val_accuracy, confidence.val_accuracy)
    save_trained(tmp_path, switcher, report)
    loaded, loaded_report = load_trained(tmp_path)
    assert loaded.history == 3 and loaded_report == report
    assert np.array_equal(agreement_scores(loaded, val), agreement_scores(switcher, val))
    with pytest.raises(ValueError, match="last 3 probabilities per frame"):
        switcher.agreement_probability(val.hidden, val.column("small_fall_probability"))


def test_the_live_history_of_a_stream_in_batches_is_the_offline_one() -> None:
    rng = np.random.default_rng(7)
    cameras = [str(c) for c in rng.choice(["cam-a", "cam-b", "cam-c"], size=50)]
    probabilities = rng.random(50).astype(np.float32)
    offline = history_by_camera(probabilities, cameras, np.arange(50), 4)
    live = CameraHistory()
    batches = np.split(np.arange(50), [3, 4, 20, 33])  # batches of any size, a camera's frames across them
    rows = np.concatenate([live.rows([cameras[i] for i in batch], probabilities[batch], 4) for batch in batches])
    assert np.array_equal(rows, offline)
    first_b = cameras.index("cam-b")
    later_b = [i for i, camera in enumerate(cameras) if camera == "cam-b"][5]
    assert offline[first_b].tolist() == [probabilities[first_b]] * 4  # nothing before: the frame itself
    earlier_b = [p for p, camera in zip(probabilities[:later_b], cameras, strict=False) if camera == "cam-b"]
    assert offline[later_b].tolist() == earlier_b[::-1][:4]  # the camera's last four, the latest first
    live.clear()
    assert live.rows(["cam-b"], probabilities[:1], 4).tolist() == [[probabilities[0]] * 4]  # a new version
