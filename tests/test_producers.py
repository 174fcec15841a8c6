"""Camera producers without live streams: configuration mistakes, motion gating, the drop-oldest queue.

The gating tests publish video files to the real local Kafka and count what arrives.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from aiokafka.errors import KafkaConnectionError, OutOfOrderSequenceNumber

from core.images import decode_jpeg_rgb
from core.kafka_io import send, start_clients
from core.settings import CONFIG_ENV, CameraSettings, ConfigError, Settings, load_settings
from core.urls import redact, source_kind
from fallwatch.stack import free_port
from producers.camera import CapturedFrame, backoff_delay
from producers.main import video_cameras
from producers.service import CameraPublisher, KafkaOutput, check_cameras, run_producers
from schemas import Frame
from tests.conftest import consume_until, settings_for

REPO = Path(__file__).resolve().parents[1]


def fallwatch(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fallwatch", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_config_mistakes_give_one_line_each_without_credentials(tmp_path: Path) -> None:
    cameras = [
        {"id": "cam-1", "room": "101", "url": "rtsp://admin:hunter2@10.0.0.5:554/stream", "fps_target": 2},
        {"id": "cam-2", "room": "102", "url": "ftp://admin:hunter2@10.0.0.6/feed"},
        {"id": "cam-3", "room": "103", "url": "rtsp://10.0.0.7:99999/stream"},
        {"id": "cam-1", "room": "104", "url": "http://10.0.0.8/mjpeg"},
    ]
    config = tmp_path / "cameras.yaml"
    config.write_text(yaml.safe_dump({"producers": {"cameras": cameras}}))
    result = fallwatch("producer", config=config)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: invalid settings (3 problems):"
    assert [line.strip() for line in lines[1:]] == [
        "producers.cameras.0.fps_target: unknown key",
        "producers.cameras.1.url: unsupported scheme 'ftp' in ftp://***@10.0.0.6/feed "
        "(use rtsp://, rtsps://, http://, https://, a file path or /dev/videoN)",
        "producers.cameras.2.url: invalid port in rtsp://10.0.0.7:99999/stream",
    ]
    assert "hunter2" not in result.stderr
    # ids are compared once every camera is valid on its own
    del cameras[0]["fps_target"]
    cameras[1]["url"] = "rtsps://admin:hunter2@10.0.0.6/feed"
    cameras[2]["url"] = "rtsp://10.0.0.7:8554/stream"
    config.write_text(yaml.safe_dump({"producers": {"cameras": cameras}}))
    result = fallwatch("producer", config=config)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: invalid settings: producers.cameras: duplicate camera id 'cam-1'"


def test_missing_video_files_are_reported_at_start_up(tmp_path: Path) -> None:
    settings = Settings(
        producers={
            "cameras": [
                {"id": "a", "room": "1", "url": str(tmp_path / "nope.mp4")},
                {"id": "b", "room": "2", "url": "http://127.0.0.1:1/x", "enabled": False},
            ]
        }
    )
    with pytest.raises(ConfigError) as caught:
        check_cameras(settings.producers)
    assert str(caught.value).splitlines() == [
        "camera configuration:",
        f"  camera a: video file {tmp_path / 'nope.mp4'} does not exist",
    ]
    settings.producers.cameras[0].enabled = False
    with pytest.raises(ConfigError, match="no enabled cameras"):
        check_cameras(settings.producers)


def test_example_camera_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(REPO / "config" / "fallwatch.example.yaml"))
    producers = load_settings().producers
    camera = producers.cameras[0]
    assert camera.motion.enabled and camera.motion.heartbeat_s > 0
    documented = yaml.safe_load((REPO / "config" / "fallwatch.example.yaml").read_text())["producers"]
    assert set(documented) == set(type(producers).model_fields)
    assert set(documented["cameras"][0]) == set(CameraSettings.model_fields)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:p@ss@cam.local/stream", "rtsp://***@cam.local/stream"),  # '@' in the password
        ("rtsp://admin:pa/ss@cam.local:554/s", "rtsp://***@cam.local:554/s"),  # '/' in the password
        ("rtsp://admin:a:b@c@10.0.0.5", "rtsp://***@10.0.0.5"),
        ("rtsp://admin@cam.local/s", "rtsp://***@cam.local/s"),
        (
            "http://cam.local/video.cgi?user=admin&pwd=s3cret&res=hd",
            "http://cam.local/video.cgi?user=***&pwd=***&res=hd",
        ),
        ("https://cam.local/mjpeg?token=abc123", "https://cam.local/mjpeg?token=***"),
        ("cannot open rtsp://u:p@ss@cam/x (timeout)", "cannot open rtsp://***@cam/x (timeout)"),
    ],
)
def test_redact_hides_credentials_of_any_url_shape(url: str, shown: str) -> None:
    assert redact(url) == shown
    for secret in ("p@ss", "pa/ss", "a:b@c", "s3cret", "abc123"):
        assert secret not in redact(url)


def test_redact_hides_credentials_only() -> None:
    assert redact("rtsp://user:p%40ss@cam.local:554/s?x=1") == "rtsp://***@cam.local:554/s?x=1"
    assert redact("http://cam.local/mjpeg") == "http://cam.local/mjpeg"
    assert redact("/videos/a@b.mp4") == "/videos/a@b.mp4"


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    for attempt, ceiling in ((0, 1.0), (1, 2.0), (3, 8.0), (10, 30.0)):
        delays = [backoff_delay(attempt, 1.0, 30.0) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10, "jittered, not in lock step"


def test_a_camera_failing_for_days_is_still_retried_at_the_cap() -> None:
    """Failures count up while a camera stays offline (a weekend, say); the 1024th must not overflow the
    backoff and end the camera's capture thread for good."""
    assert all(15.0 <= backoff_delay(attempt, 1.0, 30.0) <= 30.0 for attempt in (1023, 1024, 10**6))


