"""Where the replay's inputs come from: logged Kafka traffic, a labelled image folder, annotated videos.

Each source yields `ReplayItem`s in a deterministic order: Kafka partition by
partition in offset order, folders in their CSV's row order, videos frame by frame.
A Kafka item carries the cloud verdict logged for its frame when there is one,
so the replay need not pay for the large model twice.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
from aiokafka import TopicPartition

from core.clips import ClipBuffers
from core.images import decode_jpeg_rgb
from core.kafka_io import make_consumer, read_topic_partitions
from core.settings import ConfigError, Settings
from dmd_offline.clips import LABEL_VALUES, read_csv, read_labelled_clips
from producers.decoding import sample_file
from producers.video import SourceError, encode_jpeg
from schemas import Frame, Label, Message, SchemaError, Verdict, decode

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

SPLITS = ("train", "val", "test")
VIDEO_JPEG_QUALITY = 85  # as the producers encode camera frames by default


@dataclass(frozen=True)
class LoggedAnswer:
    """A cloud verdict from the `verdicts` topic: the large model's answer, already paid for."""

    fall_probability: float
    time_ms: float
    energy_j: float | None
    offload_reason: str


@dataclass
class ReplayItem:
    input_id: str
    image_path: str
    group: str
    split: str
    order_key: float
    image_rgb: np.ndarray
    # the clip the large model reads; built only when it has to run (None while a logged answer exists)
    clip: Callable[[], list[np.ndarray]]
    ground_truth: int | None
    logged: LoggedAnswer | None = None


@dataclass
class LogIndex:
    """What the logs say about frames: cloud answers, caregiver labels."""

    cloud: dict[str, LoggedAnswer] = field(default_factory=dict)
    ground_truth: dict[str, int] = field(default_factory=dict)


