"""The DMD data set on disk: NPZ shards, resumable, plus the paper's JSON export.

A data set is a directory:

- `manifest.json` — what the rows came from (source, edge and cloud models, hidden size);
- `shard-00000.npz`, `shard-00001.npz`, … — each holds `hidden` [n, D] float32 and
  `rows`, the JSON of n `DmdRow`s (a unicode array: no pickle needed to read it back).

A shard is written to a hidden temporary file and renamed into place, so after an
interruption every visible shard is whole; a resumed replay skips the inputs those
shards already hold (`done_input_ids`) and appends new shards after them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict

from core.settings import ConfigError

if TYPE_CHECKING:  # the data set reads without torch
    from edge_workers.switcher import Switcher

MANIFEST_FILE = "manifest.json"
SHARD_PATTERN = "shard-*.npz"
UNKNOWN = -1  # ground truth or split not known for a row


class DatasetManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str  # e.g. "kafka frames topic …" or "image folder /path"
    edge_model: str
    edge_model_revision: str | None = None
    # what the edge model's local directory held at the replay (None: a hub id, or a set made before this)
    edge_model_sha256: str | None = None
    cloud_model: str
    hidden_size: int


@dataclass(frozen=True)
class DmdRow:
    """One input run through both models (paper A.2), without its hidden vector."""

    input_id: str  # frame id (Kafka) or the image's path relative to its folder
    image_path: str  # kafka://topic/partition/offset or the image file
    group: str  # camera id (Kafka) or the image's source group: rows of a group are related
    split: str  # "train", "val", "test" or "" when the source has none (assigned later)
    order_key: float  # capture time in ms (Kafka) or row number: the chronological order
    small_fall_probability: float
    large_fall_probability: float
    small_prediction: int
    large_prediction: int
    label: int  # 1 when the two models' fall predictions agree (the switcher's target)
    ground_truth: int  # 1 fall, 0 no fall, UNKNOWN
    large_source: str  # "logged" (a cloud verdict from the logs) or "computed" (run by the replay)
    offload_reason: str  # why the edge offloaded it when logged: "switcher", "exploration"; "" otherwise
    small_time_ms: float  # measured per-frame edge-model time
    large_time_ms: float  # measured per-frame cloud-model time (from the log when logged)
    small_energy_j: float  # measured per-frame edge energy (RAPL), NaN when not measured
    large_energy_j: float  # measured per-frame cloud energy (NVML, or logged), NaN when not measured


@dataclass(frozen=True)
class DmdData:
    """A whole data set in memory: rows and their hidden vectors, in replay order."""

    manifest: DatasetManifest
    rows: list[DmdRow]
    hidden: np.ndarray  # [N, D] float32
    # [N, k]: the edge's P(fall) on each row's k previous frames of its group (`with_history`), kept
    # through selections so that a subset's rows keep the history of the rows left out
    history: np.ndarray | None = None

    def column(self, name: str) -> np.ndarray:
        return np.array([getattr(row, name) for row in self.rows])

    def select(self, mask: np.ndarray) -> DmdData:
        indices = np.flatnonzero(mask)
        history = None if self.history is None else self.history[indices]
        return DmdData(self.manifest, [self.rows[i] for i in indices], self.hidden[indices], history)

    def split(self, name: str) -> DmdData:
        return self.select(self.column("split") == name)


def write_manifest(directory: Path, manifest: DatasetManifest) -> None:
    """Create the data set directory, or check that a resumed one was made with the same models."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST_FILE
    if path.is_file():
        existing = DatasetManifest.model_validate_json(path.read_text())
        if existing.edge_model_sha256 is None:  # a set from before the hash was kept: its names decide
            existing = existing.model_copy(update={"edge_model_sha256": manifest.edge_model_sha256})
        if existing != manifest:
            changed = " (the edge model's files changed since)" if existing.edge_model == manifest.edge_model else ""
            raise ConfigError(
                f"{directory} holds a DMD data set made from other inputs or models ({existing.source}, "
                f"{existing.edge_model} / {existing.cloud_model}){changed}; choose another directory or delete it"
            )
        return
    path.write_text(manifest.model_dump_json(indent=2))


def shard_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob(SHARD_PATTERN))


def read_shard(path: Path) -> tuple[list[DmdRow], np.ndarray]:
    with np.load(path, allow_pickle=False) as shard:
        rows = [DmdRow(**row) for row in json.loads(str(shard["rows"]))]
        return rows, shard["hidden"].astype(np.float32)


def done_input_ids(directory: Path) -> set[str]:
    """Inputs already replayed into `directory` (for resuming)."""
    done: set[str] = set()
    for path in shard_paths(directory):
        rows, _ = read_shard(path)
        done.update(row.input_id for row in rows)
    return done


