"""The measurements of `fallwatch bench producer`: CPU cost of one camera's capture loop.

Each video is played as a live camera (real-time pacing, looped) through the producer's own
capture loop (`CameraCapture`: grab every frame, decode the due ones, motion gate, resize, JPEG)
for a fixed time, without Kafka; the baseline, measured in the same run on the same video, is
the naive loop that decodes every frame with `read()`. Short clips are first repeated into one
longer file (ffmpeg, stream copy) so no row measures a loop restart. CPU is the process's CPU
time over the wall time (FFmpeg decodes on threads of its own), so run it on an otherwise idle
machine or say what else was running.
"""

from __future__ import annotations

import resource
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import cv2
from rich.console import Console
from rich.table import Table

from core.settings import CameraSettings, ProducerSettings
from producers.camera import CameraCapture, CameraStats


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def repeated(video: Path, seconds: float, folder: Path) -> Path:
    """The video repeated (stream copy, no re-encoding) until it lasts longer than `seconds`."""
    probe = cv2.VideoCapture(str(video))
    duration_s = probe.get(cv2.CAP_PROP_FRAME_COUNT) / (probe.get(cv2.CAP_PROP_FPS) or 30.0)
    probe.release()
    longer = folder / f"{video.stem}-repeated{video.suffix}"
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-stream_loop",
            str(int(seconds / duration_s) + 1),
            "-i",
            str(video),
            "-an",
            "-c",
            "copy",
            str(longer),
        ],
        check=True,
        timeout=300,
    )
    return longer


def naive_read_loop(video: Path, seconds: float) -> tuple[float, int]:
    """Baseline: decode every frame (paced in real time). Returns (CPU cores used, frames decoded)."""
    capture = cv2.VideoCapture(str(video))
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    frames = 0
    started, cpu_start = time.monotonic(), cpu_seconds()
    while (elapsed := time.monotonic() - started) < seconds:
        ok, _image = capture.read()
        if not ok:
            capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        frames += 1
        time.sleep(max(0.0, frames / fps - elapsed))
    capture.release()
    return (cpu_seconds() - cpu_start) / seconds, frames


def producer_loop(video: Path, seconds: float, fps: float, motion: bool) -> tuple[float, CameraStats]:
    """The producer's capture loop. Returns (CPU cores used, the camera's stats)."""
    camera = CameraSettings(
        id="bench", room="bench", url=str(video), fps=fps, loop=True, realtime=True, motion={"enabled": motion}
    )
    stats = CameraStats()
    stop = threading.Event()
    capture = CameraCapture(camera, ProducerSettings(), stats, lambda _frame: None, stop)  # encoded, not sent
    thread = threading.Thread(target=capture.run, daemon=True)
    cpu_start = cpu_seconds()
    thread.start()
    stop.wait(seconds)  # the measured interval itself, not a synchronisation
    stop.set()
    thread.join()
    cpu = (cpu_seconds() - cpu_start) / seconds
    return cpu, stats


def run_benchmark(videos: list[Path], seconds: float, fps: float) -> None:
    table = Table(title=f"producer capture loop, one camera, {seconds:g} s per row")
    for column in (
        "video",
        "size",
        "measured loop",
        "CPU (cores)",
        "vs baseline",
        "frames decoded / sampled",
        "published",
        "skipped by motion",
    ):
        table.add_column(column)
    with tempfile.TemporaryDirectory() as folder:
        for video in videos:
            add_rows(table, video.name, repeated(video, seconds, Path(folder)), seconds, fps)
    Console(width=220).print(table)


def add_rows(table: Table, name: str, video: Path, seconds: float, fps: float) -> None:
    probe = cv2.VideoCapture(str(video))
    size = f"{int(probe.get(cv2.CAP_PROP_FRAME_WIDTH))}×{int(probe.get(cv2.CAP_PROP_FRAME_HEIGHT))}"
    probe.release()
    base_cpu, base_frames = naive_read_loop(video, seconds)
    table.add_row(name, size, "baseline: read() every frame", f"{base_cpu:.3f}", "1.00", str(base_frames), "", "")
    for motion in (False, True):
        cpu, stats = producer_loop(video, seconds, fps, motion)
        table.add_row(
            name,
            size,
            f"producer {fps:g} fps, motion gate {'on' if motion else 'off'}",
            f"{cpu:.3f}",
            f"{cpu / base_cpu:.2f}",
            str(stats.sampled),
            str(stats.sampled - stats.skipped_motion),
            str(stats.skipped_motion),
        )
