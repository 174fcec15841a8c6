"""The reference pair: trained here on the image folder's train split, loaded through the serving path.

A tiny ViLT config and a few images keep these fast; the real-size training is `make reference`.
BlazePose is real (its weights ship in the mediapipe wheel), on real images of the shared data set.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from safetensors.numpy import load_file

from cloud_workers.loading import load_cloud_model
from cloud_workers.pose import PoseFallCloudModel, pose_features
from core.pose import LANDMARKS, Pose
from core.settings import Settings
from edge_workers.model import ViltEdgeModel, load_edge_model
from fallwatch.devkit.reference import CloudTrainingConfig, EdgeTrainingConfig, load_splits, train_reference_pair
from tests.conftest import SHARED_DATASETS, run_fallwatch

FALLS_FALLACTION = SHARED_DATASETS / "falls-fallaction"
TINY_EDGE = EdgeTrainingConfig(hidden_size=32, layers=1, heads=2, image_size=64, max_epochs=2, patience=1)
QUICK_CLOUD = CloudTrainingConfig(max_epochs=30, patience=5)
PER_SPLIT = 16


def image(name: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(FALLS_FALLACTION / "images" / name)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def reference_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("reference")
    train_quick_pair(output, seed=7)
    return output


def train_quick_pair(output: Path, seed: int = 0, limit_per_split: int = PER_SPLIT) -> None:
    """The reference pair of tiny, quickly trained models, on the first `limit_per_split` images of a split."""
    train_reference_pair(
        FALLS_FALLACTION,
        output,
        Settings().edge.question,
        seed=seed,
        limit_per_split=limit_per_split,
        edge_config=TINY_EDGE,
        cloud_config=QUICK_CLOUD,
    )


def test_the_pair_loads_through_the_normal_loading_path(reference_pair: Path) -> None:
    settings = Settings(
        edge={"model": str(reference_pair / "edge-vilt")}, cloud={"model": str(reference_pair / "cloud-pose")}
    )
    edge = load_edge_model(settings)
    cloud = load_cloud_model(settings)
    assert isinstance(edge, ViltEdgeModel) and edge.hidden_size == 2 * TINY_EDGE.hidden_size
    assert isinstance(cloud, PoseFallCloudModel)
    frames = [image("fa_00006.jpg"), image("fa_00004.jpg")]
    edge_out = edge.predict(frames)
    cloud_out = cloud.predict([[frame] for frame in frames])
    for probabilities in (edge_out.fall_probability, cloud_out):
        assert probabilities.shape == (2,) and np.all((probabilities >= 0) & (probabilities <= 1))

    summary = json.loads((reference_pair / "training.json").read_text())
    assert summary["train_images"] == summary["val_images"] == PER_SPLIT
    assert summary["edge"]["epochs_run"] <= TINY_EDGE.max_epochs
    assert 0 < summary["cloud"]["notes"]["no_pose_probability"] < 1


def test_the_test_split_is_never_read(tmp_path: Path) -> None:
    """A copy of the data set whose test images are not images: training loads exactly the same data."""
    copy = tmp_path / "falls-fallaction"
    shutil.copytree(FALLS_FALLACTION, copy)
    rows = list(csv.DictReader((copy / "labels.csv").open()))
    test_images = [row["image"] for row in rows if row["split"] == "test"]
    assert test_images, "the data set has a test split"
    for name in test_images:
        (copy / name).write_bytes(b"not an image")
    train, val = load_splits(FALLS_FALLACTION, limit_per_split=None)
    train_copy, val_copy = load_splits(copy, limit_per_split=None)
    for original, again in ((train, train_copy), (val, val_copy)):
        assert np.array_equal(original.labels, again.labels)
        assert all(np.array_equal(a, b) for a, b in zip(original.images, again.images, strict=True))
    assert len(train.images) + len(val.images) + len(test_images) == len(rows)


def test_same_seed_same_pair(reference_pair: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    train_quick_pair(again, seed=7)
    for model in ("edge-vilt", "cloud-pose"):
        first = load_file(str(reference_pair / model / "model.safetensors"))
        second = load_file(str(again / model / "model.safetensors"))
        assert first.keys() == second.keys()
        assert all(np.array_equal(first[name], second[name]) for name in first), model


def test_cloud_model_judges_the_clips_newest_frame(reference_pair: Path) -> None:
    cloud = PoseFallCloudModel.from_pretrained(str(reference_pair / "cloud-pose"))
    person = image("fa_00006.jpg")
    nobody = np.full_like(person, 127)
    alone, at_the_end, at_the_start = cloud.predict([[person], [nobody, person], [person, nobody]])
    assert at_the_end == pytest.approx(alone)
    # nobody in the key frame: the classifier's prior for "no person found", whatever came before
    assert at_the_start == pytest.approx(cloud.classifier.config.no_pose_probability)
    assert alone != pytest.approx(cloud.classifier.config.no_pose_probability)


def test_a_mirrored_pose_swaps_sides_and_keeps_its_angles() -> None:
    rng = np.random.default_rng(0)
    landmarks = rng.uniform(0.1, 0.9, (LANDMARKS, 4)).astype(np.float32)
    pose = Pose(landmarks, image_height=480, image_width=640, rotation=0)
    mirrored = pose.mirrored()
    assert np.allclose(mirrored.landmarks[11, 0], 1 - landmarks[12, 0])  # left shoulder ← right shoulder
    assert np.allclose(mirrored.mirrored().landmarks, landmarks)
    original, flipped = pose_features(pose), pose_features(mirrored)
    assert original.shape == flipped.shape and np.all(np.isfinite(original))
    assert np.allclose(original[:3], flipped[:3], atol=1e-5)  # torso, thigh and body angles


def test_train_reference_mistakes_get_one_readable_line(tmp_path: Path) -> None:
    result = run_fallwatch("models", "train-reference", "--dataset", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "labels.csv not found" in result.stderr


def test_a_folder_without_val_rows_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "train-only"
    (folder / "images").mkdir(parents=True)
    shutil.copy(FALLS_FALLACTION / "images" / "fa_00006.jpg", folder / "images" / "a.jpg")
    (folder / "labels.csv").write_text("image,label,split\nimages/a.jpg,fall,train\n")
    result = run_fallwatch("models", "train-reference", "--dataset", str(folder), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "train and the val split" in result.stderr


def test_retraining_removes_the_switchers_and_dmd_data_of_the_previous_pair(tmp_path: Path) -> None:
    output = tmp_path / "pair"
    for stale in ("switchers/20260101T000000Z", "dmd/dataset"):
        (output / stale).mkdir(parents=True)
    train_quick_pair(output, limit_per_split=4)
    assert not (output / "switchers").exists() and not (output / "dmd").exists()
    assert (output / "edge-vilt" / "config.json").is_file() and (output / "cloud-pose" / "config.json").is_file()
