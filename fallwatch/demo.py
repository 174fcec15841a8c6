"""`fallwatch demo`: a folder of videos streamed as cameras through every service.

Starts the local stack (and stops it again if it started it), runs the edge
worker, cloud worker and alerting service as real subprocesses, streams each
video as one camera in its own room, prints every verdict and alert as it
arrives and a summary once every sampled frame has its final verdict. When the
folder has a `clips.csv` (file,label,fall_start_s), the summary also judges each
clip's first alert against the annotated fall start, with the scoring of
`fallwatch eval` (`dmd_offline.scoring.score_clip`).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table

from core.kafka_io import consumer_group_lag, make_consumer
from core.runtime import signals_set
from core.settings import CameraSettings, ConfigError, Settings, load_settings, settings_data
from dmd_offline.clips import CLIPS_CSV, LabelledClip, read_labelled_clips
from dmd_offline.scoring import score_clip
from fallwatch.devkit.models import REFERENCE_MODELS, ModelPaths, build_tiny_models, reference_models
from fallwatch.processes import start_services, stop_services
from fallwatch.stack import fresh_run, local_stack_settings
from producers.service import run_producers
from schemas import FallEvent, Verdict, decode

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm"}
SERVICES = {"edge": "edge_workers", "cloud": "cloud_workers", "alerting": "alerting"}
FINISH_TIMEOUT_S = 300.0
ModelChoice = Literal["auto", "reference", "tiny"]

console = Console(highlight=False)


@dataclass
class DemoTally:
    published: dict[str, int] = field(default_factory=dict)
    final_by_camera: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    sources: Counter[str] = field(default_factory=Counter)
    offloaded: set[str] = field(default_factory=set)
    alerts: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    first_alert: dict[str, FallEvent] = field(default_factory=dict)
    stream_start: dict[str, datetime] = field(default_factory=dict)  # capture time of the camera's first frame
    interrupted: bool = False

    def complete(self) -> bool:
        return bool(self.published) and all(
            len(self.final_by_camera[camera]) >= count for camera, count in self.published.items()
        )


def read_clip_truth(clips_dir: Path) -> dict[str, LabelledClip]:
    """clips.csv's annotation per video file name; empty when the folder has none."""
    if not (clips_dir / CLIPS_CSV).is_file():
        return {}
    return {clip.file: clip for clip in read_labelled_clips(clips_dir)}


def clip_outcome(truth: LabelledClip | None, stream_start: datetime | None, alert: FallEvent | None) -> str:
    """The clip's first alert judged against its annotation, as `fallwatch eval` judges it."""
    if truth is None:
        return "alert" if alert else "no alert"
    return score_clip(truth.is_fall, truth.fall_start_s, stream_start, alert).describe()


def find_videos(clips_dir: Path) -> list[Path]:
    videos = sorted(p for p in clips_dir.glob("*") if p.suffix.lower() in VIDEO_SUFFIXES) if clips_dir.is_dir() else []
    if not videos:
        raise ConfigError(
            f"no video files in {clips_dir} (the shared datasets are not beside this checkout?); "
            "point the demo at a folder of your own videos: make demo CLIPS=/path/to/videos "
            "(or fallwatch demo --clips /path/to/videos)"
        )
    return videos


def demo_settings(base: Settings, models: dict[str, dict[str, str]], videos: list[Path], fps: float) -> Settings:
    """The base settings with the demo's models, one camera per video, and this run's own topics and groups."""
    data = settings_data(base)
    for section, values in models.items():
        data[section].update(values)
    data["producers"]["cameras"] = [
        CameraSettings(id=f"cam-{i}", room=f"room-{i}", url=str(video), fps=fps).model_dump(mode="json")
        for i, video in enumerate(videos, start=1)
    ]
    return fresh_run(Settings(**data), "demo")