def test_a_stable_device_name_is_a_device_not_a_missing_file() -> None:
    """Sites with several USB cameras name them by /dev/v4l/by-id (the /dev/videoN numbers move at reboot)."""
    for url in ("/dev/video0", "/dev/v4l/by-id/usb-Logitech_C920-video-index0", "/dev/v4l/by-path/pci-0:1-video"):
        assert source_kind(url) == "device"
    settings = Settings(producers={"cameras": [{"id": "a", "room": "1", "url": "/dev/v4l/by-id/usb-cam-video-index0"}]})
    assert [camera.id for camera in check_cameras(settings.producers)] == ["a"], "not refused as a missing file"


def test_video_cameras_take_ids_no_configured_camera_has(tmp_path: Path) -> None:
    video = tmp_path / "ward.mp4"
    video.write_bytes(b"")
    assert [camera.id for camera in video_cameras([video, video], 2.0, {"cam-1", "cam-3"})] == ["cam-2", "cam-4"]
    with pytest.raises(ConfigError, match="fps: Input should be greater than 0"):
        video_cameras([video], 0.0, set())


def test_kafka_failures_are_logged_per_outage_and_its_end_too(caplog: pytest.LogCaptureFixture) -> None:
    """The first failure of each outage is logged, however many an earlier outage had, and so is its end."""
    camera = CameraSettings(id="cam-k", room="1", url="http://127.0.0.1:1/stream")

    async def scenario() -> None:
        publisher = CameraPublisher(camera, Settings(), None, asyncio.get_running_loop(), threading.Event())  # type: ignore[arg-type]
        refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        refused.set_exception(KafkaConnectionError("broker down"))
        accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        accepted.set_result(None)
        for seq in range(150):  # an outage long ago
            publisher.on_ack(seq, datetime.now(UTC), refused)
        publisher.on_ack(150, datetime.now(UTC), accepted)
        publisher.on_ack(151, datetime.now(UTC), refused)  # a new outage

    with caplog.at_level(logging.WARNING, logger="producers.service"):
        asyncio.run(scenario())
    lines = [record.getMessage() for record in caplog.records if record.name == "producers.service"]
    assert [line.split(" (")[1].split(")")[0] for line in lines if "did not accept" in line] == [
        "1 in this outage",
        "100 in this outage",
        "1 in this outage",
    ]
    assert "camera cam-k: Kafka accepts frames again, 150 not accepted" in lines


def test_full_queue_drops_the_oldest_frames_and_counts_them(tmp_path: Path) -> None:
    camera = CameraSettings(id="cam-q", room="1", url="http://127.0.0.1:1/stream")
    settings = Settings(producers={"queue_size": 3})

    async def scenario() -> tuple[list[int], int]:
        publisher = CameraPublisher(camera, settings, None, asyncio.get_running_loop(), threading.Event())  # type: ignore[arg-type]
        frame = CapturedFrame(datetime.now(UTC), 8, 8, b"jpeg", "motion")
        for _ in range(7):
            publisher.emit(frame)  # as the capture thread would
        await asyncio.sleep(0)  # let the loop run the callbacks emit scheduled
        queued = []
        while not publisher.queue.empty():
            item = publisher.queue.get_nowait()
            assert item is not None
            queued.append(item[0])
        return queued, publisher.stats.dropped

    queued, dropped = asyncio.run(scenario())
    assert queued == [4, 5, 6], "the newest frames stay"
    assert dropped == 4


