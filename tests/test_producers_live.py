"""Camera producers on live streams served on loopback by real servers, publishing to real Kafka.

HTTP/MJPEG comes from ffmpeg, RTSP from GStreamer's gst-rtsp-server (tests/rtsp_server.py), both
Debian packages installed by scripts/install-system-deps.sh. The streams are made from a fall clip
of ../shared/datasets (or conftest's synthetic clip when ../shared is absent).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.kafka_io import make_consumer, topic_specs
from core.settings import CameraSettings, Settings
from fallwatch.stack import LocalStack, StackState, free_port, on_stack, pid_alive
from producers.decoding import KEYFRAME_SLACK, PyAVSource
from producers.service import run_producers
from producers.status import read_statuses
from producers.video import RateSampler, SourceError
from schemas import Frame, decode
from tests.alerting_helpers import QuietHandler, http_server
from tests.conftest import FALL_CLIPS, REPO, settings_for, write_config, write_video

SYSTEM_PYTHON = "/usr/bin/python3"
STREAM_FPS = 15


class StreamServer:
    """A stream server subprocess on a loopback port; can be paused (a stall), killed and started again."""

    def __init__(self, argv: list[str], url: str, log: Path) -> None:
        self.argv, self.url, self.log = argv, url, log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def mjpeg_server(clip: Path, tmp_path: Path) -> StreamServer:
    """ffmpeg serving the clip, looped and paced in real time, as multipart MJPEG over HTTP (one client)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/cam.mjpg"
    argv = [
        "ffmpeg",
        "-nostdin",
        "-loglevel",
        "error",
        "-re",
        "-stream_loop",
        "-1",
        "-i",
        str(clip),
        "-an",
        "-vf",
        f"scale=320:240,fps={STREAM_FPS}",
        "-c:v",
        "mjpeg",
        "-q:v",
        "6",
        "-f",
        "mpjpeg",
        "-listen",
        "1",
        url,
    ]
    return StreamServer(argv, url, tmp_path / f"mjpeg-{port}.log")


def rtsp_server(clip: Path, tmp_path: Path) -> StreamServer:
    """GStreamer's RTSP server; the clip is first made H.264 with B-frames (ffmpeg) and a few loops long."""
    video = tmp_path / "rtsp.mp4"
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-stream_loop",
            "4",
            "-i",
            str(clip),
            "-an",
            "-vf",
            f"scale=320:240,fps={STREAM_FPS}",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-bf",  # non-reference B-frames, as many cameras' main profiles send
            "2",
            "-g",
            "15",
            "-pix_fmt",
            "yuv420p",
            str(video),
        ],
        check=True,
        timeout=120,
    )
    port = free_port()
    argv = [SYSTEM_PYTHON, str(REPO / "tests" / "rtsp_server.py"), str(port), str(video)]
    return StreamServer(argv, f"rtsp://127.0.0.1:{port}/cam", tmp_path / f"rtsp-{port}.log")


@pytest.fixture
def servers() -> Iterator[list[StreamServer]]:
    started: list[StreamServer] = []
    yield started
    for server in started:
        server.kill()


def live_camera(camera_id: str, url: str, fps: float = 4.0, **fields: object) -> dict:
    return CameraSettings(
        id=camera_id, room=f"room-{camera_id}", url=url, fps=fps, motion={"enabled": False}, **fields
    ).model_dump()


FAST_RECOVERY = {
    "stall_timeout_s": 2.0,
    "open_timeout_s": 2.0,
    "reconnect_initial_s": 0.2,
    "reconnect_max_s": 1.0,
    "status_interval_s": 0.3,
}


def live_settings(stack_state: StackState, tmp_path: Path, cameras: list[dict], **producers: object) -> Settings:
    """A producer run on these cameras that recovers fast, its camera status under this test's own prefix."""
    return settings_for(
        stack_state,
        tmp_path,
        producers={**FAST_RECOVERY, "status_key_prefix": f"test:{tmp_path.name}", "cameras": cameras, **producers},
    )


def metrics_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


