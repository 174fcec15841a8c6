"""Both models' outputs on a folder of labelled clips, sampled as the cameras sample, cached on disk.

Each clip is sampled as a producer samples a camera: `producers.decoding.sample_file` at the
camera fps by the video's own timestamps, `producers.motion.MotionGate` (motion, or a heartbeat),
the camera's resize and JPEG; the published JPEG is decoded as the edge worker decodes it. The
edge model answers every published frame; the cloud model answers, for every published frame, the
clip the edge worker would send with it if it offloaded that frame (`ClipBuffers`:
`edge.clip_frames` within `edge.clip_seconds`). Which frames a policy offloads is decided later
(`dmd_offline.event_replay`), so every policy and rule is re-scored from these outputs alone.

Outputs are cached per clip and model under `eval.cache_dir`, keyed by everything that determines
them: the clip file's content, the sampling settings and the source of the sampling code, the
model's settings, the content of its checkpoint files and the source of its wrapper (and, for the
cloud, the clip settings). A cached run loads no model and decodes no video.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from cloud_workers.energy import CostMeter, open_energy_meter
from core.clips import ClipBuffers
from core.images import decode_jpeg_rgb
from core.settings import ConfigError, Settings
from dmd_offline.clips import LabelledClip
from producers.decoding import sample_file
from producers.motion import MotionGate
from producers.video import SourceError, encode_jpeg
from schemas import Frame

if TYPE_CHECKING:  # the model wrappers (and transformers) are imported only when a model has to run
    from cloud_workers.model import CloudModel
    from edge_workers.model import EdgeModel

log = logging.getLogger(__name__)

# Every clip's camera starts here: capture time = CLIP_START + the frame's timestamp in the video.
CLIP_START = datetime(2026, 1, 1, tzinfo=UTC)
# ViLT samples image patches at random: seeded per batch, as the DMD replay does, so reruns match.
EDGE_SEED = 0
CACHE_FORMAT = 1


@dataclass(frozen=True)
class ClipOutputs:
    """One clip as a camera: its published frames and both models' answers for each."""

    clip: LabelledClip
    camera_id: str
    room: str
    duration_s: float  # the video's sampled span: the last sampled frame's timestamp plus one interval
    position_s: np.ndarray  # [F] float64, timestamps in the video of the published frames
    heartbeat: np.ndarray  # [F] bool, published by the heartbeat rather than motion
    edge_p: np.ndarray  # [F] float32
    hidden: np.ndarray  # [F, D] float32, the switcher's input
    edge_ms: np.ndarray  # [F] float32, edge model time per frame (its batch's, shared)
    edge_j: np.ndarray  # [F] float32, NaN where no energy meter was readable
    cloud_p: np.ndarray  # [F] float32, the cloud model's P(fall) on the clip ending at each frame
    cloud_ms: np.ndarray  # [F] float32
    cloud_j: np.ndarray  # [F] float32

    @classmethod
    def of(
        cls, clip: LabelledClip, camera_id: str, room: str, edge: dict[str, np.ndarray], cloud: dict[str, np.ndarray]
    ) -> ClipOutputs:
        """From the cached (or just computed) arrays of both models."""
        return cls(
            clip=clip,
            camera_id=camera_id,
            room=room,
            duration_s=float(edge["duration_s"]),
            position_s=edge["position_s"],
            heartbeat=edge["heartbeat"],
            edge_p=edge["edge_p"],
            hidden=edge["hidden"],
            edge_ms=edge["edge_ms"],
            edge_j=edge["edge_j"],
            cloud_p=cloud["cloud_p"],
            cloud_ms=cloud["cloud_ms"],
            cloud_j=cloud["cloud_j"],
        )

    @property
    def frames(self) -> int:
        return len(self.position_s)

    def captured_at(self, index: int) -> datetime:
        return CLIP_START + timedelta(seconds=float(self.position_s[index]))

    def frame_id(self, index: int) -> str:
        return Frame.make_id(self.camera_id, self.captured_at(index), index)

    def fall_truth(self) -> np.ndarray:
        """Per frame: a fall is under way or over (ground truth of the frame-level scores)."""
        if self.clip.fall_start_s is None:
            return np.zeros(self.frames, dtype=bool)
        return self.position_s >= self.clip.fall_start_s


