"""The producers' decode modes on real H.264 files, and the behind-schedule accounting of the capture loop.

Each new decode path must sample the frames decoding everything samples: the same capture times
(within one source frame of the schedule) and the same pictures, while decoding fewer frames.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
import pytest
from av.codec.hwaccel import hwdevices_available

from core.images import decode_jpeg_rgb
from core.settings import CameraSettings, ProducerSettings
from producers.camera import CameraCapture, CameraStats, CapturedFrame
from producers.decoding import HARDWARE_DEVICES, PyAVSource
from producers.masks import PrivacyMasks
from producers.pictures import YuvPicture
from producers.video import OpenCVSource, RateSampler, SampledFrame, SourceError
from tests.alerting_helpers import QuietHandler, http_server
from tests.conftest import FALL_CLIPS

# the shared clips: 640×480 and 1280×720 H.264 at 30 fps, with non-reference B-frames
SHARED_CLIPS = [
    FALL_CLIPS / "gmdcsa24_s1_fall13_backward_fall.mp4",
    FALL_CLIPS / "gmdcsa24_s1_adl10_walking_reading.mp4",
]
TIMEOUTS_S = (10.0, 10.0)


@dataclass
class Sampled:
    frames: list[SampledFrame] = field(default_factory=list)
    read: int = 0
    decoded: int = 0

    def positions(self) -> list[float]:
        return [frame.position_s for frame in self.frames]


def sample(source: OpenCVSource | PyAVSource) -> Sampled:
    result = Sampled()

    def on_read() -> None:
        result.read += 1

    def on_decode() -> None:
        result.decoded += 1

    try:
        result.frames = list(source.frames(on_read, on_decode))
    finally:
        source.close()
    return result


def h264_video(path: Path, source: Path, fps: int, keyframe_every: int, seconds: float = 6.0) -> Path:
    """`source` re-encoded to H.264 at `fps` with a keyframe every `keyframe_every` frames (and B-frames)."""
    subprocess.run(
        [
            *("ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-stream_loop", "-1", "-t", str(seconds)),
            *("-i", str(source), "-an", "-vf", f"scale=320:240,fps={fps}", "-c:v", "libx264", "-preset", "veryfast"),
            *("-bf", "2", "-g", str(keyframe_every), "-keyint_min", str(keyframe_every), "-sc_threshold", "0"),
            str(path),
        ],
        check=True,
        timeout=120,
    )
    return path


def frame_times(video: Path) -> list[float]:
    """Every frame's time in the file, from its first frame, in presentation order."""
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        time_base = stream.time_base or Fraction(1, 90_000)
        times = sorted(float(p.pts * time_base) for p in container.demux(stream) if p.pts is not None)
    return [t - times[0] for t in times]


def assert_on_schedule(positions: list[float], fps: float, times: list[float]) -> None:
    """Each sample is the first frame at or after its due time: within one source frame of the schedule."""
    sampler = RateSampler(fps)
    due = [t for t in times if sampler.due(t)]
    assert positions == pytest.approx(due[: len(positions)], abs=1e-3)
    assert len(positions) >= len(due) - 1, "no due time left unsampled (the last may fall in the decoder's tail)"


@pytest.mark.parametrize("clip", SHARED_CLIPS, ids=lambda clip: clip.stem)
def test_auto_decodes_less_and_samples_the_frames_decoding_everything_does(clip: Path) -> None:
    if not clip.is_file():
        pytest.fail(f"{clip} is missing: the shared datasets must be beside the checkout")
    everything = sample(OpenCVSource(str(clip), str(clip), 2.0, TIMEOUTS_S))
    auto = sample(PyAVSource(str(clip), str(clip), "auto", 2.0, None, TIMEOUTS_S, hardware=False))
    assert auto.positions() == pytest.approx(everything.positions(), abs=1e-3)
    assert_on_schedule(auto.positions(), 2.0, frame_times(clip))
    assert len(auto.frames) >= 7, "a 4 s clip at 2 fps"
    assert auto.read == everything.read, "every packet is read"
    assert auto.decoded < 0.6 * everything.decoded, "non-reference frames that are not due are never decoded"
    for ours, theirs in zip(auto.frames, everything.frames, strict=True):
        assert ours.picture.bgr().shape == theirs.picture.bgr().shape
        difference = np.abs(ours.picture.bgr().astype(int) - theirs.picture.bgr().astype(int)).mean()
        assert difference < 2.0, "the same picture (colour conversion aside), not a neighbour or a smeared one"