# --- Kafka ------------------------------------------------------------------------------------
def millis(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


async def read_topic(
    settings: Settings, topic: str, model: type[M], since: datetime | None = None, until: datetime | None = None
) -> AsyncIterator[tuple[str, M]]:
    """Records of `topic` logged in [since, until) (all when None), up to its end when the read starts.

    Partition by partition in offset order, so the order is deterministic and one
    camera's frames (one key, one partition) come oldest first. Undecodable records are
    skipped with a warning: the service that consumed them has already dead-lettered them.
    """
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        partitions = await read_topic_partitions(settings, topic)
        starts = await offsets_at(consumer, partitions, millis(since), await consumer.beginning_offsets(partitions))
        ends = await offsets_at(consumer, partitions, millis(until), await consumer.end_offsets(partitions))
        for partition in partitions:
            if starts[partition] >= ends[partition]:
                continue
            consumer.assign([partition])
            consumer.seek(partition, starts[partition])
            while await consumer.position(partition) < ends[partition]:
                batch = await consumer.getmany(partition, timeout_ms=1000)
                for record in batch.get(partition, []):
                    if record.offset >= ends[partition]:
                        break
                    position = f"kafka://{topic}/{record.partition}/{record.offset}"
                    try:
                        yield position, decode(model, record.value)
                    except SchemaError as exc:
                        log.warning("skipping %s: %s", position, exc)
    finally:
        await consumer.stop()


async def offsets_at(
    consumer, partitions: list[TopicPartition], moment_ms: int | None, default: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """The first offset logged at or after `moment_ms` per partition (`default` when None)."""
    if moment_ms is None:
        return default
    found = await consumer.offsets_for_times({partition: moment_ms for partition in partitions})
    ends = await consumer.end_offsets(partitions)
    return {partition: found[partition].offset if found[partition] else ends[partition] for partition in partitions}


async def read_log_index(settings: Settings) -> LogIndex:
    """Every logged cloud verdict and caregiver label (whole topics: a label may come long after its frame)."""
    index = LogIndex()
    topics = settings.kafka.topics
    async for _, verdict in read_topic(settings, topics.verdicts, Verdict):
        if verdict.source != "cloud":
            continue
        index.cloud[verdict.frame_id] = LoggedAnswer(
            fall_probability=verdict.fall_probability,
            time_ms=verdict.timings_ms.get("model_per_request", float("nan")),
            energy_j=verdict.energy_j,
            offload_reason=verdict.offload_reason or "",
        )
    labels: dict[str, Label] = {}
    async for _, label in read_topic(settings, topics.labels, Label):
        labels[label.label_id] = label  # deduped by id: a repeated click is the same label
    # a later answer on the same frame (a caregiver correcting themselves) wins
    for label in sorted(labels.values(), key=lambda label: label.labelled_at):
        for frame_id in label.frame_ids:
            index.ground_truth[frame_id] = 1 if label.verdict == "true_fall" else 0
    return index


async def kafka_items(
    settings: Settings, index: LogIndex, since: datetime | None, until: datetime | None
) -> AsyncIterator[ReplayItem]:
    """Logged frames with their logged cloud answers and labels; the clip is built as the edge builds it."""
    clips = ClipBuffers(settings.edge.clip_frames, settings.edge.clip_seconds)
    async for position, frame in read_topic(settings, settings.kafka.topics.frames, Frame, since, until):
        image = decode_jpeg_rgb(frame.jpeg)
        if image is None:
            log.warning("skipping %s: JPEG could not be decoded", position)
            continue
        clips.add(frame)
        yield ReplayItem(
            input_id=frame.frame_id,
            image_path=position,
            group=frame.camera_id,
            split="",
            order_key=frame.captured_at.timestamp() * 1000,
            image_rgb=image,
            clip=clip_loader([buffered.jpeg for buffered in clips.clip_ending_at(frame)]),
            ground_truth=index.ground_truth.get(frame.frame_id),
            logged=index.cloud.get(frame.frame_id),
        )


def clip_loader(jpegs: list[bytes]) -> Callable[[], list[np.ndarray]]:
    def load() -> list[np.ndarray]:
        return [image for image in map(decode_jpeg_rgb, jpegs) if image is not None]

    return load


# --- labelled image folder --------------------------------------------------------------------
def image_folder_items(
    folder: Path, limit_per_split: int | None = None, splits: Collection[str] | None = None
) -> Iterator[ReplayItem]:
    """Images listed in `labels.csv` (image,label,split[,…]); `meta.csv` adds `source_group` when present.

    With `limit_per_split`, only the first that many rows of each split (in file order); with `splits`, only
    rows of those splits (the others' images are not opened).
    """
    labels_csv = folder / "labels.csv"
    if not labels_csv.is_file():
        raise ConfigError(f"{labels_csv} not found: an image folder needs labels.csv (image,label,split)")
    rows = read_csv(labels_csv)
    missing_columns = {"image", "label"} - set(rows[0] if rows else {})
    if missing_columns:
        raise ConfigError(f"{labels_csv} lacks the column(s) {sorted(missing_columns)}")
    meta_csv = folder / "meta.csv"
    groups = {row["image"]: row.get("source_group", "") for row in read_csv(meta_csv)} if meta_csv.is_file() else {}
    taken: Counter[str] = Counter()
    for number, row in enumerate(rows):
        split = row.get("split", "") or ""
        if split and split not in SPLITS:
            raise ConfigError(f"{labels_csv} row {number + 2}: split {split!r} is not one of {SPLITS}")
        if row["label"] not in LABEL_VALUES:
            raise ConfigError(
                f"{labels_csv} row {number + 2}: label {row['label']!r} is not one of {list(LABEL_VALUES)}"
            )
        if (splits is not None and split not in splits) or (
            limit_per_split is not None and taken[split] >= limit_per_split
        ):
            continue
        taken[split] += 1
        path = folder / row["image"]
        image = decode_jpeg_rgb(path.read_bytes()) if path.is_file() else None
        if image is None:
            raise ConfigError(f"{labels_csv} row {number + 2}: {path} is missing or not an image")
        yield ReplayItem(
            input_id=row["image"],
            image_path=str(path),
            group=groups.get(row["image"], ""),
            split=split,
            order_key=float(number),
            image_rgb=image,
            clip=single_image_clip(image),  # a still image is a one-frame clip; the cloud model repeats it
            ground_truth=LABEL_VALUES[row["label"]],
        )


def single_image_clip(image: np.ndarray) -> Callable[[], list[np.ndarray]]:
    return lambda: [image]


# --- annotated videos -------------------------------------------------------------------------
def video_folder_items(folder: Path, fps: float, clip_frames: int, clip_seconds: float) -> Iterator[ReplayItem]:
    """Videos listed in `clips.csv` (file,label,fall_start_s[,split]) sampled at `fps`, as a camera would be.

    A frame's ground truth is a fall from `fall_start_s` on in a `fall` video, no fall
    otherwise. Frames go through JPEG like camera frames, and each frame's clip is the
    video's preceding frames within `clip_seconds` (at most `clip_frames`), as the edge builds it.
    """
    for number, clip in enumerate(read_labelled_clips(folder)):
        fall_start_s = clip.fall_start_s or 0.0
        recent: deque[tuple[float, np.ndarray]] = deque(maxlen=clip_frames)
        try:
            sampled = list(sample_file(str(folder / clip.file), fps))
        except SourceError as exc:
            raise ConfigError(f"{folder / 'clips.csv'} row {number + 2}: {exc}") from None
        for index, frame in enumerate(sampled):
            image = decode_jpeg_rgb(encode_jpeg(frame.picture, VIDEO_JPEG_QUALITY))
            assert image is not None  # we just encoded it
            recent.append((frame.position_s, image))
            frames = [img for t, img in recent if t >= frame.position_s - clip_seconds]
            yield ReplayItem(
                input_id=f"{clip.file}#{index}",
                image_path=f"{folder / clip.file}#t={frame.position_s:.3f}",
                group=clip.file,
                split=clip.split,
                order_key=float(number * 1_000_000 + index),
                image_rgb=image,
                clip=partial(list, frames),
                ground_truth=int(clip.is_fall and frame.position_s >= fall_start_s),
            )


# --- augmented copies -------------------------------------------------------------------------
AUGMENTED_SPLITS = ("train", "val")  # the switcher's learning rows; test rows stay as they are


def augment_image(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mirrored, cropped (80–100 % of each side) and re-lit copy at the same size: the same scene, another view."""
    height, width = image.shape[:2]
    crop_h, crop_w = (max(1, round(side * rng.uniform(0.8, 1.0))) for side in (height, width))
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    copy = cv2.resize(image[top : top + crop_h, left : left + crop_w], (width, height), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        copy = copy[:, ::-1]
    gain, offset = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
    return np.ascontiguousarray(np.clip(copy.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8))


def with_augmented_copies(items: Iterator[ReplayItem], copies: int, seed: int) -> Iterator[ReplayItem]:
    """Each still image and, for rows of a learning split, `copies` augmented copies (`dmd.augment`): both models
    answer every copy, so the switcher gets more rows without more labels. A copy keeps its original's group and
    split (a video folder gets more rows from `dmd.video_fps` instead: every frame, at up to 30 fps)."""
    rng = np.random.default_rng(seed)
    for item in items:
        yield item
        if item.split not in AUGMENTED_SPLITS:
            continue
        for number in range(1, copies + 1):
            image = augment_image(item.image_rgb, rng)
            suffix = f"#aug{number}"
            yield replace(
                item,
                input_id=item.input_id + suffix,
                image_path=item.image_path + suffix,
                image_rgb=image,
                clip=single_image_clip(image),
            )
