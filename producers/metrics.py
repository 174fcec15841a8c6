"""Prometheus metrics of the producer, per camera, read from the cameras' live stats at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.metrics import ServedMetrics
from core.settings import CameraSettings, ProducerSettings
from producers.camera import CameraStats

COUNTERS = {
    "frames_in": "frames read from the source",
    "decoded": "frames decoded (the others were skipped before decoding)",
    "sampled": "frames sampled at the camera's fps",
    "behind": "sampling slots missed because the capture loop (or the source) was slower than fps",
    "published": "frames acked by Kafka",
    "skipped_motion": "sampled frames skipped because nothing moved",
    "heartbeats": "frames published without motion, as heartbeats",
    "dropped": "frames dropped because Kafka was slower than the camera (oldest first)",
    "failed": "frames Kafka did not accept",
    "reconnects": "reconnects after a failed, dropped or stalled stream",
    "stalls": "connections that delivered no frame for stall_timeout_s",
}


class ProducerCollector(Collector):
    def __init__(self, cameras: list[CameraSettings], stats: dict[str, CameraStats]) -> None:
        self.cameras = cameras
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        counters = {
            name: CounterMetricFamily(f"fallwatch_producer_{name}", help_text, labels=["camera", "room"])
            for name, help_text in COUNTERS.items()
        }
        fps_in = GaugeMetricFamily("fallwatch_producer_fps_in", "frames/s read from the source", labels=["camera"])
        fps_out = GaugeMetricFamily("fallwatch_producer_fps_out", "frames/s acked by Kafka", labels=["camera"])
        fps_target = GaugeMetricFamily("fallwatch_producer_fps_target", "configured sampling rate", labels=["camera"])
        fps_sampled = GaugeMetricFamily("fallwatch_producer_fps_sampled", "frames/s sampled", labels=["camera"])
        behind_for = GaugeMetricFamily(
            "fallwatch_producer_behind_seconds",
            "how long the camera has been behind schedule (0: on time)",
            labels=["camera"],
        )
        send_delay = GaugeMetricFamily(
            "fallwatch_producer_capture_to_send_seconds",
            "capture time to Kafka's ack over the last 10 s (stat: mean, max)",
            labels=["camera", "stat"],
        )
        queued = GaugeMetricFamily("fallwatch_producer_queued", "frames waiting for Kafka", labels=["camera"])
        age = GaugeMetricFamily(
            "fallwatch_producer_last_frame_age_seconds", "seconds since the last frame was read", labels=["camera"]
        )
        for camera in self.cameras:
            stats = self.stats[camera.id]
            for name, family in counters.items():
                family.add_metric([camera.id, camera.room], getattr(stats, name))
            fps_in.add_metric([camera.id], stats.fps_in.rate())
            fps_out.add_metric([camera.id], stats.fps_out.rate())
            fps_target.add_metric([camera.id], camera.fps)
            fps_sampled.add_metric([camera.id], stats.fps_sampled.rate())
            behind_for.add_metric([camera.id], stats.behind_for_s())
            for stat, value in (("mean", stats.send_delay_s.mean()), ("max", stats.send_delay_s.max())):
                if value is not None:
                    send_delay.add_metric([camera.id, stat], value)
            queued.add_metric([camera.id], stats.queued)
            last_age = stats.last_frame_age_s()
            age.add_metric([camera.id], float("inf") if last_age is None else last_age)
        yield from counters.values()
        yield from (fps_in, fps_out, fps_target, fps_sampled, behind_for, send_delay, queued, age)


def serve_metrics(
    settings: ProducerSettings, cameras: list[CameraSettings], stats: dict[str, CameraStats]
) -> ServedMetrics:
    """The cameras' metrics, served on `settings.metrics_port` (None or 0: off); the caller closes them."""
    metrics = ServedMetrics()
    metrics.registry.register(ProducerCollector(cameras, stats))
    metrics.serve(settings.metrics_port, "producers.metrics_port")
    return metrics