def test_auto_decodes_straight_to_the_detect_size(clip_path: Path) -> None:
    auto = sample(PyAVSource(str(clip_path), str(clip_path), "auto", 2.0, (160, 120), TIMEOUTS_S, hardware=False))
    assert {frame.picture.bgr().shape for frame in auto.frames} == {(120, 160, 3)}


def test_hardware_decode_falls_back_to_the_cpu_where_no_device_works(
    clip_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # FFmpeg's build lists devices (CUDA, QSV, …) that a machine without them cannot open: each is tried,
    # then the CPU decodes, the same frames. The hardware branch itself is unverified (no GPU here).
    with caplog.at_level(logging.INFO, logger="producers.decoding"):
        source = PyAVSource(str(clip_path), str(clip_path), "auto", 2.0, None, TIMEOUTS_S, hardware=True)
    on_hardware = source.stream.codec_context.is_hwaccel
    hardware = sample(source)
    cpu = sample(PyAVSource(str(clip_path), str(clip_path), "auto", 2.0, None, TIMEOUTS_S, hardware=False))
    if not on_hardware:
        assert caplog.text.count("no hardware decoder works here") == 1
        assert "decoding on the CPU" in caplog.text
        assert hardware.decoded == cpu.decoded
    assert len(hardware.frames) >= 7
    assert hardware.positions() == pytest.approx(cpu.positions(), abs=1e-3)
    for ours, theirs in zip(hardware.frames, cpu.frames, strict=True):
        assert np.abs(ours.picture.bgr().astype(int) - theirs.picture.bgr().astype(int)).mean() < 2.0


def test_a_source_that_cannot_be_opened_is_opened_once_not_once_per_hardware_device(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An offline camera is the source's fault: trying it again for each hardware device costs an open
    # timeout per device on every reconnect, and the log would blame the decoders.
    assert [device for device in HARDWARE_DEVICES if device in hwdevices_available()], "devices to try"
    requests: list[str] = []

    class OfflineCamera(QuietHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.reply(404)

    with (
        http_server(OfflineCamera) as url,
        caplog.at_level(logging.INFO, logger="producers.decoding"),
        pytest.raises(SourceError, match="cannot open video source"),
    ):
        PyAVSource(f"{url}/camera.mp4", f"{url}/camera.mp4", "auto", 2.0, None, TIMEOUTS_S, hardware=True)
    assert requests == ["/camera.mp4"]
    assert "no hardware decoder works here" not in caplog.text


def test_keyframes_mode_decodes_only_keyframes_while_they_come_often_enough(tmp_path: Path, clip_path: Path) -> None:
    # 15 fps, a keyframe every second: sampling at 1 fps needs nothing else
    video = h264_video(tmp_path / "gop15.mp4", clip_path, fps=15, keyframe_every=15)
    keyframes = sample(PyAVSource(str(video), str(video), "keyframes", 1.0, None, TIMEOUTS_S, hardware=False))
    assert len(keyframes.frames) == 6 and keyframes.decoded == 6, "six seconds, six keyframes, nothing else decoded"
    assert_on_schedule(keyframes.positions(), 1.0, frame_times(video))
    everything = sample(OpenCVSource(str(video), str(video), 1.0, TIMEOUTS_S))
    assert keyframes.positions() == pytest.approx(everything.positions(), abs=1e-3)


def test_keyframes_rarer_than_the_sampling_rate_switch_to_auto(
    tmp_path: Path, clip_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    video = h264_video(tmp_path / "gop15.mp4", clip_path, fps=15, keyframe_every=15)
    with caplog.at_level(logging.WARNING, logger="producers.decoding"):
        sampled = sample(PyAVSource(str(video), str(video), "keyframes", 2.0, None, TIMEOUTS_S, hardware=False))
    assert "keyframes come every 1.00 s, less often than sampling at 2 fps" in caplog.text
    # the first second had one keyframe only; from the second keyframe on every slot is sampled
    positions = [position for position in sampled.positions() if position >= 1.0]
    assert len(positions) == 10
    assert_on_schedule(positions, 2.0, [t for t in frame_times(video) if t >= 1.0])


def throttled_capture(video: Path, fps: float, seconds: float, emit_s: float) -> tuple[CameraStats, list[float]]:
    """A realtime file camera whose hand-over to Kafka takes `emit_s` a frame; runs `seconds`."""
    camera = CameraSettings(
        id="slow", room="1", url=str(video), fps=fps, loop=True, realtime=True, motion={"enabled": False}
    )
    stats, stop, emitted = CameraStats(), threading.Event(), []

    def slow_emit(_frame: CapturedFrame) -> None:
        emitted.append(time.monotonic())
        time.sleep(emit_s)  # the throttle under test: a loop slower than its schedule, not a synchronisation

    thread = threading.Thread(target=CameraCapture(camera, ProducerSettings(), stats, slow_emit, stop).run)
    thread.start()
    stop.wait(seconds)  # the measured interval itself
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    return stats, emitted


def test_a_file_camera_that_fails_part_way_ends_there_instead_of_starting_over(tmp_path: Path, clip_path: Path) -> None:
    video = h264_video(tmp_path / "short.mp4", clip_path, fps=15, keyframe_every=15, seconds=2.0)
    camera = CameraSettings(
        id="flaky", room="1", url=str(video), fps=4.0, loop=False, realtime=False, motion={"enabled": False}
    )
    stats, stop, emitted = CameraStats(), threading.Event(), []

    def fails_at_the_third(frame: CapturedFrame) -> None:
        emitted.append(frame.captured_at)
        if len(emitted) == 3:
            raise RuntimeError("the hand-over failed")

    settings = ProducerSettings(reconnect_initial_s=0.01, reconnect_max_s=0.05)
    thread = threading.Thread(target=CameraCapture(camera, settings, stats, fails_at_the_third, stop).run)
    thread.start()
    thread.join(timeout=60)
    still_reading = thread.is_alive()
    stop.set()
    thread.join(timeout=30)
    assert not still_reading, "the file ended"
    assert len(emitted) == 3, "no frame of the file published twice"
    assert stats.state == "ended" and stats.last_error == "RuntimeError: the hand-over failed"


@pytest.mark.parametrize("decode", ["auto", "all"])
def test_a_long_file_read_faster_than_it_plays_has_no_frame_captured_in_the_future(tmp_path: Path, decode: str) -> None:
    # Capture times keep the file's spacing; anchored at the start of reading, a file of 400 s read in
    # seconds would reach 400 s ahead, and every frame past `capture_time.max_ahead_s` (300) be refused.
    video = tmp_path / "long.mp4"
    subprocess.run(
        [
            *("ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=2"),
            *("-t", "400", "-c:v", "libx264", "-preset", "veryfast", "-g", "20", str(video)),
        ],
        check=True,
    )
    camera = CameraSettings(
        id="replay", room="1", url=str(video), fps=0.5, realtime=False, decode=decode, motion={"enabled": False}
    )
    stats, stop, emitted = CameraStats(), threading.Event(), []
    thread = threading.Thread(target=CameraCapture(camera, ProducerSettings(), stats, emitted.append, stop).run)
    thread.start()
    thread.join(timeout=120)
    done_at = datetime.now(UTC)
    stop.set()
    thread.join(timeout=30)
    times = [frame.captured_at for frame in emitted]
    assert len(times) == 200 and stats.state == "ended"
    assert max(times) <= done_at, "no frame of the file captured after it was read"
    assert (times[-1] - times[0]).total_seconds() == pytest.approx(398.0, abs=1.0), "the file's own spacing"
    assert all((later - earlier).total_seconds() == pytest.approx(2.0, abs=0.01) for earlier, later in pairwise(times))


def test_a_throttled_capture_loop_counts_the_slots_it_could_not_sample(
    tmp_path: Path, clip_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    video = h264_video(tmp_path / "long.mp4", clip_path, fps=15, keyframe_every=15, seconds=12.0)
    with caplog.at_level(logging.WARNING, logger="producers.camera"):
        stats, emitted = throttled_capture(video, fps=4.0, seconds=6.0, emit_s=0.5)
    slots = round((emitted[-1] - emitted[0]) * 4.0) + 1
    assert stats.sampled == len(emitted)
    assert stats.sampled <= 2.2 * 6, "the loop can take at most 2 frames/s"
    assert abs(stats.sampled + stats.behind - slots) <= 1, "every slot is either sampled or counted behind"
    assert stats.behind >= slots // 3
    assert stats.behind_for_s() > 3.0
    assert "camera slow: behind schedule for" in caplog.text, "one warning line after a few seconds"


def test_a_capture_loop_that_keeps_up_is_never_behind(tmp_path: Path, clip_path: Path) -> None:
    video = h264_video(tmp_path / "long.mp4", clip_path, fps=15, keyframe_every=15, seconds=12.0)
    stats, emitted = throttled_capture(video, fps=2.0, seconds=4.0, emit_s=0.0)
    assert len(emitted) >= 7 and stats.behind == 0 and stats.behind_for_s() == 0.0


def test_a_group_of_pictures_without_a_due_frame_is_not_decoded_at_all(tmp_path: Path, clip_path: Path) -> None:
    # a keyframe every second, sampled every two: every other GOP holds no due frame, and in the others
    # nothing after the sampled keyframe is needed
    video = h264_video(tmp_path / "gop15.mp4", clip_path, fps=15, keyframe_every=15)
    auto = sample(PyAVSource(str(video), str(video), "auto", 0.5, None, TIMEOUTS_S, hardware=False))
    everything = sample(OpenCVSource(str(video), str(video), 0.5, TIMEOUTS_S))
    assert auto.positions() == pytest.approx(everything.positions(), abs=1e-3)
    assert_on_schedule(auto.positions(), 0.5, frame_times(video))
    assert len(auto.frames) == 3, "the keyframes at 0, 2 and 4 s"
    # each sampled keyframe, and the two frames the decoder takes in before it hands a keyframe out (B-frames
    # reorder); the GOPs at 1, 3 and 5 s not at all
    assert auto.decoded <= 3 * 3
    assert auto.read == everything.read == 90, "every packet is still read"
    for ours, theirs in zip(auto.frames, everything.frames, strict=True):
        assert np.abs(ours.picture.bgr().astype(int) - theirs.picture.bgr().astype(int)).mean() < 2.0


def test_the_rest_of_a_group_of_pictures_after_its_last_due_frame_is_not_decoded(
    tmp_path: Path, clip_path: Path
) -> None:
    # keyframes every 2 s, samples every 0.5 s: the last sample of each GOP is at 1.5 s into it; the 0.5 s after
    # it (7 frames) holds nothing due, while the next keyframe is
    video = h264_video(tmp_path / "gop30.mp4", clip_path, fps=15, keyframe_every=30)
    auto = sample(PyAVSource(str(video), str(video), "auto", 2.0, None, TIMEOUTS_S, hardware=False))
    everything = sample(OpenCVSource(str(video), str(video), 2.0, TIMEOUTS_S))
    assert auto.positions() == pytest.approx(everything.positions(), abs=1e-3)
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        tail = [
            p for p in container.demux(stream) if p.pts is not None and float(p.pts * stream.time_base) % 2.0 > 1.55
        ]
    assert len(tail) >= 15, "the clip has such tails"
    assert auto.decoded <= everything.decoded - len(tail), "no frame of a GOP's tail was decoded"


def colour_picture() -> np.ndarray:
    """A 64×48 BGR picture of smooth colour gradients (JPEG keeps them well)."""
    rows, columns = np.mgrid[0:48, 0:64]
    return np.dstack([columns * 4, rows * 5, 255 - columns * 3]).astype(np.uint8)


@pytest.mark.parametrize("colour_range", [1, 2], ids=["limited", "full"])
def test_yuv_planes_go_into_the_jpeg_as_the_colours_they_are(colour_range: int) -> None:
    image = colour_picture()
    frame = av.VideoFrame.from_ndarray(image, format="bgr24").reformat(
        format="yuv420p", dst_colorspace=5, dst_color_range=colour_range
    )
    picture = YuvPicture.of_frame(frame)
    assert picture is not None
    decoded = decode_jpeg_rgb(picture.jpeg(95))
    assert decoded is not None and decoded.shape == (48, 64, 3)
    assert np.abs(decoded[..., ::-1].astype(int) - image.astype(int)).mean() < 3.0, "range and matrix kept"
    assert np.abs(picture.bgr().astype(int) - image.astype(int)).mean() < 3.0


def test_frames_in_another_matrix_or_format_are_left_to_ffmpeg_to_convert() -> None:
    frame = av.VideoFrame.from_ndarray(colour_picture(), format="bgr24")
    assert YuvPicture.of_frame(frame.reformat(format="yuv420p", dst_colorspace=1)) is None, "BT.709"
    assert YuvPicture.of_frame(frame.reformat(format="yuv422p")) is None


def test_a_mask_on_yuv_planes_leaves_no_colour_of_what_it_covers() -> None:
    image = np.zeros((48, 64, 3), np.uint8)
    image[:] = (0, 0, 255)  # red everywhere
    picture = YuvPicture.of_frame(av.VideoFrame.from_ndarray(image, format="bgr24").reformat(format="yuv420p"))
    assert picture is not None
    # the mask's edge at x = 31 splits chroma samples (each covers two columns)
    masks = PrivacyMasks([[(0.0, 0.0), (31 / 64, 0.0), (31 / 64, 1.0), (0.0, 1.0)]])
    bgr = picture.masked(masks).bgr()
    assert bgr[:, :31].max() == 0, "black up to the mask's edge, no red bleeding in from the chroma"
    assert bgr[:, 33:, 2].min() > 200, "the rest kept"
