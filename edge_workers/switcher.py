"""The DMD switcher (paper A.3) and its versioned artifact.

The switcher reads the edge model's hidden vector (the paper's `hidden` inputs), or that
vector and the edge's own confidence in its answer (`hidden+confidence`: P(fall), its margin
|2p − 1| and its entropy in bits), and predicts the probability that the large model would
give the same fall answer. The confidence inputs let a switcher fall back on what uncertainty
deferral knows where the hidden vector says little (a room the edge never saw).
`hidden+confidence+history` also reads the edge's P(fall) on the camera's last `history` frames
(`history_by_camera`, the one function the offline rows and the live worker both use): a fall is
a change, and one frame does not show it. A published switcher is a directory
`<registry>/<version>/` holding `switcher.safetensors` (weights) and `switcher.json`
(`SwitcherMetadata`); versions are UTC timestamps, so the newest sorts last.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from core.checkpoints import fsync_path, local_checkpoint_sha256

WEIGHTS_FILE = "switcher.safetensors"
METADATA_FILE = "switcher.json"
VERSION_FORMAT = "%Y%m%dT%H%M%S%fZ"
# A version is a directory name: no separators, no leading dot (those are in-progress writes).
VERSION_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$"
DROPOUT = 0.3
SwitcherInputs = Literal["hidden", "hidden+confidence", "hidden+confidence+history", "confidence"]
CONFIDENCE_FEATURES = 3  # P(fall), margin, entropy


def history_length(inputs: SwitcherInputs, history: int) -> int:
    """How many earlier probabilities the switcher reads: `history` for the history inputs, else none."""
    return history if inputs == "hidden+confidence+history" else 0


def input_size(inputs: SwitcherInputs, hidden_size: int, history: int = 0) -> int:
    """The switcher's input width for an edge model of `hidden_size` (`confidence` checks the hidden vector's
    width and reads only P(fall))."""
    confidence = CONFIDENCE_FEATURES if inputs in ("hidden+confidence", "hidden+confidence+history") else 0
    return hidden_size + confidence + history_length(inputs, history)


def history_by_camera(
    probabilities: np.ndarray,
    cameras: Sequence[str],
    order: np.ndarray,
    k: int,
    earlier: Mapping[str, Sequence[float]] | None = None,
) -> np.ndarray:
    """[N] edge P(fall) → [N, k]: for each frame, its camera's k previous probabilities, the latest first.

    Frames are put in `order` (capture time) within each camera; `earlier` holds each camera's
    probabilities before these (oldest first: the live worker's previous batches). Where fewer than k
    came before, the frame's own probability fills in, as a camera that did not change.
    """
    p = np.asarray(probabilities, dtype=np.float32)
    rows = np.empty((len(p), k), dtype=np.float32)
    camera_of = np.asarray(cameras, dtype=object)
    for camera in dict.fromkeys(cameras):
        indices = np.flatnonzero(camera_of == camera)
        indices = indices[np.argsort(np.asarray(order)[indices], kind="stable")]
        before = np.asarray((earlier or {}).get(camera, ()), dtype=np.float32)
        sequence = np.concatenate([before, p[indices]])
        positions = len(before) + np.arange(len(indices))[:, None] - np.arange(1, k + 1)[None, :]
        rows[indices] = np.where(positions >= 0, sequence[np.maximum(positions, 0)], p[indices][:, None])
    return rows


def confidence_features(fall_probability: np.ndarray) -> np.ndarray:
    """[B] P(fall) → [B, 3]: P(fall), margin |2p − 1| and binary entropy in bits."""
    p = np.clip(np.asarray(fall_probability, dtype=np.float64), 1e-7, 1 - 1e-7)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.stack([p, np.abs(2 * p - 1), entropy], axis=1).astype(np.float32)


class CameraHistory:
    """The live side of `history_by_camera`: each camera's last edge probabilities, across batches."""

    def __init__(self) -> None:
        self.recent: dict[str, deque[float]] = {}

    def rows(self, cameras: Sequence[str], probabilities: np.ndarray, k: int) -> np.ndarray:
        """[B, k] for a batch in arrival order (a camera's frames arrive in order: one partition each)."""
        rows = history_by_camera(probabilities, cameras, np.arange(len(cameras)), k, self.recent)
        if k:
            for camera, probability in zip(cameras, probabilities.tolist(), strict=True):
                self.recent.setdefault(camera, deque(maxlen=k)).append(probability)
        return rows

    def clear(self) -> None:
        """A new version: its edge model's probabilities are not the old one's."""
        self.recent.clear()

    def forget(self, camera_id: str) -> None:
        """A camera another worker answers now."""
        self.recent.pop(camera_id, None)


class Switcher(nn.Module):
    """MLP inputs → 512 → 128 → 1 with ReLU and dropout 0.3; outputs the agreement logit (no layers for
    `confidence`)."""

    def __init__(self, input_dim: int, inputs: SwitcherInputs = "hidden", history: int = 0) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.inputs: SwitcherInputs = inputs
        self.history = history_length(inputs, history)  # earlier probabilities of the camera it reads
        self.hidden_size = input_dim - input_size(inputs, 0, history)
        if inputs == "confidence":
            self.layers = nn.Sequential()
            return
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 512),
            nn.ReLU(),
            nn.Dropout(DROPOUT),
            nn.Linear(512, 128),
            nn.ReLU(),
            nn.Dropout(DROPOUT),
            nn.Linear(128, 1),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of agreement, shape [B]."""
        return self.layers(hidden).squeeze(-1)

    def check_hidden(self, hidden: np.ndarray) -> None:
        if hidden.ndim != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"switcher expects hidden vectors of shape [B, {self.hidden_size}], got {hidden.shape}")

    def features(
        self, hidden: np.ndarray, fall_probability: np.ndarray | None, history: np.ndarray | None = None
    ) -> np.ndarray:
        """The switcher's input rows [B, input_dim] from the edge's hidden vectors [B, D], P(fall) [B] and
        the camera's earlier P(fall) [B, history] (`history_by_camera`)."""
        self.check_hidden(hidden)
        if self.inputs == "hidden":
            return hidden
        if fall_probability is None:
            raise ValueError(f"a {self.inputs} switcher needs the edge's fall probabilities too")
        parts = [hidden, confidence_features(fall_probability)]
        if self.history:
            if history is None or history.shape != (len(hidden), self.history):
                got = None if history is None else history.shape
                raise ValueError(
                    f"switcher expects the camera's last {self.history} probabilities per frame, got {got}"
                )
            parts.append(history.astype(np.float32))
        return np.concatenate(parts, axis=1)

    def agreement_probability(
        self, hidden: np.ndarray, fall_probability: np.ndarray | None = None, history: np.ndarray | None = None
    ) -> np.ndarray:
        """P(the large model agrees with the edge model) for a batch of hidden vectors [B, D] → [B] float32.

        `fall_probability` ([B], the edge's P(fall)) is needed by a `hidden+confidence` switcher, and
        `history` ([B, self.history]) by one that reads the camera's history.
        """
        if self.inputs == "confidence":
            self.check_hidden(hidden)
            if fall_probability is None:
                raise ValueError("a confidence switcher needs the edge's fall probabilities")
            return confidence_features(fall_probability)[:, 1]  # the margin |2p − 1|
        rows = self.features(hidden, fall_probability, history)
        was_training = self.training
        self.eval()  # dropout off
        try:
            device = next(self.parameters()).device
            with torch.inference_mode():
                logits = self(torch.as_tensor(rows, dtype=torch.float32, device=device))
            return torch.sigmoid(logits).cpu().numpy().astype(np.float32)
        finally:
            self.train(was_training)