class FrameWatcher:
    """Reads `frames` as the producer writes it; `until` polls a condition with a deadline."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.frames: list[Frame] = []
        self.consumer = make_consumer(settings, settings.kafka.topics.frames, group_id=None)

    def of(self, camera_id: str, after: datetime | None = None) -> list[Frame]:
        return [f for f in self.frames if f.camera_id == camera_id and (after is None or f.captured_at > after)]

    async def until(self, condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not condition():
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
            batches = await self.consumer.getmany(timeout_ms=200)
            self.frames.extend(decode(Frame, r.value) for batch in batches.values() for r in batch)

    async def read_to_end(self) -> None:
        """Everything written so far (the producer has stopped; the topic is this test's alone)."""
        ends = await self.consumer.end_offsets(list(self.consumer.assignment()))
        total = sum(ends.values())
        await self.until(lambda: len(self.frames) >= total, f"all {total} records")


async def status_until(
    settings: Settings, camera_id: str, condition: Callable[[dict], bool], what: str, timeout_s: float = 30.0
) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        status = (await read_statuses(settings)).get(camera_id)
        if status is not None and condition(status):
            return status
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for camera {camera_id} to be {what}: {status}")
        await asyncio.sleep(0.1)  # polling Redis for the producer's next status write


def sampling_rate(frames: list[Frame]) -> float:
    span = (frames[-1].captured_at - frames[0].captured_at).total_seconds()
    return (len(frames) - 1) / span


def assert_in_order(frames: list[Frame]) -> None:
    seqs = [f.seq for f in frames]
    assert seqs == sorted(set(seqs)), "one camera's frames arrive in order, no duplicates"
    assert [f.captured_at for f in frames] == sorted(f.captured_at for f in frames)


def test_mjpeg_and_rtsp_streams_arrive_at_the_target_fps_in_order(
    stack_state, tmp_path: Path, clip_path: Path, servers: list[StreamServer]
) -> None:
    mjpeg, rtsp = mjpeg_server(clip_path, tmp_path), rtsp_server(clip_path, tmp_path)
    servers += [mjpeg, rtsp]
    for server in servers:
        server.start()
    metrics_port = free_port()
    settings = live_settings(
        stack_state,
        tmp_path,
        [live_camera("mjpeg", mjpeg.url), live_camera("rtsp", rtsp.url, fps=3.0)],
        metrics_port=metrics_port,
    )

    async def scenario() -> tuple[FrameWatcher, str, list[dict]]:
        stop = asyncio.Event()
        producing = asyncio.create_task(run_producers(settings, stop))
        watcher = FrameWatcher(settings)
        await watcher.consumer.start()
        try:
            await watcher.until(
                lambda: len(watcher.of("mjpeg")) >= 25 and len(watcher.of("rtsp")) >= 19, "25 + 19 frames"
            )
            metrics = await asyncio.to_thread(metrics_text, metrics_port)
            await status_until(settings, "rtsp", lambda s: s["published"] >= 19, "publishing")
            env = write_config(settings, tmp_path / "config.yaml")
            cli = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "fallwatch", "cameras", "status", "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                cwd=REPO,
            )
            assert cli.returncode == 0, cli.stderr
            rows = [json.loads(line) for line in cli.stdout.splitlines()]
        finally:
            stop.set()
            await watcher.consumer.stop()
        published = await producing
        assert published["mjpeg"] >= 25 and published["rtsp"] >= 19
        return watcher, metrics, rows

    watcher, metrics, rows = asyncio.run(scenario())
    for camera_id, fps in (("mjpeg", 4.0), ("rtsp", 3.0)):
        frames = watcher.of(camera_id)
        assert_in_order(frames)
        # the first frame may wait for the stream's first keyframe; measure the steady rate after it
        assert sampling_rate(frames[1:]) == pytest.approx(fps, rel=0.1), camera_id
        assert {(f.width, f.height) for f in frames} == {(320, 240)}
    assert 'fallwatch_producer_published_total{camera="mjpeg",room="room-mjpeg"}' in metrics
    assert "fallwatch_producer_last_frame_age_seconds" in metrics and "fallwatch_producer_dropped_total" in metrics
    by_id = {row["camera_id"]: row for row in rows}
    assert set(by_id) == {"mjpeg", "rtsp"}
    for row in by_id.values():
        assert row["state"] == "streaming" and row["fps_in"] > row["fps_out"] > 0
        assert row["decode"] == "auto" and 0 < row["fps_sampled"] < row["fps_in"]
        assert row["sampled"] >= row["published"] and row["decoded"] <= row["frames_in"]
        assert row["send_delay_max_s"] >= row["send_delay_s"] > 0
        # (a first attempt may have come before the server listened: reconnects are not asserted here)
        assert row["last_error"] is None and row["last_frame_age_s"] < 5


