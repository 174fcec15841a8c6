"""A cloud model of another family: pretrained BlazePose landmarks + a small fall classifier.

No hub weights reach these machines, so a from-scratch LLaVA would know nothing. The
one pretrained vision network that arrives with a package is MediaPipe's BlazePose
(`pose_landmark_full.tflite` ships inside the `mediapipe` wheel). A person's pose says
most of what "has this person fallen?" asks: `PoseFallCloudModel` finds the 33 body
landmarks in the clip's key frame (its newest frame, the one the edge offloaded), turns
them into scale-free geometric features, and a small MLP trained on the reference data
gives P(fall). It implements the cloud worker's `CloudModel` interface, so the worker,
the DMD replay and the benchmarks run it exactly as they run LLaVA-NeXT-Video.

The classifier is a `PreTrainedModel`: `save_pretrained` / `from_pretrained` give the
same directory layout (config.json + model.safetensors) as every other checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from cloud_workers.model import Clip
from core.pose import (
    LANDMARKS,
    LEFT_ANKLE,
    LEFT_HIP,
    LEFT_KNEE,
    LEFT_SHOULDER,
    NOSE,
    RIGHT_ANKLE,
    RIGHT_HIP,
    RIGHT_KNEE,
    RIGHT_SHOULDER,
    VISIBLE,
    Pose,
    PoseEstimator,
)

MODEL_TYPE = "fallwatch-pose-fall"
GEOMETRY_FEATURES = 15
FEATURE_SIZE = GEOMETRY_FEATURES + 2 * LANDMARKS + LANDMARKS  # geometry, normalised x/y, visibility


def angle_from(vector: np.ndarray, reference_y: float) -> float:
    """Degrees between `vector` and the image's vertical (down when reference_y = 1, up when -1)."""
    length = float(np.linalg.norm(vector)) + 1e-6
    return float(np.degrees(np.arccos(np.clip(reference_y * vector[1] / length, -1.0, 1.0))))


def pose_features(pose: Pose) -> np.ndarray:
    """Scale-free features of a pose: body angles and proportions, the skeleton around the hips."""
    scale = max(pose.image_height, pose.image_width)
    # pixels over the longer side: undoes the aspect ratio the normalised coordinates hide
    xy = pose.landmarks[:, :2] * np.array([pose.image_width, pose.image_height], dtype=np.float32) / scale
    visibility = pose.landmarks[:, 3]
    shoulders = (xy[LEFT_SHOULDER] + xy[RIGHT_SHOULDER]) / 2
    hips = (xy[LEFT_HIP] + xy[RIGHT_HIP]) / 2
    knees = (xy[LEFT_KNEE] + xy[RIGHT_KNEE]) / 2
    ankles = (xy[LEFT_ANKLE] + xy[RIGHT_ANKLE]) / 2
    torso = shoulders - hips
    torso_length = float(np.linalg.norm(torso)) + 1e-6
    torso_angle = angle_from(torso, -1.0)  # 0 upright, 90 lying, 180 head down
    thigh_angle = angle_from(knees - hips, 1.0)  # 0 thighs pointing down
    body_angle = angle_from(ankles - xy[NOSE], 1.0)  # 0 head above feet
    seen = xy[visibility > VISIBLE] if (visibility > VISIBLE).sum() >= 4 else xy
    box_width, box_height = seen.max(axis=0) - seen.min(axis=0)
    geometry = [
        torso_angle / 90,
        thigh_angle / 90,
        body_angle / 90,
        np.sin(np.radians(torso_angle)),
        np.log((box_width + 1e-3) / (box_height + 1e-3)),
        (hips[1] - xy[NOSE, 1]) / torso_length,  # > 0: head above the hips in the image
        (hips[1] - shoulders[1]) / torso_length,
        (ankles[1] - hips[1]) / torso_length,  # > 0: ankles below the hips
        box_width,
        box_height,
        hips[1],
        visibility.mean(),
        (visibility > VISIBLE).mean(),
        float(pose.rotation != 0),
        torso_length,
    ]
    skeleton = np.clip((xy - hips) / torso_length, -5.0, 5.0).ravel()
    return np.concatenate([np.asarray(geometry, dtype=np.float32), skeleton, visibility]).astype(np.float32)


class PoseFallConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(
        self,
        feature_size: int = FEATURE_SIZE,
        hidden_size: int = 32,
        dropout: float = 0.3,
        no_pose_probability: float = 0.5,
        rotation_fallback: bool = True,
        **kwargs: Any,
    ) -> None:
        self.feature_size = feature_size
        self.hidden_size = hidden_size
        self.dropout = dropout
        # P(fall) of a frame where no person is found at all, estimated on the training split
        self.no_pose_probability = no_pose_probability
        self.rotation_fallback = rotation_fallback
        super().__init__(**kwargs)


class PoseFallClassifier(PreTrainedModel):
    """Standardised pose features → one fall logit."""

    config_class = PoseFallConfig
    base_model_prefix = "pose_fall"

    def __init__(self, config: PoseFallConfig) -> None:
        super().__init__(config)
        # the training split's feature statistics travel with the weights
        self.feature_mean: torch.Tensor
        self.feature_std: torch.Tensor
        self.register_buffer("feature_mean", torch.zeros(config.feature_size))
        self.register_buffer("feature_std", torch.ones(config.feature_size))
        self.classifier = nn.Sequential(
            nn.Linear(config.feature_size, config.hidden_size),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_size, 1),
        )
        self.post_init()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier((features - self.feature_mean) / self.feature_std).squeeze(-1)


class PoseFallCloudModel:
    """The `CloudModel` interface over BlazePose + `PoseFallClassifier`, judging each clip's key frame."""

    def __init__(self, classifier: PoseFallClassifier, name: str) -> None:
        self.classifier = classifier.eval()
        self.name = name
        self.device = torch.device("cpu")
        self.gpu_indices: list[int] = []
        self.estimator = PoseEstimator(classifier.config.rotation_fallback)

    @classmethod
    def from_pretrained(cls, model_dir: str, revision: str | None = None) -> PoseFallCloudModel:
        return cls(PoseFallClassifier.from_pretrained(model_dir, revision=revision or "main"), name=model_dir)

    def prepare(self, clips: list[Clip]) -> list[Pose | None]:
        """The pose in each clip's newest frame (the frame the edge offloaded): BlazePose, on the CPU."""
        return [self.estimator(clip[-1]) for clip in clips]

    def predict_prepared(self, poses: list[Pose | None]) -> np.ndarray:
        """P(fall) per pose; the classifier's prior for frames in which nobody was found."""
        found = [pose for pose in poses if pose is not None]
        probabilities = np.full(len(poses), self.classifier.config.no_pose_probability, dtype=np.float32)
        if found:
            features = torch.from_numpy(np.stack([pose_features(pose) for pose in found]))
            with torch.inference_mode():
                found_probabilities = torch.sigmoid(self.classifier(features)).numpy()
            probabilities[[i for i, pose in enumerate(poses) if pose is not None]] = found_probabilities
        return probabilities

    def predict(self, clips: list[Clip]) -> np.ndarray:
        """P(fall) per clip, from its newest frame (the frame the edge offloaded)."""
        return self.predict_prepared(self.prepare(clips))


def is_pose_checkpoint(model_id_or_dir: str) -> bool:
    """Whether a local checkpoint directory holds a `PoseFallClassifier` (hub ids are LLaVA checkpoints)."""
    config_file = Path(model_id_or_dir).expanduser() / "config.json"
    return config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == MODEL_TYPE