def static_video(path: Path, seconds: float, fps: float = 10.0) -> Path:
    """A still scene with faint sensor noise: nothing moves."""
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (320, 240))
    base = np.full((240, 320, 3), 90, np.uint8)
    cv2.rectangle(base, (100, 60), (220, 200), (60, 120, 180), -1)
    for _ in range(int(seconds * fps)):
        noise = rng.integers(-4, 5, base.shape)
        writer.write(np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8))
    writer.release()
    return path


def file_camera(camera_id: str, url: Path, **fields: object) -> dict:
    return CameraSettings(id=camera_id, room="1", url=str(url), realtime=False, **fields).model_dump()


def test_motion_gating_static_video_yields_only_heartbeats_and_resize(
    stack_state, tmp_path: Path, clip_path: Path
) -> None:
    still = static_video(tmp_path / "still.mp4", seconds=10)
    gate = {"heartbeat_s": 2.0}
    settings = settings_for(
        stack_state,
        tmp_path,
        producers={
            "cameras": [
                file_camera("still", still, fps=5, motion=gate),
                file_camera("moving", clip_path, fps=5, motion=gate),
                file_camera("ungated", clip_path, fps=5, motion={"enabled": False}, resize=(160, 120)),
            ]
        },
    )

    async def scenario() -> tuple[dict[str, int], list[Frame]]:
        published = await run_producers(settings, asyncio.Event())
        frames = await consume_until(
            settings, settings.kafka.topics.frames, Frame, lambda m: len(m) >= sum(published.values())
        )
        return published, frames

    published, frames = asyncio.run(scenario())
    still_times = [f.captured_at for f in frames if f.camera_id == "still"]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(still_times)]
    assert published["still"] == 5, "10 s of a still scene: a heartbeat at 0, 2, 4, 6 and 8 s"
    assert all(abs(gap - 2.0) < 0.15 for gap in gaps), gaps
    assert published["ungated"] >= 18, "a 4+ s clip sampled at 5 fps"
    # the clip moves most of the time: gating keeps far more than heartbeats alone would
    assert published["moving"] >= published["ungated"] // 2 > 3
    assert len(frames) == sum(published.values())
    assert {(f.width, f.height) for f in frames if f.camera_id == "ungated"} == {(160, 120)}
    assert all(decode_jpeg_rgb(f.jpeg).shape == (120, 160, 3) for f in frames if f.camera_id == "ungated")
    for camera_id in published:
        seqs = [f.seq for f in frames if f.camera_id == camera_id]
        assert seqs == list(range(len(seqs))), "nothing dropped from a file, in order per camera"


def test_cameras_status_without_a_producer_and_without_redis(stack_state, tmp_path: Path) -> None:

    cameras = [
        {"id": "cam-7", "room": "7", "url": "rtsp://viewer:secret@127.0.0.1:8554/cam"},
        {"id": "cam-8", "room": "8", "url": "http://127.0.0.1:8080/cam.mjpg", "enabled": False},
    ]
    config = tmp_path / "cameras.yaml"
    producers = {"status_key_prefix": f"test:{tmp_path.name}", "cameras": cameras}
    config.write_text(yaml.safe_dump({"redis": {"url": stack_state.redis_url}, "producers": producers}))
    result = fallwatch("cameras", "status", config=config)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "cam-" in line]
    assert len(rows) == 2 and "no status" in rows[0] and "disabled" in rows[1]
    assert "rtsp://***@127.0.0.1:8554/cam" in rows[0] and "secret" not in result.stdout

    config.write_text(yaml.safe_dump({"redis": {"url": f"redis://127.0.0.1:{free_port()}/0"}, "producers": producers}))
    result = fallwatch("cameras", "status", config=config)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: cannot read camera status from Redis at redis://127.0.0.1:")