def check_alive(processes: dict[str, subprocess.Popen], run_dir: Path) -> None:
    for name, process in processes.items():
        if process.poll() is not None:
            tail = (run_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise ConfigError(f"the {name} service exited with {process.returncode}: {' | '.join(tail)}")


def print_verdict(verdict: Verdict) -> None:
    seq = verdict.frame_id.rsplit("-", 1)[-1]
    answer = "[bold red]FALL[/]   " if verdict.decision else "no fall"
    where = f"{verdict.camera_id} {verdict.room} frame {seq:>3}"
    if not verdict.final:
        console.print(
            f"{where}  edge   p={verdict.fall_probability:.2f} {answer} → cloud (switcher {verdict.switcher_score:.2f})"
        )
    else:
        console.print(f"{where}  {verdict.source:6} p={verdict.fall_probability:.2f} {answer} final")


async def watch(
    settings: Settings, tally: DemoTally, processes: dict[str, subprocess.Popen], run_dir: Path, stop: asyncio.Event
) -> None:
    topics = settings.kafka.topics
    consumer = make_consumer(settings, topics.verdicts, topics.fall_events, group_id=None)
    await consumer.start()
    deadline = None
    try:
        while not stop.is_set():
            check_alive(processes, run_dir)
            batches = await consumer.getmany(timeout_ms=500)
            for record in (r for batch in batches.values() for r in batch):
                if record.topic == topics.fall_events:
                    event = decode(FallEvent, record.value)
                    tally.alerts[event.camera_id].add(event.alert_id)
                    tally.first_alert.setdefault(event.camera_id, event)
                    console.print(
                        f"[bold red]ALERT[/] {event.state} {event.camera_id} {event.room}: {event.rule}, "
                        f"confidence {event.confidence:.2f}, evidence {len(event.evidence_frame_ids)} frames"
                    )
                    continue
                verdict = decode(Verdict, record.value)
                print_verdict(verdict)
                start = tally.stream_start.get(verdict.camera_id)
                tally.stream_start[verdict.camera_id] = min(start or verdict.captured_at, verdict.captured_at)
                if not verdict.final:
                    tally.offloaded.add(verdict.frame_id)
                elif verdict.frame_id not in tally.final_by_camera[verdict.camera_id]:
                    tally.final_by_camera[verdict.camera_id].add(verdict.frame_id)
                    tally.sources[verdict.source] += 1
            if tally.complete():
                deadline = deadline or time.monotonic() + 60
                # every frame has its final verdict: wait until alerting has read them all too
                lag = await consumer_group_lag(settings, settings.alerting.app_id, topics.verdicts)
                if lag == 0 or time.monotonic() > deadline:
                    return
    finally:
        await consumer.stop()


async def stream_and_watch(settings: Settings, processes: dict[str, subprocess.Popen], run_dir: Path) -> DemoTally:
    """Stream the cameras and print what comes back until every frame has its final verdict, or Ctrl-C."""
    stop = asyncio.Event()
    with signals_set(stop):
        tally = DemoTally()
        watcher = asyncio.create_task(watch(settings, tally, processes, run_dir, stop))
        tally.published = await run_producers(settings, stop)
        if not stop.is_set():
            console.print(f"[bold]all cameras done: {sum(tally.published.values())} frames published[/]")
        try:
            await asyncio.wait_for(watcher, FINISH_TIMEOUT_S)
        except TimeoutError:
            raise ConfigError(
                f"not every frame had a final verdict after {FINISH_TIMEOUT_S:.0f} s; see the logs in {run_dir}"
            ) from None
    if stop.is_set():
        tally.interrupted = True
        console.print("[bold]interrupted: stopping the services[/]")
    return tally


def print_summary(settings: Settings, tally: DemoTally, truth: dict[str, LabelledClip]) -> None:
    table = Table(title="fallwatch demo summary" + (" (interrupted)" if tally.interrupted else ""))
    for column in ("camera", "room", "video", "frames", "final verdicts", "alerts"):
        table.add_column(column)
    for camera in settings.producers.cameras:
        table.add_row(
            camera.id,
            camera.room,
            Path(camera.url).name,
            str(tally.published.get(camera.id, 0)),
            str(len(tally.final_by_camera[camera.id])),
            str(len(tally.alerts[camera.id])),
        )
    console.print(table)
    if truth:
        print_clip_outcomes(settings, tally, truth)
    frames = sum(tally.published.values())
    finals = sum(len(ids) for ids in tally.final_by_camera.values())
    console.print(
        f"frames {frames}, final verdicts {finals}: edge {tally.sources['edge']}, cloud {tally.sources['cloud']}, "
        f"edge-fallback {tally.sources['edge-fallback']}; offloaded {len(tally.offloaded)}; "
        f"alerts {sum(len(a) for a in tally.alerts.values())}"
    )


def print_clip_outcomes(settings: Settings, tally: DemoTally, truth: dict[str, LabelledClip]) -> None:
    # plain lines, not table cells: they must not be wrapped on a narrow terminal
    console.print("per clip, against clips.csv (first alert's opening vs the annotated fall start):")
    for camera in settings.producers.cameras:
        video = Path(camera.url).name
        clip = truth.get(video)
        annotated = (
            "not in clips.csv"
            if clip is None
            else (f"fall at {clip.fall_start_s:.1f} s" if clip.fall_start_s is not None else "no fall")
        )
        outcome = clip_outcome(clip, tally.stream_start.get(camera.id), tally.first_alert.get(camera.id))
        console.print(f"  {camera.id} {video} ({annotated}): {outcome}", soft_wrap=True)


def demo_models(choice: ModelChoice) -> ModelPaths:
    """The trained reference pair when asked for or, with `auto`, when it exists; the tiny pair otherwise."""
    reference = reference_models() if choice != "tiny" else None
    if reference is not None:
        console.print(
            "[bold]The demo runs the REFERENCE pair trained here on falls-fallaction (a compact ViLT edge model, "
            "a BlazePose cloud model; staged falls and little data: see the README's Results).[/]"
        )
        return reference
    if choice == "reference":
        raise ConfigError(
            f"no trained reference pair with a published switcher in {REFERENCE_MODELS}: "
            "run `make reference` first (about 3 minutes on a quiet 2-core CPU)"
        )
    console.print(
        "[bold yellow]The demo runs TINY UNTRAINED models: their verdicts and any alerts are arbitrary; "
        "they show the plumbing, not fall detection. `make reference` trains a real pair here "
        "(about 3 minutes) and the demo uses it from then on.[/]"
    )
    return build_tiny_models(Path("models/tiny"))


def run_demo(clips_dir: Path, fps: float, models: ModelChoice = "auto") -> None:
    videos = find_videos(clips_dir)
    truth = read_clip_truth(clips_dir)
    # aiokafka logs its own retried NotLeader errors while brand-new topics settle; not news for a demo
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    base = load_settings()
    console.print("starting the local stack (Kafka KRaft + redis-server) unless it runs already…")
    processes: dict[str, subprocess.Popen] = {}
    with local_stack_settings(base, base.state_dir) as on_stack:
        try:
            pair = demo_models(models)
            settings = demo_settings(on_stack, pair.settings_sections(), videos, fps)
            run_dir = settings.state_dir / "demo"
            run_dir.mkdir(parents=True, exist_ok=True)
            processes = start_services(settings, run_dir / "config.yaml", SERVICES)
            console.print(f"services started (logs in {run_dir}); streaming {len(videos)} videos at {fps} fps…")
            tally = asyncio.run(stream_and_watch(settings, processes, run_dir))
            print_summary(settings, tally, truth)
        finally:
            stop_services(processes.values())
    console.print("demo finished; services stopped")