def write_shard(directory: Path, rows: list[DmdRow], hidden: np.ndarray) -> Path:
    """Append one shard atomically (write a hidden file, fsync, rename)."""
    if len(rows) != len(hidden):
        raise ValueError(f"{len(rows)} rows but {len(hidden)} hidden vectors")
    existing = shard_paths(directory)
    index = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
    final = directory / f"shard-{index:05d}.npz"
    staging = directory / f".{final.name}.tmp.npz"
    with staging.open("wb") as handle:
        np.savez(handle, hidden=hidden.astype(np.float32), rows=np.array(json.dumps([asdict(r) for r in rows])))
        handle.flush()
        os.fsync(handle.fileno())
    staging.rename(final)
    return final


def load_dataset(directory: Path) -> DmdData:
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ConfigError(f"no DMD data set in {directory}: run `fallwatch dmd replay` first")
    manifest = DatasetManifest.model_validate_json(manifest_path.read_text())
    rows: list[DmdRow] = []
    hidden: list[np.ndarray] = []
    for path in shard_paths(directory):
        shard_rows, shard_hidden = read_shard(path)
        rows.extend(shard_rows)
        hidden.append(shard_hidden)
    if not rows:
        raise ConfigError(f"the DMD data set in {directory} has no rows yet: run `fallwatch dmd replay`")
    return DmdData(manifest, rows, np.concatenate(hidden))


def export_paper_json(data: DmdData, path: Path) -> Path:
    """The paper's form: a JSON list of `{image_path, last_hidden_layer, label}` (streamed, not built in memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as sink:
        sink.write("[\n")
        for index, (row, hidden) in enumerate(zip(data.rows, data.hidden, strict=True)):
            record = {"image_path": row.image_path, "last_hidden_layer": hidden.tolist(), "label": row.label}
            sink.write(("," if index else "") + json.dumps(record) + "\n")
        sink.write("]\n")
    return path


def assign_missing_splits(data: DmdData, val_share: float, test_share: float) -> DmdData:
    """Give rows without a split one, chronologically: the oldest train, then val, the newest test.

    Logged traffic has no split; neighbouring frames of one camera are near copies, so a
    random split would leak the test set into training. Training on the past and testing
    on the future is also how a retrained switcher is used.
    """
    missing = [index for index, row in enumerate(data.rows) if not row.split]
    if not missing:
        return data
    ordered = sorted(missing, key=lambda index: (data.rows[index].order_key, data.rows[index].input_id))
    n = len(ordered)
    n_test = round(n * test_share)
    n_val = round(n * val_share)
    n_train = n - n_val - n_test
    splits = {index: "train" for index in ordered[:n_train]}
    splits.update({index: "val" for index in ordered[n_train : n_train + n_val]})
    splits.update({index: "test" for index in ordered[n_train + n_val :]})
    rows = [
        DmdRow(**{**asdict(row), "split": splits[index]}) if index in splits else row
        for index, row in enumerate(data.rows)
    ]
    return replace(data, rows=rows)


def switcher_splits_from_val(data: DmdData, val_share: float, seed: int) -> DmdData:
    """Let the switcher learn from the validation split when the model pair learnt from the train split.

    On the images it was trained on, a model is right almost always, so the two models'
    disagreements there say little about unseen inputs. The pair's train rows are dropped,
    a seeded random `val_share` of the val rows is kept for early stopping, the rest become
    the switcher's train rows; the test split stays as it is.
    """
    held_out = np.random.default_rng(seed).random(len(data.rows)) < val_share
    splits = {"train": None, "val": "train", "test": "test"}
    rows = []
    kept = []
    for index, row in enumerate(data.rows):
        split = splits[row.split]
        if split is None:
            continue
        if split == "train" and held_out[index]:
            split = "val"
        rows.append(DmdRow(**{**asdict(row), "split": split}))
        kept.append(index)
    return DmdData(data.manifest, rows, data.hidden[kept], None if data.history is None else data.history[kept])


def edge_history(data: DmdData, k: int) -> np.ndarray | None:
    """Each row's group's k previous edge probabilities in frame order (`history_by_camera`), None for k = 0:
    the data's own (`with_history`) where it has k, else from the rows present."""
    from edge_workers.switcher import history_by_camera

    if k == 0:
        return None
    if data.history is not None and data.history.shape[1] == k:
        return data.history
    probabilities = data.column("small_fall_probability").astype(np.float32)
    return history_by_camera(probabilities, data.column("group").tolist(), data.column("order_key"), k)


def with_history(data: DmdData, k: int) -> DmdData:
    """The data with its rows' history: the one it holds (read where rows were left out) where it has k,
    else computed on all of it, before a split leaves rows out."""
    return replace(data, history=edge_history(data, k))


def agreement_scores(switcher: Switcher, data: DmdData) -> np.ndarray:
    """The switcher's predicted agreement for every row (with the edge's P(fall) where it reads confidence)."""
    probabilities = data.column("small_fall_probability").astype(np.float32)
    return switcher.agreement_probability(data.hidden, probabilities, edge_history(data, switcher.history))