def test_a_dropped_or_stalled_stream_reconnects_and_other_cameras_go_on(
    stack_state, tmp_path: Path, clip_path: Path, servers: list[StreamServer]
) -> None:
    flaky = mjpeg_server(clip_path, tmp_path)
    servers.append(flaky)
    flaky.start()
    never_url = f"http://viewer:secret@127.0.0.1:{free_port()}/cam.mjpg"  # nothing listens there
    settings = live_settings(
        stack_state,
        tmp_path,
        [
            live_camera("flaky", flaky.url),
            live_camera("steady", str(clip_path), loop=True, realtime=True),
            live_camera("never", never_url),
        ],
    )

    async def scenario() -> tuple[FrameWatcher, dict, dict, float, dict[str, int]]:
        stop = asyncio.Event()
        producing = asyncio.create_task(run_producers(settings, stop))
        watcher = FrameWatcher(settings)
        await watcher.consumer.start()
        try:
            await watcher.until(lambda: len(watcher.of("flaky")) >= 5 and len(watcher.of("steady")) >= 5, "frames")
            flaky.pause()  # the connection stays open but no frame comes: a stall
            stalled = await status_until(settings, "flaky", lambda s: s["stalls"] >= 1, "stalled")
            steady_before = len(watcher.of("steady"))
            flaky.kill()  # now the stream is gone altogether
            await watcher.until(lambda: len(watcher.of("steady")) >= steady_before + 6, "steady frames meanwhile")
            restarted_at = datetime.now(UTC)
            flaky.start()
            await watcher.until(lambda: len(watcher.of("flaky", after=restarted_at)) >= 5, "flaky frames again")
            reconnect_s = (watcher.of("flaky", after=restarted_at)[0].captured_at - restarted_at).total_seconds()
            never = await status_until(settings, "never", lambda s: s["reconnects"] >= 3, "retrying")
            stop.set()
            published = await producing
            await watcher.read_to_end()  # the frames the producer sent after the last check
        finally:
            stop.set()
            await watcher.consumer.stop()
        return watcher, stalled, never, reconnect_s, published

    watcher, stalled, never, reconnect_s, published = asyncio.run(scenario())
    # detected after stall_timeout_s without a frame, and retried
    assert stalled["updated_at"] - stalled["last_frame_at"] >= 0.9 * FAST_RECOVERY["stall_timeout_s"]
    assert stalled["reconnects"] >= 1
    print(f"\nflaky camera: first frame {reconnect_s:.2f} s after its stream server came back")
    assert reconnect_s < 5.0, "reconnect_max_s is 1 s: the producer tries again at least every second"
    for camera_id in ("flaky", "steady"):
        assert_in_order(watcher.of(camera_id))
    assert published["flaky"] == len(watcher.of("flaky")) and published["never"] == 0
    assert never["state"] in {"waiting", "connecting"} and never["published"] == 0
    assert never["last_error"] == f"cannot open video source {never_url.replace('viewer:secret', '***')}"
    assert "secret" not in json.dumps([stalled, never])


def test_broker_restart_mid_stream_loses_no_acked_frame(
    tmp_path: Path, clip_path: Path, servers: list[StreamServer]
) -> None:
    # its own stack: restarting the session's broker would disturb every other test
    stack = LocalStack(tmp_path / "stack", cache_dir=REPO / ".cache", partitions=1)
    live = mjpeg_server(clip_path, tmp_path)
    servers.append(live)
    live.start()
    settings = Settings(
        state_dir=tmp_path / "state",
        producers={
            **FAST_RECOVERY,
            "status_key_prefix": f"test:{tmp_path.name}",
            "cameras": [live_camera("live", live.url), live_camera("file", str(clip_path), loop=True, realtime=True)],
        },
    )
    state = stack.up(topic_specs(settings))
    try:
        settings = on_stack(settings, state)
        published, frames, stopped_at, restarted_at = asyncio.run(restart_scenario(settings, stack, state))
    finally:
        stack.down()
    for camera_id in ("live", "file"):
        mine = [f for f in frames if f.camera_id == camera_id]
        assert_in_order(mine)
        assert len(mine) == published[camera_id], "every frame Kafka acked is there, once"
        assert any(f.captured_at < stopped_at for f in mine) and any(f.captured_at > restarted_at for f in mine)


