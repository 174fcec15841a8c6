"""Decoding only what is sampled, through PyAV (FFmpeg's libraries): the `auto` and `keyframes` modes.

The demuxer hands over every compressed packet (cheap); each packet's time says, before any
decoding, whether a sampled frame can be in it:
- `auto`: a packet at or after the next due time is decoded in full; any other is decoded with
  `skip_frame` NONREF, so the reference frames later frames depend on are still decoded but
  non-reference ones (B-frames, mostly) are dropped before they cost anything. Intra-only codecs
  (MJPEG) depend on nothing: their other packets are not decoded at all. The sampled frame is
  thus the same one decoding everything would pick. Live streams are timed by arrival, so a live
  stream with B-frames (frames arrive out of order) is decoded in full.
  A file is also read ahead to its next keyframe (compressed packets, cheap): when no frame left
  in the group of pictures is due, the rest of it is not decoded at all, since nothing after the
  next keyframe depends on it (decoding resumes there, as after a seek). Live streams are not
  read ahead: waiting for the next keyframe would delay every frame by up to a GOP.
- `keyframes`: only keyframes reach the decoder; the cheapest, and right while keyframes come at
  least as often as the sampling rate. When they come less often the camera switches to `auto`
  at the next keyframe (one warning line), so its sampling rate is kept.
Frames are converted to BGR at the detect size in one step (swscale), not at full size first.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import av
import av.error
from av.codec.hwaccel import HWAccel, hwdevices_available

from core.settings import CameraSettings
from core.urls import redact, source_kind
from producers.pictures import BgrPicture, Picture, YuvPicture
from producers.video import RateSampler, SampledFrame, SourceError

log = logging.getLogger(__name__)

# hardware decoders to try, in this order, among those FFmpeg was built with
HARDWARE_DEVICES = ("cuda", "vaapi", "qsv", "videotoolbox", "d3d11va", "drm")
KEYFRAME_SLACK = 0.1  # of the sampling interval: a live stream's keyframes are timed by arrival, with jitter
LOOKAHEAD_PACKETS = 600  # a file's read-ahead bound: a longer GOP is decoded as if its end were unknown


def open_container(url: str, options: dict[str, str], timeout: tuple[float, float] | None, hardware: bool) -> Any:
    """The opened source; with `hardware`, decoding on the first hardware device that works, else the CPU."""
    devices = [device for device in HARDWARE_DEVICES if hardware and device in hwdevices_available()]
    for device in devices:
        try:
            container = av.open(
                url, options=options, timeout=timeout, hwaccel=HWAccel(device_type=device, allow_software_fallback=True)
            )
        except av.error.FFmpegError as exc:
            if exc.filename is not None:  # the source failed (refused, not found, timed out), not the device
                raise
            continue  # listed by the build but absent on this machine
        if container.streams.video and container.streams.video[0].codec_context.is_hwaccel:
            return container
        container.close()
    if hardware:
        log.info("no hardware decoder works here (tried %s); decoding on the CPU", ", ".join(devices) or "none")
    return av.open(url, options=options, timeout=timeout)


class PyAVSource:
    """One open connection to a video source, sampled at `fps` with the given decode mode."""

    def __init__(
        self,
        url: str,
        shown_url: str,
        mode: str,
        fps: float,
        size: tuple[int, int] | None,
        timeouts_s: tuple[float, float],
        hardware: bool,
    ) -> None:
        self.shown_url = redact(shown_url)
        self.mode = mode
        self.interval_s = 1.0 / fps
        self.size = size
        self.live = source_kind(shown_url) != "file"
        # packets that keep arriving but never decode (a firmware glitch) must end the connection like a stall
        # (an intra-only stream decodes only the frames due: a slow camera's interval counts too)
        self.undecodable_after_s = max(timeouts_s[1], 2 * self.interval_s)
        options = {"rtsp_transport": "tcp"} if url.startswith("rtsp") else {}
        try:
            self.container = open_container(
                url.removeprefix("file://"), options, timeouts_s if self.live else None, hardware
            )
        except (av.error.FFmpegError, OSError):
            raise SourceError(f"cannot open video source {self.shown_url}") from None
        if not self.container.streams.video:
            self.container.close()
            raise SourceError(f"no video stream in {self.shown_url}")
        self.stream = self.container.streams.video[0]
        # one thread per camera: frame threads would delay output and ignore skip_frame per packet
        self.stream.thread_type = "SLICE"
        self.stream.codec_context.thread_count = 1
        self.intra_only = self.stream.codec_context.codec.intra_only
        # a float: exact enough for any file's length, and a Fraction per packet costs more than the demuxing
        self.seconds_per_tick = float(self.stream.time_base or Fraction(1, 90_000))

    def close(self) -> None:
        self.container.close()

    def end_s(self) -> float | None:
        """Where the file's video ends, in the frames' positions; None when unknown (a live stream)."""
        if self.stream.duration is not None and self.stream.time_base is not None:
            return float((self.stream.duration + (self.stream.start_time or 0)) * self.stream.time_base)
        if self.container.duration is not None:
            return self.container.duration / av.time_base
        return None

    def frames(self, on_grab: Callable[[], None], on_decode: Callable[[], None]) -> Iterator[SampledFrame]:
        """The sampled frames, until the source ends or a read fails (or times out)."""
        # keyframes arrive a GOP apart: one a little early must not cost a whole GOP
        sampler = RateSampler(
            1.0 / self.interval_s, KEYFRAME_SLACK * self.interval_s if self.mode == "keyframes" else 1e-6
        )
        context = self.stream.codec_context
        first_s: float | None = None
        last_keyframe_s: float | None = None
        skipped_gop = False
        decoded_at = time.monotonic()
        for packet, gop_last_s in self.packets():
            on_grab()
            if self.live and time.monotonic() - decoded_at > self.undecodable_after_s:
                raise SourceError(
                    f"{self.shown_url}: no frame decoded for {self.undecodable_after_s:g} s, though packets arrive"
                )
            t_s = time.monotonic() if self.live else self.file_time(packet_pts(packet))
            if t_s is None:
                continue
            if rest_of_gop_unneeded(sampler, gop_last_s):
                skipped_gop = True
                continue
            if skipped_gop:  # at a keyframe: the frames still held are not due, start clean as after a seek
                context.flush_buffers()
                skipped_gop = False
            first_s = t_s if first_s is None else first_s
            if self.mode == "keyframes":
                if not packet.is_keyframe:
                    continue
                if self.keyframes_too_rare(last_keyframe_s, t_s):
                    self.mode, sampler.early_s = "auto", 1e-6
                last_keyframe_s = t_s
            due = sampler.next_due_s is None or t_s + sampler.early_s >= sampler.next_due_s or self.reordered_live()
            if self.intra_only and not due:
                continue
            context.skip_frame = "DEFAULT" if due or self.mode == "keyframes" else "NONREF"
            for frame in self.decoded(packet):
                on_decode()
                decoded_at = time.monotonic()
                # live: the clock when the packet that completed the frame arrived, as OpenCV's grab()
                frame_s = t_s if self.live else self.file_time(frame.pts)
                if frame_s is not None and sampler.due(frame_s):
                    yield SampledFrame(frame_s - first_s, self.image(frame))
        context.skip_frame = "DEFAULT"
        for frame in self.decoded(None):  # the frames the decoder still holds (reordering)
            on_decode()
            frame_s = None if self.live else self.file_time(frame.pts)
            if frame_s is not None and first_s is not None and sampler.due(frame_s):
                yield SampledFrame(frame_s - first_s, self.image(frame))

    def packets(self) -> Iterator[tuple[av.Packet, float | None]]:
        """Each packet with the latest file time of the frames left in its GOP, itself included (None: live, or
        not known yet). A file is read ahead to the next keyframe, at most LOOKAHEAD_PACKETS; a live stream is not.
        """
        pending: deque[av.Packet] = deque()
        for packet in self.demuxed():
            if self.live:
                yield packet, None
                continue
            if packet.is_keyframe and pending:
                yield from self.gop(pending)
            pending.append(packet)
            if len(pending) > LOOKAHEAD_PACKETS:
                yield pending.popleft(), None
        yield from self.gop(pending)  # the file's end ends its last GOP too

    def gop(self, pending: deque[av.Packet]) -> Iterator[tuple[av.Packet, float | None]]:
        """The packets read ahead to the end of their GOP, each with the GOP's latest frame time."""
        gop_last_s = max((self.file_time(packet_pts(packet)) or 0.0 for packet in pending), default=None)
        while pending:
            yield pending.popleft(), gop_last_s

    def demuxed(self) -> Iterator[av.Packet]:
        """The stream's packets until it ends; a failed or timed-out read ends it too (the caller reconnects)."""
        demuxer = self.container.demux(self.stream)
        while True:
            try:
                packet = next(demuxer)
            except (StopIteration, av.error.FFmpegError, OSError):
                return
            if packet.size:
                yield packet

    def decoded(self, packet: av.Packet | None) -> list[av.VideoFrame]:
        """The frames one packet completes; a corrupt packet yields none (the stream goes on)."""
        try:
            return self.stream.codec_context.decode(packet)
        except av.error.InvalidDataError:
            return []

    def reordered_live(self) -> bool:
        """A live stream with B-frames: its frames are timed on arrival, so which one falls due is only known
        after decoding; every frame is decoded (files are timed by their own timestamps and need not)."""
        return self.live and self.stream.codec_context.has_b_frames > 0

    def file_time(self, pts: int | None) -> float | None:
        return None if pts is None else pts * self.seconds_per_tick

    def keyframes_too_rare(self, last_keyframe_s: float | None, t_s: float) -> bool:
        """Keyframes further apart than the sampling interval (one warning line): time to decode in `auto`."""
        if last_keyframe_s is None or t_s - last_keyframe_s <= (1 + KEYFRAME_SLACK) * self.interval_s:
            return False
        log.warning(
            "%s: keyframes come every %.2f s, less often than sampling at %g fps; decoding it in auto mode",
            self.shown_url,
            t_s - last_keyframe_s,
            1.0 / self.interval_s,
        )
        return True

    def image(self, frame: av.VideoFrame) -> Picture:
        """The frame's own YUV planes where JPEG can take them, else BGR converted at the detect size."""
        planes = YuvPicture.of_frame(frame)
        if planes is not None:
            return planes.resized(self.size)
        if self.size is None:
            return BgrPicture(frame.to_ndarray(format="bgr24"))
        width, height = self.size
        return BgrPicture(frame.to_ndarray(format="bgr24", width=width, height=height, interpolation="AREA"))


def sample_file(path: str, fps: float) -> Iterator[SampledFrame]:
    """The frames a file camera samples from `path` with the default decode mode, as fast as they decode:
    offline replays and `eval` see the very pictures the producer would publish."""
    mode = CameraSettings.model_fields["decode"].default
    source = PyAVSource(path, path, mode, fps, None, timeouts_s=(0.0, 0.0), hardware=False)  # files: none
    try:
        yield from source.frames(lambda: None, lambda: None)
    finally:
        source.close()


def rest_of_gop_unneeded(sampler: RateSampler, gop_last_s: float | None) -> bool:
    """Every frame left in the GOP comes before the next due time: none of them is needed."""
    if gop_last_s is None or sampler.next_due_s is None:
        return False
    return gop_last_s + sampler.early_s < sampler.next_due_s


def packet_pts(packet: av.Packet) -> int | None:
    return packet.pts if packet.pts is not None else packet.dts