@dataclass
class CacheStats:
    clips: int = 0
    frames: int = 0
    edge_computed: int = 0  # frames the edge model answered in this run
    cloud_computed: int = 0  # clips the cloud model answered in this run
    edge_cached: int = 0
    cloud_cached: int = 0
    seconds: float = 0.0


@dataclass
class FileHashes:
    """sha256 of files, remembered by path, size and modification time so a rerun does not read weights again."""

    path: Path
    known: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> FileHashes:
        return cls(path, json.loads(path.read_text()) if path.is_file() else {})

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        name = str(file.resolve())
        entry = self.known.get(name)
        if entry is not None and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            return str(entry["sha256"])
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        self.known[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
        return digest.hexdigest()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.known, indent=1))


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def source_digest(*modules: str) -> str:
    """The source code of the modules that compute an output (read, not imported): a change to it
    invalidates the cached outputs."""
    sources = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        sources.append(Path(spec.origin).read_text())
    return digest(sources)


def checkpoint_digest(model_id: str, hashes: FileHashes) -> str:
    """A local checkpoint by the content of its files; a hub id by its name (revision is keyed apart)."""
    directory = Path(model_id).expanduser()
    if not directory.is_dir():
        return f"hub:{model_id}"
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    return digest([(str(path.relative_to(directory)), hashes.sha256(path)) for path in files])


@dataclass(frozen=True)
class CacheKeys:
    sampling: str
    edge: str
    cloud: str


def sampling_identity(settings: Settings) -> dict[str, Any]:
    ev = settings.eval
    return {
        "fps": ev.fps,
        "motion": ev.motion.model_dump(),
        "resize": ev.resize,
        "jpeg_quality": ev.jpeg_quality,
        "code": source_digest(
            "producers.decoding", "producers.pictures", "producers.video", "producers.motion", "core.images"
        ),
    }


def edge_identity(settings: Settings, hashes: FileHashes) -> dict[str, Any]:
    edge = settings.edge
    return {
        "model": edge.model,
        "revision": edge.revision,
        "question": edge.question,
        "quantize_int8": edge.quantize_int8,
        "bf16_autocast": edge.bf16_autocast,
        "weights": checkpoint_digest(edge.model, hashes),
        "code": source_digest("edge_workers.model"),
        "seed": EDGE_SEED,
    }


def cloud_identity(settings: Settings, hashes: FileHashes) -> dict[str, Any]:
    cloud, edge = settings.cloud, settings.edge
    return {
        "model": cloud.model,
        "revision": cloud.revision,
        "question": cloud.question,
        "num_frames": cloud.num_frames,
        "dtype": cloud.dtype,
        "device": cloud.device,
        "device_map": cloud.device_map,
        "cuda": torch.cuda.is_available(),  # device "auto" means the GPU when there is one
        "weights": checkpoint_digest(cloud.model, hashes),
        # either wrapper may answer (BlazePose or LLaVA, by the checkpoint): both are keyed
        "code": source_digest("cloud_workers.model", "cloud_workers.pose", "core.pose", "core.clips"),
        "clip_frames": edge.clip_frames,
        "clip_seconds": edge.clip_seconds,
    }


class OutputCache:
    """NPZ files of model outputs under `<cache_dir>/<kind>/<key>.npz`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, kind: str, key: str) -> Path:
        return self.directory / kind / f"{key}.npz"

    def load(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(kind, key)
        if not path.is_file():
            return None
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}

    def save(self, kind: str, key: str, arrays: dict[str, np.ndarray]) -> None:
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.stem}.partial.npz")
        np.savez(partial, **arrays)  # type: ignore[arg-type]  # numpy's hint reads **arrays as allow_pickle
        partial.replace(path)  # a run stopped half-way leaves no truncated entry behind


def camera_id_for(file: str) -> str:
    """A camera id (`producers.cameras[].id` pattern) from a clip's file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", Path(file).stem) or "clip"


@dataclass(frozen=True)
class PublishedClip:
    frames: list[Frame]
    heartbeat: list[bool]
    duration_s: float