async def restart_scenario(
    settings: Settings, stack: LocalStack, state: StackState
) -> tuple[dict[str, int], list[Frame], datetime, datetime]:
    stop = asyncio.Event()
    producing = asyncio.create_task(run_producers(settings, stop))
    watcher = FrameWatcher(settings)
    await watcher.consumer.start()
    try:
        await watcher.until(lambda: len(watcher.of("live")) >= 5 and len(watcher.of("file")) >= 5, "frames")
        stopped_at = datetime.now(UTC)
        await asyncio.to_thread(stack.stop_kafka)
        assert not pid_alive(state.kafka.pid)
        before = await status_until(settings, "live", lambda s: True, "reporting")
        # the cameras keep capturing while the broker is away
        await status_until(
            settings,
            "live",
            lambda s: s["frames_in"] >= before["frames_in"] + 2 * STREAM_FPS,
            "capturing during the outage",
        )
        await asyncio.to_thread(stack.start_kafka_again)
        restarted_at = datetime.now(UTC)
        await watcher.until(
            lambda: all(len(watcher.of(c, after=restarted_at)) >= 5 for c in ("live", "file")),
            "frames after the restart",
            timeout_s=120,
        )
        stop.set()
        published = await producing
        await watcher.read_to_end()
    finally:
        stop.set()
        await watcher.consumer.stop()
    return published, watcher.frames, stopped_at, restarted_at


def sample_live(url: str, mode: str, fps: float, samples: int) -> tuple[list[float], list[float], int]:
    """`samples` frames of a live stream through PyAV in `mode`: (their times, every packet's arrival, decoded)."""
    deadline = time.monotonic() + 30
    while True:  # the server may not listen yet
        try:
            source = PyAVSource(url, url, mode, fps, None, (5.0, 5.0), hardware=False)
            break
        except SourceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # polling for the server to come up
    arrivals: list[float] = []
    decoded = [0]
    times: list[float] = []
    try:
        for frame in source.frames(
            lambda: arrivals.append(time.monotonic()), lambda: decoded.__setitem__(0, decoded[0] + 1)
        ):
            times.append(arrivals[0] + frame.position_s)
            if len(times) == samples:
                break
    finally:
        source.close()
    return times, arrivals, decoded[0]


@pytest.mark.parametrize(
    ("server", "mode", "fps", "decoded_share"),
    [
        ("mjpeg", "auto", 4.0, (0.0, 0.5)),  # intra-only: only the due frames are decoded
        ("rtsp", "keyframes", 1.0, (0.0, 0.2)),  # a keyframe a second
        ("rtsp", "auto", 4.0, (0.9, 1.0)),  # live with B-frames: timed on arrival, so all are decoded
    ],
)
def test_live_streams_sample_the_first_frame_due_with_the_new_decode_paths(
    tmp_path: Path,
    clip_path: Path,
    servers: list[StreamServer],
    server: str,
    mode: str,
    fps: float,
    decoded_share: tuple[float, float],
) -> None:
    stream = (mjpeg_server if server == "mjpeg" else rtsp_server)(clip_path, tmp_path)
    servers.append(stream)
    stream.start()
    times, arrivals, decoded = sample_live(stream.url, mode, fps, samples=8)
    assert len(times) == 8
    sampler = RateSampler(fps, early_s=KEYFRAME_SLACK / fps if mode == "keyframes" else 1e-6)
    for sampled in times:
        due_s = sampler.next_due_s or sampled
        assert sampler.due(sampled), "sampled before its due time"
        if mode == "keyframes":  # the keyframe of each second (they come a second apart)
            assert abs(sampled - due_s) < 0.5 / fps, (due_s, sampled)
            continue
        passed_over = [t for t in arrivals if due_s + 2e-3 < t < sampled - 2e-3]
        # decoding everything would take the first frame after the due time; B-frames may hold one back
        assert len(passed_over) <= (1 if server == "rtsp" else 0), (due_s, sampled, passed_over)
    assert times[-1] - times[0] == pytest.approx(7 / fps, abs=2.0 / STREAM_FPS), "the sampling rate is kept"
    low, high = decoded_share
    assert low * len(arrivals) <= decoded <= high * len(arrivals), f"{decoded} of {len(arrivals)} frames decoded"


