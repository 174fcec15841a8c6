"""A folder of labelled clips: `clips.csv` with `file,label,fall_start_s` (and optionally `split`, `room`).

Read by the DMD replay of annotated videos, by `fallwatch eval` and by the demo's per-clip summary.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from core.settings import ConfigError

LABEL_VALUES = {"fall": 1, "no_fall": 0, "1": 1, "0": 0}
CLIPS_CSV = "clips.csv"


@dataclass(frozen=True)
class LabelledClip:
    file: str
    is_fall: bool
    fall_start_s: float | None  # None for a clip without a fall
    split: str = ""
    room: str = ""


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def read_labelled_clips(folder: Path) -> list[LabelledClip]:
    """The rows of `folder/clips.csv` in file order; a mistake in it is one readable ConfigError."""
    clips_csv = folder / CLIPS_CSV
    if not clips_csv.is_file():
        raise ConfigError(f"{clips_csv} not found: a clip folder needs clips.csv (file,label,fall_start_s)")
    clips = []
    for number, row in enumerate(read_csv(clips_csv), start=2):
        label = row.get("label")
        if label not in LABEL_VALUES:
            raise ConfigError(f"{clips_csv} row {number}: label {label!r} is not one of {list(LABEL_VALUES)}")
        is_fall = LABEL_VALUES[label] == 1
        start = (row.get("fall_start_s") or "").strip()
        try:
            fall_start_s = float(start) if start else None
        except ValueError:
            raise ConfigError(f"{clips_csv} row {number}: fall_start_s {start!r} is not a number") from None
        if is_fall and fall_start_s is None:
            raise ConfigError(f"{clips_csv} row {number}: a fall clip needs its fall_start_s")
        if not row.get("file"):
            raise ConfigError(f"{clips_csv} row {number}: no file name")
        clips.append(
            LabelledClip(
                file=row["file"],
                is_fall=is_fall,
                fall_start_s=fall_start_s if is_fall else None,
                split=row.get("split") or "",
                room=row.get("room") or "",
            )
        )
    return clips
