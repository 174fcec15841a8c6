"""Where a person is in a frame: MediaPipe BlazePose, whose weights ship inside the `mediapipe` wheel.

Two users: the pose cloud model (`cloud_workers.pose`) turns the landmarks into fall features, and the
edge worker locates the person of a fall frame for a camera's no-alert zones (`locate_person`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from core.settings import ConfigError

MEDIAPIPE_INSTALL = "pip install --no-deps mediapipe==0.10.14"

# BlazePose landmark ids (https://ai.google.dev/edge/mediapipe/solutions/vision/pose_landmarker)
NOSE, LEFT_SHOULDER, RIGHT_SHOULDER, LEFT_HIP, RIGHT_HIP = 0, 11, 12, 23, 24
LEFT_KNEE, RIGHT_KNEE, LEFT_ANKLE, RIGHT_ANKLE = 25, 26, 27, 28
LANDMARKS = 33
# Landmark order after a horizontal flip: every left landmark swaps with its right twin.
# fmt: off
MIRRORED = [0, 4, 5, 6, 1, 2, 3, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15, 18, 17, 20, 19, 22, 21,
            24, 23, 26, 25, 28, 27, 30, 29, 32, 31]
# fmt: on
VISIBLE = 0.5
# A person lying across the image is often missed upright: try the frame turned both ways.
ROTATIONS = {90: cv2.ROTATE_90_CLOCKWISE, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}


@dataclass(frozen=True)
class Pose:
    """33 landmarks (x, y in [0, 1] of the original image, z, visibility) and how they were found."""

    landmarks: np.ndarray  # [33, 4] float32
    image_height: int
    image_width: int
    rotation: int  # 0, 90 or 270: the turn of the frame in which the person was found

    def mirrored(self) -> Pose:
        """The same pose in the horizontally flipped image (a training augmentation)."""
        landmarks = self.landmarks[MIRRORED].copy()
        landmarks[:, 0] = 1.0 - landmarks[:, 0]
        return Pose(landmarks, self.image_height, self.image_width, self.rotation)


def unrotate(xy: np.ndarray, rotation: int) -> np.ndarray:
    """Normalised coordinates found in the turned frame, back in the original frame's."""
    x, y = xy[:, 0], xy[:, 1]
    if rotation == 90:  # turned clockwise: (x', y') = (1 - y, x)
        return np.stack([y, 1.0 - x], axis=1)
    if rotation == 270:
        return np.stack([1.0 - y, x], axis=1)
    return xy


class PoseEstimator:
    """MediaPipe BlazePose (full) on single images; the model ships inside the mediapipe wheel."""

    def __init__(self, rotation_fallback: bool = True, min_detection_confidence: float = 0.5) -> None:
        try:
            from mediapipe.python.solutions.pose import Pose as MediaPipePose
        except ImportError:
            raise ConfigError(f"BlazePose needs MediaPipe: {MEDIAPIPE_INSTALL}") from None
        # MediaPipe 0.10.14 calls a protobuf API that protobuf 4 marks deprecated; not ours to act on
        warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype", category=UserWarning)
        # static_image_mode: every frame is detected afresh (no tracking state shared between cameras)
        self.pose = MediaPipePose(
            static_image_mode=True, model_complexity=1, min_detection_confidence=min_detection_confidence
        )
        self.rotations = [0, *ROTATIONS] if rotation_fallback else [0]

    def __call__(self, rgb: np.ndarray) -> Pose | None:
        height, width = rgb.shape[:2]
        for rotation in self.rotations:
            turned = rgb if rotation == 0 else np.ascontiguousarray(cv2.rotate(rgb, ROTATIONS[rotation]))
            found = self.pose.process(turned).pose_landmarks
            if found is not None:
                landmarks = np.array([[p.x, p.y, p.z, p.visibility] for p in found.landmark], dtype=np.float32)
                landmarks[:, :2] = unrotate(landmarks[:, :2], rotation)
                return Pose(landmarks, height, width, rotation)
        return None

    def close(self) -> None:
        self.pose.close()


def person_location(pose: Pose) -> tuple[float, float]:
    """The person's place in the frame (normalised x, y): the hip centre, or the centroid of the
    visible landmarks when a hip is hidden (a person under a blanket)."""
    hips = pose.landmarks[[LEFT_HIP, RIGHT_HIP]]
    if (hips[:, 3] >= VISIBLE).all():
        x, y = hips[:, :2].mean(axis=0)
    else:
        visible = pose.landmarks[pose.landmarks[:, 3] >= VISIBLE]
        x, y = (visible if len(visible) else pose.landmarks)[:, :2].mean(axis=0)
    return float(np.clip(x, 0.0, 1.0)), float(np.clip(y, 0.0, 1.0))


def inside_any(point: tuple[float, float], polygons: Sequence[Sequence[tuple[float, float]]]) -> bool:
    """Whether the normalised point lies inside (or on the edge of) one of the polygons."""
    return any(
        cv2.pointPolygonTest(np.array(polygon, dtype=np.float32).reshape(-1, 1, 2), point, False) >= 0
        for polygon in polygons
    )