def publish_as_camera(path: Path, camera_id: str, room: str, settings: Settings) -> PublishedClip:
    """The frames a producer would publish for this video file as a camera (sampled, gated, resized, JPEG)."""
    ev = settings.eval
    gate = MotionGate(ev.motion)
    frames: list[Frame] = []
    heartbeat: list[bool] = []
    last_position_s = 0.0
    try:
        for sampled in sample_file(str(path), ev.fps):
            last_position_s = sampled.position_s
            trigger = gate.check(sampled.picture, sampled.position_s)
            if trigger is None:
                continue
            picture = sampled.picture.resized(ev.resize)
            captured_at = CLIP_START + timedelta(seconds=sampled.position_s)
            seq = len(frames)
            frames.append(
                Frame(
                    frame_id=Frame.make_id(camera_id, captured_at, seq),
                    camera_id=camera_id,
                    room=room,
                    seq=seq,
                    captured_at=captured_at,
                    width=picture.width,
                    height=picture.height,
                    jpeg=encode_jpeg(picture, ev.jpeg_quality),
                )
            )
            heartbeat.append(trigger == "heartbeat")
    except SourceError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not frames:
        raise ConfigError(f"{path}: no frame could be read")
    return PublishedClip(frames, heartbeat, last_position_s + 1.0 / ev.fps)


def decoded(jpeg: bytes) -> np.ndarray:
    image = decode_jpeg_rgb(jpeg)
    assert image is not None  # encoded by us a moment ago
    return image


def batches(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(count, start + size))


def run_edge(model: EdgeModel, meter: CostMeter, frames: list[Frame], batch_size: int) -> dict[str, np.ndarray]:
    """The edge model on every published frame, in batches of one clip's frames (one size)."""
    probabilities, hidden, times, energies = [], [], [], []
    for part in batches(len(frames), batch_size):
        images = [decoded(frame.jpeg) for frame in frames[part]]
        torch.manual_seed(EDGE_SEED)
        started = time.perf_counter()
        meter.start()
        output = model.predict(images)
        cost = meter.stop()
        per_frame_ms = (time.perf_counter() - started) * 1000 / len(images)
        probabilities.append(output.fall_probability)
        hidden.append(output.hidden)
        times.append(np.full(len(images), per_frame_ms, np.float32))
        energies.append(np.full(len(images), np.nan if cost.energy_j is None else cost.energy_j / len(images)))
    return {
        "edge_p": np.concatenate(probabilities).astype(np.float32),
        "hidden": np.concatenate(hidden).astype(np.float32),
        "edge_ms": np.concatenate(times).astype(np.float32),
        "edge_j": np.concatenate(energies).astype(np.float32),
    }


def offload_clips(frames: list[Frame], settings: Settings) -> list[list[np.ndarray]]:
    """For each frame, the clip the edge worker would send with it (its camera's buffer up to that frame)."""
    buffers = ClipBuffers(settings.edge.clip_frames, settings.edge.clip_seconds)
    clips = []
    for frame in frames:
        buffers.add(frame)
        clips.append([decoded(buffered.jpeg) for buffered in buffers.clip_ending_at(frame)])
    return clips


def run_cloud(
    model: CloudModel, meter: CostMeter, clips: list[list[np.ndarray]], batch_size: int
) -> dict[str, np.ndarray]:
    probabilities, times, energies = [], [], []
    for part in batches(len(clips), batch_size):
        started = time.perf_counter()
        meter.start()
        answers = model.predict(clips[part])
        cost = meter.stop()
        count = len(answers)
        probabilities.append(np.asarray(answers, np.float32))
        times.append(np.full(count, (time.perf_counter() - started) * 1000 / count, np.float32))
        energies.append(np.full(count, np.nan if cost.energy_j is None else cost.energy_j / count, np.float32))
    return {
        "cloud_p": np.concatenate(probabilities).astype(np.float32),
        "cloud_ms": np.concatenate(times),
        "cloud_j": np.concatenate(energies),
    }


