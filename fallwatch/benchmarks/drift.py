"""`fallwatch bench drift`: how long the edge worker's drift guard takes to flag a room the pair never saw.

The running pair (`edge.model` and the newest switcher of `edge.switcher_registry`) is published as
one version of a scratch registry with a calibration made the way `dmd adapt` makes one
(`dmd_offline.adapt.calibration_of`), on the test split of the pair's own DMD data set
(`dmd.workdir`): frames neither the edge model nor the switcher learnt from, never the clips
streamed. Each `--clips` folder is one camera: its clips, in file order and looped, as a producer
publishes them (`eval.fps`, the motion gate, `publish_as_camera`), paced in real time with capture
times of now, through a real edge worker on the local stack (or a temporary one). Measured: seconds
from the camera's first frame to its `drift_flagged` operator event, the frames answered by then,
and the reasons.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaProducer

from core.kafka_io import make_consumer, make_producer, send, start_clients
from core.settings import ConfigError, Settings
from dmd_offline.adapt import calibration_of
from dmd_offline.clip_outputs import publish_as_camera
from dmd_offline.clips import read_labelled_clips
from dmd_offline.dataset import agreement_scores, assign_missing_splits, load_dataset
from dmd_offline.pipeline import Workdir
from edge_workers.model import EdgeBatch
from edge_workers.registry import Calibration, PairVersion, activate, save_pair
from edge_workers.routing import served_threshold
from edge_workers.service import EdgeWorker
from edge_workers.switcher import latest_version, load_switcher, new_version
from fallwatch.stack import fresh_run, local_stack_settings
from schemas import Frame, OperatorEvent, decode


@dataclass
class CameraResult:
    camera: str
    folder: str
    frames_published: int
    seconds_to_flag: float | None  # None: not flagged within the run
    reasons: str


def reference_calibration(settings: Settings) -> tuple[Calibration, int]:
    """The running pair on its DMD data set's test split, as `dmd adapt` calibrates a candidate."""
    dmd = settings.dmd
    data = assign_missing_splits(load_dataset(Workdir(dmd.workdir).dataset), dmd.val_share, dmd.test_share)
    test = data.split("test")
    newest = latest_version(settings.edge.switcher_registry)
    if newest is None or not test.rows:
        raise ConfigError(f"bench drift needs a published switcher and a DMD test split ({dmd.workdir})")
    switcher, metadata = load_switcher(newest)
    probabilities = test.column("small_fall_probability").astype(np.float32)
    scores = agreement_scores(switcher, test)
    output = EdgeBatch(probabilities, test.hidden)
    threshold = served_threshold(settings.edge, metadata.threshold)  # what the worker will route by
    return calibration_of(output, scores, threshold, settings.edge.decision_threshold), len(test.rows)


def publish_reference_pair(settings: Settings, registry: Path, calibration: Calibration) -> str:
    newest = latest_version(settings.edge.switcher_registry)
    assert newest is not None
    switcher, metadata = load_switcher(newest)
    version = new_version()
    pair = PairVersion(
        version=version,
        created_at=datetime.now(UTC),
        parent=None,
        edge_base=settings.edge.model,
        edge_sha256="",
        switcher_sha256="",
        calibration=calibration,
        training_window="bench drift: the reference pair",
    )
    save_pair(registry, pair, Path(settings.edge.model), switcher, metadata.model_copy(update={"version": version}))
    activate(registry, version, replacing=None)  # the scratch registry's first version
    return version


def camera_frames(folder: Path, camera: str, settings: Settings) -> list[Frame]:
    """One pass over the folder's clips as one camera (capture times are set when streamed)."""
    frames: list[Frame] = []
    for clip in sorted(read_labelled_clips(folder), key=lambda c: c.file):
        frames.extend(publish_as_camera(folder / clip.file, camera, camera, settings).frames)
    if not frames:
        raise ConfigError(f"{folder}: no frame published")
    return frames


