"""Prometheus metrics of one edge worker, served on its own HTTP port.

Each worker has its own `CollectorRegistry`, so several workers in one process (tests,
benchmarks) do not share counters, and `/metrics` shows exactly one worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from core.metrics import ServedMetrics

if TYPE_CHECKING:  # the model module imports torch; the metrics do not need it
    from edge_workers.model import CpuOptionCheck

# Per-frame stage latencies span 10 µs (switcher) to seconds (real-size ViLT on a small CPU).
LATENCY_BUCKETS_S = (1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SCORE_BUCKETS = tuple(i / 10 for i in range(1, 11))


class EdgeMetrics(ServedMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.frames = Counter("fallwatch_edge_frames", "frames answered", registry=self.registry)
        self.batch_size = Histogram(
            "fallwatch_edge_batch_size", "records per batch", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.stage_seconds = Histogram(
            "fallwatch_edge_stage_seconds",
            "time per frame of each stage (decode, model, switcher, produce)",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.offloads = Counter(
            "fallwatch_edge_offloads", "frames sent to the cloud, by reason", ["reason"], registry=self.registry
        )
        self.over_budget = Counter(
            "fallwatch_edge_over_budget", "frames the switcher doubted but the budget kept", registry=self.registry
        )
        self.offload_ratio = Gauge(
            "fallwatch_edge_offload_ratio", "share of frames offloaded over the budget window", registry=self.registry
        )
        self.switcher_score = Histogram(
            "fallwatch_edge_switcher_score", "agreement probability", buckets=SCORE_BUCKETS, registry=self.registry
        )
        self.people_located = Counter(
            "fallwatch_edge_people_located",
            "BlazePose runs on zoned cameras' possible falls, by outcome (found, not_found)",
            ["outcome"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "fallwatch_edge_dead_letters", "records sent to dead-letters", registry=self.registry
        )
        self.redis_failures = Counter(
            "fallwatch_edge_redis_failures",
            "Redis calls that failed (clips then go without the claim check, announcements wait for the poll)",
            registry=self.registry,
        )
        self.consumer_lag = Gauge(
            "fallwatch_edge_consumer_lag", "records behind the end of the assigned partitions", registry=self.registry
        )
        self._declare_model_gauges()

    def _declare_model_gauges(self) -> None:
        """The gauges that describe what the worker serves: its switcher, drift flags and CPU options."""
        self.switcher_version = Gauge(
            "fallwatch_edge_switcher_info", "the switcher in use (value 1)", ["version"], registry=self.registry
        )
        self.camera_drift = Gauge(
            "fallwatch_edge_camera_drift",
            "1 while a camera's live statistics are off the active version's calibration (learning mode)",
            ["camera"],
            registry=self.registry,
        )
        self.cpu_option = Gauge(
            "fallwatch_edge_cpu_option",
            "a CPU option of the edge model: 1 on, 0 off, by option and setting (true, false or auto)",
            ["option", "setting"],
            registry=self.registry,
        )
        self.calibration_max_fall_diff = Gauge(
            "fallwatch_edge_calibration_max_fall_diff",
            "auto options: the largest change of P(fall) the option made on a calibration frame",
            ["option"],
            registry=self.registry,
        )

    def use_budget(self, max_offload_ratio: float) -> None:
        """Export the offload budget; without one the series is absent, so no rule compares against 0."""
        Gauge(
            "fallwatch_edge_offload_budget_ratio", "edge.max_offload_ratio, the offload budget", registry=self.registry
        ).set(max_offload_ratio)

    def use_cpu_options(self, checks: Sequence[CpuOptionCheck]) -> None:
        for check in checks:
            setting = check.setting if isinstance(check.setting, str) else str(check.setting).lower()
            self.cpu_option.labels(option=check.option, setting=setting).set(int(check.enabled))
            if check.max_fall_diff is not None:
                self.calibration_max_fall_diff.labels(option=check.option).set(check.max_fall_diff)

    def use_switcher(self, version: str) -> None:
        self.switcher_version.clear()
        self.switcher_version.labels(version=version).set(1)