class LazyModels:
    """The model pair and their cost meters, loaded the first time a cache miss needs them (a cached run
    loads nothing)."""

    def __init__(self, load_edge: Callable[[], EdgeModel], load_cloud: Callable[[], CloudModel]) -> None:
        self.load_edge = load_edge
        self.load_cloud = load_cloud
        self._edge: tuple[EdgeModel, CostMeter] | None = None
        self._cloud: tuple[CloudModel, CostMeter] | None = None

    @property
    def edge(self) -> tuple[EdgeModel, CostMeter]:
        if self._edge is None:
            cpu = torch.device("cpu")
            self._edge = (self.load_edge(), CostMeter(cpu, open_energy_meter(cpu)))
        return self._edge

    @property
    def cloud(self) -> tuple[CloudModel, CostMeter]:
        if self._cloud is None:
            model = self.load_cloud()
            self._cloud = (model, CostMeter(model.device, open_energy_meter(model.device, model.gpu_indices)))
        return self._cloud


def edge_arrays(published: PublishedClip, models: LazyModels, settings: Settings) -> dict[str, np.ndarray]:
    """The edge model's outputs on a clip's published frames, with the frames' timing."""
    return {
        "position_s": np.array([(f.captured_at - CLIP_START).total_seconds() for f in published.frames], np.float64),
        "heartbeat": np.array(published.heartbeat, bool),
        "duration_s": np.array(published.duration_s),
        **run_edge(*models.edge, published.frames, settings.eval.batch_size),
    }


def clip_outputs(
    settings: Settings, folder: Path, clips: list[LabelledClip], models: LazyModels
) -> tuple[list[ClipOutputs], CacheStats]:
    """Every clip's outputs: from the cache where present, else computed (with a progress bar) and cached."""
    started = time.perf_counter()
    cache_dir = settings.eval.cache_dir
    hashes = FileHashes.load(cache_dir / "file-hashes.json")
    cache = OutputCache(cache_dir)
    sampling = sampling_identity(settings)
    edge_id = edge_identity(settings, hashes)
    cloud_id = cloud_identity(settings, hashes)
    stats = CacheStats(clips=len(clips))
    results = []
    missing = [path for path in (folder / clip.file for clip in clips) if not path.is_file()]
    if missing:
        raise ConfigError(f"clips.csv lists files that are not in {folder}: {', '.join(p.name for p in missing)}")
    files_of_camera: dict[str, list[str]] = defaultdict(list)
    for clip in clips:
        files_of_camera[camera_id_for(clip.file)].append(clip.file)
    shared = next((files for files in files_of_camera.values() if len(files) > 1), None)
    if shared is not None:  # one camera's frames and verdicts would mix two clips
        raise ConfigError(f"clips.csv: {' and '.join(shared)} would be one camera ({camera_id_for(shared[0])!r})")
    with tqdm(total=len(clips), unit="clip", desc="eval: models", disable=None) as progress:
        for clip in clips:
            path = folder / clip.file
            sampling_key = digest({"format": CACHE_FORMAT, "clip": hashes.sha256(path), **sampling})
            keys = CacheKeys(sampling_key, digest([sampling_key, edge_id]), digest([sampling_key, cloud_id]))
            camera_id = camera_id_for(clip.file)
            room = clip.room or camera_id
            edge = cache.load("edge", keys.edge)
            cloud = cache.load("cloud", keys.cloud)
            published: PublishedClip | None = None
            if edge is None or cloud is None:
                published = publish_as_camera(path, camera_id, room, settings)
            if edge is None:
                assert published is not None
                progress.set_postfix_str(f"edge model on {clip.file}")
                edge = edge_arrays(published, models, settings)
                cache.save("edge", keys.edge, edge)
                stats.edge_computed += len(published.frames)
            else:
                stats.edge_cached += len(edge["position_s"])
            if cloud is None:
                assert published is not None
                progress.set_postfix_str(f"cloud model on {clip.file}")
                cloud = run_cloud(*models.cloud, offload_clips(published.frames, settings), settings.eval.batch_size)
                cache.save("cloud", keys.cloud, cloud)
                stats.cloud_computed += len(published.frames)
            else:
                stats.cloud_cached += len(cloud["cloud_p"])
            if len(cloud["cloud_p"]) != len(edge["position_s"]):
                raise ConfigError(f"the cache in {cache_dir} is inconsistent for {clip.file}: remove it and rerun")
            results.append(ClipOutputs.of(clip, camera_id, room, edge, cloud))
            stats.frames += len(edge["position_s"])
            progress.update(1)
    hashes.save()
    stats.seconds = time.perf_counter() - started
    return results, stats