class SwitcherMetadata(BaseModel):
    """What a published switcher is, what it belongs to and how it was made (`switcher.json`)."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=VERSION_PATTERN)
    input_dim: int = Field(gt=0)
    inputs: SwitcherInputs = Field(
        "hidden", description="hidden vector only (the paper's), with confidence, or also with the camera's history"
    )
    history: int = Field(0, ge=0, description="how many of the camera's earlier edge probabilities it reads")
    threshold: float = Field(
        ge=0.0, le=1.0, description="agreement probability at or above which the edge answer is final"
    )
    edge_model: str = Field(description="hub id or local directory of the edge model it was trained on")
    edge_model_revision: str | None = None
    edge_model_sha256: str | None = Field(
        None, description="of the edge model's local directory: it matches that model wherever it is mounted"
    )
    created_at: datetime
    trained: bool = Field(description="False for a randomly initialised switcher")
    training_window: str | None = Field(default=None, description="which traffic or data set it learnt from")
    offload_policy: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)


class SwitcherMismatch(Exception):
    """A switcher was trained for another edge model than the one it is asked to serve."""


def new_version() -> str:
    """A version name that sorts by creation time: UTC `YYYYMMDDTHHMMSSffffffZ`."""
    return datetime.now(UTC).strftime(VERSION_FORMAT)


def _write_durably(path: Path, write: Callable[[Path], object]) -> None:
    """Write a file and flush it to disk before it is renamed into view."""
    write(path)
    fsync_path(path)


def save_switcher(registry: Path, switcher: Switcher, metadata: SwitcherMetadata) -> Path:
    """Publish `<registry>/<metadata.version>/` atomically; returns that directory.

    Files are written into a hidden temporary directory that is renamed into place, so
    a watcher sees either no artifact or the whole of it.
    """
    if switcher.input_dim != metadata.input_dim:
        raise ValueError(f"switcher input_dim {switcher.input_dim} != metadata input_dim {metadata.input_dim}")
    # the hash of the directory the switcher names now, whatever a copied metadata carried
    edge_sha256 = local_checkpoint_sha256(metadata.edge_model)
    if edge_sha256 is not None:
        metadata = metadata.model_copy(update={"edge_model_sha256": edge_sha256})
    registry.mkdir(parents=True, exist_ok=True)
    final = registry / metadata.version
    if final.exists():
        raise FileExistsError(f"switcher version {metadata.version} already exists in {registry}")
    staging = registry / f".{metadata.version}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in switcher.state_dict().items()}
        _write_durably(staging / WEIGHTS_FILE, lambda path: save_file(state, str(path)))
        _write_durably(staging / METADATA_FILE, lambda path: path.write_text(metadata.model_dump_json(indent=2)))
        # rename(2) of a directory is atomic and fails if `final` appeared meanwhile (non-empty).
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def load_switcher(path: Path) -> tuple[Switcher, SwitcherMetadata]:
    """Load a published switcher directory; the switcher is in eval mode."""
    metadata = SwitcherMetadata.model_validate_json((path / METADATA_FILE).read_text())
    switcher = Switcher(metadata.input_dim, metadata.inputs, metadata.history)
    switcher.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    switcher.eval()
    return switcher, metadata


def latest_version(registry: Path) -> Path | None:
    """The newest complete artifact in `registry` (greatest version name), or None."""
    if not registry.is_dir():
        return None
    versions = [
        entry
        for entry in registry.iterdir()
        if entry.is_dir() and re.match(VERSION_PATTERN, entry.name) and (entry / METADATA_FILE).is_file()
    ]
    return max(versions, key=lambda entry: entry.name, default=None)


def check_compatible(
    metadata: SwitcherMetadata, edge_model_name: str, hidden_size: int, edge_model_sha256: str | None = None
) -> None:
    """Raise `SwitcherMismatch` unless the switcher was made for this edge model and hidden size.

    The model is the same when its local directory has the same content hash (a registry mounted at
    another path), else when its name is.
    """
    problems = []
    expected = input_size(metadata.inputs, hidden_size, metadata.history)
    if metadata.input_dim != expected:
        what = "hidden vectors" if metadata.inputs == "hidden" else f"{metadata.inputs} inputs"
        problems.append(f"it reads {metadata.input_dim}-d {what} but the edge model gives {expected}-d")
    if metadata.edge_model_sha256 is not None and edge_model_sha256 is not None:
        if metadata.edge_model_sha256 != edge_model_sha256:
            problems.append(f"it was made for another edge model (content hash) than {edge_model_name!r}")
    elif metadata.edge_model != edge_model_name:
        problems.append(f"it was made for edge model {metadata.edge_model!r}, not {edge_model_name!r}")
    if problems:
        raise SwitcherMismatch(f"switcher {metadata.version} does not fit: " + "; ".join(problems))


def create_untrained_switcher(
    registry: Path,
    input_dim: int,
    edge_model: str,
    threshold: float = 0.5,
    seed: int = 0,
    edge_model_revision: str | None = None,
) -> Path:
    """Publish a seeded, randomly initialised switcher (trained=False) so a pipeline can run before DMD."""
    # fork_rng: seeding here must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        switcher = Switcher(input_dim)
    metadata = SwitcherMetadata(
        version=new_version(),
        input_dim=input_dim,
        threshold=threshold,
        edge_model=edge_model,
        edge_model_revision=edge_model_revision,
        created_at=datetime.now(UTC),
        trained=False,
        training_window=None,
        offload_policy={},
        metrics={},
    )
    return save_switcher(registry, switcher, metadata)