def test_privacy_masks_are_black_in_the_published_jpegs(stack_state, tmp_path: Path, clip_path: Path) -> None:
    right_half = [[(0.5, 0.0), (1.0, 0.0), (1.0, 1.0), (0.5, 1.0)]]
    settings = settings_for(
        stack_state,
        tmp_path,
        producers={
            "cameras": [
                file_camera("masked", clip_path, fps=2, motion={"enabled": False}, masks=right_half),
                file_camera("open", clip_path, fps=2, motion={"enabled": False}),
            ]
        },
    )

    async def scenario() -> list[Frame]:
        published = await run_producers(settings, asyncio.Event())
        return await consume_until(
            settings, settings.kafka.topics.frames, Frame, lambda m: len(m) >= sum(published.values())
        )

    frames = asyncio.run(scenario())
    masked = [decode_jpeg_rgb(f.jpeg) for f in frames if f.camera_id == "masked"]
    unmasked = [decode_jpeg_rgb(f.jpeg) for f in frames if f.camera_id == "open"]
    assert len(masked) == len(unmasked) >= 7
    width = masked[0].shape[1]
    # a 16-pixel margin: JPEG blocks that straddle the mask's edge blend both sides
    inside = slice(width // 2 + 16, None)
    assert all(image[:, inside].max() == 0 for image in masked), "nothing behind the mask leaves the producer"
    assert all(image[:, inside].mean() > 20 for image in unmasked), "the clip is not black there by itself"
    assert all(image[:, : width // 2 - 16].mean() > 20 for image in masked), "the rest of the frame is kept"


def test_a_mask_point_outside_the_frame_is_a_config_mistake() -> None:
    with pytest.raises(ValueError, match="less than or equal to 1"):
        CameraSettings(id="c", room="1", url="/v.mp4", masks=[[(0.0, 0.0), (1.5, 0.0), (1.0, 1.0)]])
    with pytest.raises(ValueError, match="at least 3 items"):
        CameraSettings(id="c", room="1", url="/v.mp4", masks=[[(0.0, 0.0), (1.0, 0.0)]])


def test_a_frames_topic_nobody_created_is_one_error_at_start_up(stack_state, tmp_path: Path, clip_path: Path) -> None:
    """With the broker's auto-creation off (as in production), every frame would fail one by one while the
    producer looked healthy; it says so once, before any camera starts."""
    settings = settings_for(stack_state, tmp_path, producers={"cameras": [file_camera("cam", clip_path, fps=2)]})
    uncreated = settings.kafka.model_copy(update={"topics": settings.kafka.topics.prefixed("never-created")})
    settings = settings.model_copy(update={"kafka": uncreated})
    with pytest.raises(ConfigError) as caught:
        asyncio.run(run_producers(settings, asyncio.Event()))
    assert str(caught.value) == (
        f"the topic {settings.kafka.topics.frames!r} does not exist on Kafka at {settings.kafka.bootstrap_servers} "
        "(create it: fallwatch topics create)"
    )


def test_a_producer_broken_for_good_is_replaced_and_the_cameras_publish_again(stack_state, tmp_path: Path) -> None:
    """aiokafka's idempotent producer ends its sender on an OutOfOrderSequenceNumber (a batch of a leaderless
    partition expired) and fails every later send: before, every camera of the process stayed silent. The
    error is raised here as the sender raises it (a leaderless partition cannot be made to order here)."""
    settings = settings_for(stack_state, tmp_path)
    camera = CameraSettings(id="cam-renewed", room="1", url="http://127.0.0.1:1/stream")

    async def scenario() -> tuple[bool, int, list[Frame]]:
        output = KafkaOutput(settings)
        await start_clients(settings, output.producer)
        broken = output.producer
        publisher = CameraPublisher(camera, settings, output, asyncio.get_running_loop(), threading.Event())
        try:
            publisher.on_failure(0, OutOfOrderSequenceNumber("the broker received an out of order sequence"))
            publisher.on_failure(1, OutOfOrderSequenceNumber("the broker received an out of order sequence"))
            assert output.renewing is not None
            await output.renewing
            frame = Frame(
                frame_id="renewed-1", camera_id=camera.id, room="1", seq=2, captured_at=datetime.now(UTC),
                width=8, height=8, jpeg=b"jpeg",
            )  # fmt: skip
            await (await send(output.producer, settings.kafka.topics.frames, camera.id, frame))
        finally:
            await output.stop()
        frames = await consume_until(settings, settings.kafka.topics.frames, Frame, lambda m: len(m) >= 1)
        return output.producer is not broken, output.renewals, frames

    replaced, renewals, frames = asyncio.run(scenario())
    assert replaced and renewals == 1, "one new producer, however many cameras saw the failure"
    assert [frame.frame_id for frame in frames] == ["renewed-1"], "the new producer delivers"


def test_a_stop_while_the_new_producer_waits_for_a_broker_that_is_down_is_not_held_up() -> None:
    """The renewal retries a broker that is down for `kafka.connect_timeout_s`: a SIGTERM meanwhile must not
    wait for it (compose kills a container 10 s after its stop)."""
    settings = Settings(kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}", "connect_timeout_s": 600.0})

    async def scenario() -> bool:
        output = KafkaOutput(settings)
        output.renew(OutOfOrderSequenceNumber("the broker received an out of order sequence"))
        assert output.renewing is not None
        renewing = output.renewing
        await asyncio.wait_for(output.stop(), 30)  # before, it waited out the 600 s of retries
        return renewing.cancelled()

    assert asyncio.run(scenario()), "the renewal was given up"