async def stream(producer: AIOKafkaProducer, settings: Settings, camera: str, frames: list[Frame],
                 seconds: float, started: dict[str, float]) -> int:  # fmt: skip
    """Publish the frames looped at `eval.fps`, in real time, for `seconds`; returns how many."""
    period = 1 / settings.eval.fps
    start = time.monotonic()
    started[camera] = time.time()
    count = 0
    while time.monotonic() - start < seconds:
        template = frames[count % len(frames)]
        now = datetime.now(UTC)
        frame = template.model_copy(
            update={"frame_id": Frame.make_id(camera, now, count), "seq": count, "captured_at": now}
        )
        await send(producer, settings.kafka.topics.frames, camera, frame)
        count += 1
        await asyncio.sleep(max(0.0, start + count * period - time.monotonic()))  # the camera's pace
    return count


async def flags(settings: Settings, until: float) -> dict[str, OperatorEvent]:
    """Each camera's first `drift_flagged` event (read until the monotonic deadline `until`)."""
    consumer = make_consumer(settings, settings.kafka.topics.operator_events, group_id=None)
    await start_clients(settings, consumer)
    found: dict[str, OperatorEvent] = {}
    try:
        while time.monotonic() < until:
            batches = await consumer.getmany(timeout_ms=500)
            for record in (r for records in batches.values() for r in records):
                event = decode(OperatorEvent, record.value)
                if event.kind == "drift_flagged" and event.camera_id is not None:
                    found.setdefault(event.camera_id, event)
    finally:
        await consumer.stop()
    return found


async def run_cameras(settings: Settings, folders: list[Path], seconds: float) -> list[CameraResult]:
    cameras = {f"drift-{folder.name}": camera_frames(folder, f"drift-{folder.name}", settings) for folder in folders}
    worker = EdgeWorker(settings, None)
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))
    producer = make_producer(settings)
    await start_clients(settings, producer)
    started: dict[str, float] = {}
    try:
        watching = asyncio.create_task(flags(settings, time.monotonic() + seconds + 10))
        counts = await asyncio.gather(*[
            stream(producer, settings, camera, frames, seconds, started) for camera, frames in cameras.items()
        ])  # fmt: skip
        await producer.flush()
        found = await watching
    finally:
        await producer.stop()
        stop.set()
        await serving
    return [
        CameraResult(
            camera,
            str(folder),
            count,
            None if camera not in found else found[camera].at.timestamp() - started[camera],
            "" if camera not in found else found[camera].message.split(": ", 1)[1],
        )
        for (camera, _frames), folder, count in zip(cameras.items(), folders, counts, strict=True)
    ]


def bench_drift_run(
    settings: Settings, folders: list[Path], seconds: float
) -> tuple[list[CameraResult], Calibration, int]:
    calibration, test_rows = reference_calibration(settings)
    scratch = Path(tempfile.mkdtemp(prefix="fallwatch-bench-drift-"))
    try:
        registry = scratch / "registry"
        publish_reference_pair(settings, registry, calibration)
        with local_stack_settings(settings, scratch / "stack") as on_stack:
            run = fresh_run(on_stack, "bench-drift")
            run.edge.model_registry = registry
            run.edge.registry_announce_key = None
            results = asyncio.run(run_cameras(run, folders, seconds))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results, calibration, test_rows


def markdown(results: list[CameraResult], calibration: Calibration, test_rows: int, settings: Settings) -> str:
    drift = settings.edge.drift
    lines = [
        f"calibration (the pair on its DMD test split, {test_rows} frames): edge fall rate "
        f"{calibration.fall_rate:.0%}, offload share {calibration.offload_share:.0%}; "
        f"drift_min_frames {drift.drift_min_frames}, drift_window {drift.drift_window}, {settings.eval.fps:g} fps",
        "",
        "| camera (folder, clips looped) | frames published | seconds to the drift flag | reasons |",
        "|---|---:|---:|---|",
    ]
    for r in results:
        flagged = "not flagged" if r.seconds_to_flag is None else f"{r.seconds_to_flag:.1f}"
        lines.append(f"| {r.folder} | {r.frames_published} | {flagged} | {r.reasons} |")
    return "\n".join(lines) + "\n"
