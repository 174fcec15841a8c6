"""The measurements of `fallwatch bench producer`: CPU cost of one camera's capture loop per decode path.

Each video is played as a live camera (real-time pacing, looped) through the producer's own
capture loop (`CameraCapture`: read, decode, sample, resize, JPEG; motion gate off, the worst
case) for a fixed time, without Kafka, once per decode path: today's (`decode: all`, OpenCV
decoding every frame) and the new ones (`auto`, `keyframes`), interleaved round by round in the
same run. Short clips are first repeated into one longer file (PyAV, stream copy) so no row
measures a loop restart. CPU is the process's CPU time over the wall time (FFmpeg decodes on
threads of its own), so run it on an otherwise idle machine or say what else was running.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import threading
from pathlib import Path

import av
import cv2
from rich.table import Table

from core.settings import CameraSettings, ProducerSettings
from fallwatch.benchmarks.kit import alternating, bench_table, cpu_seconds, show
from producers.camera import CameraCapture, CameraStats


def repeated(video: Path, seconds: float, folder: Path) -> Path:
    """The video repeated (stream copy through PyAV, no ffmpeg binary needed) until it lasts longer than `seconds`."""
    longer = folder / f"{video.stem}-repeated{video.suffix}"
    with av.open(str(video)) as source, av.open(str(longer), "w") as output:
        stream = source.streams.video[0]
        copied = output.add_stream_from_template(stream)
        packets = [packet for packet in source.demux(stream) if packet.pts is not None and packet.size]
        times = [(int(packet.pts or 0), packet.dts) for packet in packets]  # each packet's own, before shifting
        step = max(pts for pts, _ in times) - min(pts for pts, _ in times) + (packets[0].duration or 1)
        duration_s = float(step * stream.time_base) if stream.time_base else 1.0
        for loop in range(int(seconds / duration_s) + 2):
            for packet, (pts, dts) in zip(packets, times, strict=True):
                packet.stream = copied
                packet.pts = pts + loop * step
                packet.dts = None if dts is None else dts + loop * step
                output.mux(packet)
    return longer


MODES = ("all", "auto", "keyframes")
MODE_NAMES = {
    "all": "today: decode every frame (OpenCV)",
    "auto": "auto: only frames due and those they need (PyAV)",
    "keyframes": "keyframes: only keyframes while often enough (PyAV)",
}


def producer_loop(video: Path, seconds: float, fps: float, decode: str) -> tuple[float, CameraStats]:
    """The producer's capture loop, motion gate off (the worst case). Returns (CPU cores used, the camera's stats)."""
    camera = CameraSettings(
        id="bench", room="bench", url=str(video), fps=fps, loop=True, realtime=True, motion={"enabled": False}
    )
    camera = camera.model_copy(update={"decode": decode})
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


def run_benchmark(videos: list[Path], seconds: float, fps: float, rounds: int) -> None:
    table = bench_table(
        f"producer capture loop, one camera at {fps:g} fps, motion gate off, median of {rounds} × {seconds:g} s",
        ("video", "size", "decode path", "CPU (cores)", "vs today", f"cameras per core at {fps:g} fps",
         "frames decoded / read", "sampled", "behind (slots)"),
        labels=3,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        for video in videos:
            add_rows(table, video.name, repeated(video, seconds, Path(folder)), seconds, fps, rounds)
    show(table, width=220)


def add_rows(table: Table, name: str, video: Path, seconds: float, fps: float, rounds: int) -> None:
    probe = cv2.VideoCapture(str(video))
    size = f"{int(probe.get(cv2.CAP_PROP_FRAME_WIDTH))}×{int(probe.get(cv2.CAP_PROP_FRAME_HEIGHT))}"
    probe.release()
    runs = alternating({mode: functools.partial(producer_loop, video, seconds, fps, mode) for mode in MODES}, rounds)
    today_cpu = statistics.median(cpu for cpu, _ in runs["all"])
    for mode in MODES:
        cpu = statistics.median(cpu for cpu, _ in runs[mode])
        stats = runs[mode][-1][1]
        table.add_row(
            name,
            size,
            MODE_NAMES[mode],
            f"{cpu:.3f}",
            f"{cpu / today_cpu:.2f}",
            f"{1 / cpu:.1f}",
            f"{stats.decoded} / {stats.frames_in}",
            str(stats.sampled),
            str(stats.behind),
        )