def test_sigterm_stops_the_producer_cleanly_while_captures_decode(stack_state, tmp_path: Path, clip_path: Path) -> None:
    """SIGTERM mid-stream, repeated: exit status 0 each time, never an abort from a capture thread inside
    the decoder at interpreter exit (it was rc -6, "terminate called without an active exception")."""
    clips = [clip_path, FALL_CLIPS / "gmdcsa24_s1_adl10_walking_reading.mp4"]
    cameras = [
        live_camera(f"cam-{index}", str(clips[index % 2]), fps=5.0, loop=True, decode=("all", "auto")[index // 2 % 2])
        for index in range(6)
    ]
    settings = settings_for(
        stack_state,
        tmp_path,
        producers={"status_interval_s": 0.3, "status_key_prefix": f"test:{tmp_path.name}", "cameras": cameras},
    )
    env = write_config(settings, tmp_path / "config.yaml")
    for attempt in range(4):
        log_path = tmp_path / f"producer-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "producers"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            asyncio.run(until_every_camera_publishes(settings, process.pid, [c["id"] for c in cameras]))
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        assert returncode == 0, f"stop {attempt + 1}: rc {returncode}\n{log_path.read_text()[-2000:]}"


async def until_every_camera_publishes(settings: Settings, pid: int, camera_ids: list[str]) -> None:
    def publishing(status: dict) -> bool:
        return status["producer"].endswith(f":{pid}") and status["published"] > 0

    for camera_id in camera_ids:
        await status_until(settings, camera_id, publishing, f"published by producer {pid}", timeout_s=60)


def test_a_camera_behind_schedule_shows_within_10_s_and_a_detect_stream_is_sampled_instead_of_the_main(
    stack_state, tmp_path: Path, clip_path: Path, servers: list[StreamServer]
) -> None:
    slow = tmp_path / "ten-fps.mp4"  # the source sends 10 frames/s; the camera asks for 20
    write_video(slow, 50, lambda image, index: cv2.circle(image, (20 + 5 * index, 120), 20, (220, 200, 180), -1))
    detect = mjpeg_server(clip_path, tmp_path)
    servers.append(detect)
    detect.start()
    with socket.create_server(("127.0.0.1", 0)) as main_stream:  # the main stream: must never be opened
        main_url = f"rtsp://viewer:secret@127.0.0.1:{main_stream.getsockname()[1]}/main"
        metrics_port = free_port()
        settings = live_settings(
            stack_state,
            tmp_path,
            [
                live_camera("slow", str(slow), fps=20.0, loop=True, realtime=True),
                live_camera("nvr", main_url, detect_url=detect.url),
            ],
            metrics_port=metrics_port,
        )
        watcher, behind, metrics = asyncio.run(behind_and_detect_scenario(settings, metrics_port))
        main_stream.setblocking(False)
        with pytest.raises(BlockingIOError):
            main_stream.accept()  # no connection is waiting: nothing ever connected to the main stream
    assert behind["fps_target"] == 20.0 and behind["fps_sampled"] < 15.0
    assert behind["behind"] > 0 and behind["behind_for_s"] > 0
    assert metric_value(metrics, 'fallwatch_producer_behind_total{camera="slow",room="room-slow"}') > 0
    assert metric_value(metrics, 'fallwatch_producer_behind_seconds{camera="slow"}') > 0
    assert metric_value(metrics, 'fallwatch_producer_fps_target{camera="slow"}') == 20.0
    assert 'fallwatch_producer_capture_to_send_seconds{camera="slow",stat="max"}' in metrics
    nvr = watcher.of("nvr")
    assert len(nvr) >= 5 and {(f.width, f.height) for f in nvr} == {(320, 240)}, "frames of the detect stream"


def metric_value(metrics: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", metrics, re.MULTILINE)
    assert match is not None, f"{sample} not in the metrics"
    return float(match.group(1))


async def behind_and_detect_scenario(settings: Settings, metrics_port: int) -> tuple[FrameWatcher, dict, str]:
    stop = asyncio.Event()
    producing = asyncio.create_task(run_producers(settings, stop))
    watcher = FrameWatcher(settings)
    await watcher.consumer.start()
    try:
        # visible within 10 s of the producer starting, in Redis (cameras status) and in the metrics
        behind = await status_until(settings, "slow", lambda s: s["behind_for_s"] > 0, "behind", timeout_s=10)
        await watcher.until(lambda: len(watcher.of("nvr")) >= 5 and watcher.of("slow"), "frames of both cameras")
        metrics = await asyncio.to_thread(metrics_text, metrics_port)
    finally:
        stop.set()
        await watcher.consumer.stop()
    await producing
    return watcher, behind, metrics


def test_a_stop_during_a_kafka_outage_ends_and_says_what_was_not_sent(
    tmp_path: Path, clip_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`docker compose stop` while the broker is down: the frames still queued or unacknowledged cannot go
    out; the producer gives Kafka `drain_timeout_s`, then exits and says how many were lost."""
    stack = LocalStack(tmp_path / "stack", cache_dir=REPO / ".cache", partitions=1)  # its broker is stopped
    settings = Settings(
        state_dir=tmp_path / "state",
        producers={
            "status_key_prefix": f"test:{tmp_path.name}",
            "drain_timeout_s": 2.0,
            "cameras": [live_camera("file", str(clip_path), loop=True, realtime=True)],
        },
    )
    state = stack.up(topic_specs(settings))
    try:
        settings = on_stack(settings, state)

        async def scenario() -> dict[str, int]:
            stop = asyncio.Event()
            producing = asyncio.create_task(run_producers(settings, stop))
            await status_until(settings, "file", lambda s: s["published"] >= 3, "frames published")
            await asyncio.to_thread(stack.stop_kafka)
            before = await status_until(settings, "file", lambda s: True, "reporting")
            await status_until(settings, "file", lambda s: s["frames_in"] >= before["frames_in"] + 4, "captures")
            stop.set()
            return await asyncio.wait_for(producing, 120)  # before the fix it waited for the broker forever

        with caplog.at_level(logging.WARNING, logger="producers.service"):
            published = asyncio.run(scenario())
    finally:
        stack.down()
    lines = [record.getMessage() for record in caplog.records if record.name == "producers.service"]
    lost = [line for line in lines if "not acknowledged by Kafka within 2 s of the stop" in line]
    assert len(lost) == 1 and lost[0].startswith("camera file: "), lines
    assert published["file"] >= 3


def test_a_stream_whose_packets_stop_decoding_is_reconnected(stack_state, tmp_path: Path) -> None:
    """Packets keep arriving but none decodes (a camera's firmware glitch): before, the camera looked like it
    was streaming while it published nothing, not even heartbeats; now the connection ends as a stall does."""
    stop_serving = threading.Event()
    picture = cv2.imencode(".jpg", np.full((240, 320, 3), 120, np.uint8))[1].tobytes()
    garbage = np.random.default_rng(0).bytes(len(picture))

    class GlitchingCamera(QuietHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace;boundary=frame")
            self.end_headers()
            parts = 0
            while not stop_serving.is_set():
                body = picture if parts < 12 else garbage  # 3 s of pictures, then bytes that do not decode
                head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                try:
                    self.wfile.write(head + body + b"\r\n")
                except OSError:
                    return  # the producer hung up
                parts += 1
                stop_serving.wait(1 / STREAM_FPS)  # the camera's pace

    with http_server(GlitchingCamera) as url:
        settings = live_settings(stack_state, tmp_path, [live_camera("glitching", f"{url}/cam.mjpg")])

        async def scenario() -> dict:
            stop = asyncio.Event()
            producing = asyncio.create_task(run_producers(settings, stop))
            try:
                await status_until(settings, "glitching", lambda s: s["published"] >= 2, "publishing")
                return await status_until(
                    settings, "glitching", lambda s: s["reconnects"] >= 1, "reconnected after the glitch"
                )
            finally:
                stop.set()
                await producing

        try:
            status = asyncio.run(scenario())
        finally:
            stop_serving.set()
    assert "no frame decoded for 2 s, though packets arrive" in (status["last_error"] or ""), status
