"""Prometheus metrics of one cloud worker, served on its own HTTP port.

Each worker has its own `CollectorRegistry`, so several workers in one process (tests,
benchmarks) do not share counters.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import Counter, Gauge, Histogram

from core.metrics import ServedMetrics

# "cloud": answered by the model; "deadline": past its deadline, the edge answer is final;
# "no_clip": neither the clip nor the frame could be read, the edge answer is final;
# "dead_letter": the record was malformed.
Outcome = Literal["cloud", "deadline", "no_clip", "dead_letter", "no_answer"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# From a tiny model's forward on a CPU (ms) to a 7B forward on a busy GPU (s).
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class CloudMetrics(ServedMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.requests = Counter("fallwatch_cloud_requests", "requests by outcome", ["outcome"], registry=self.registry)
        self.clip_fallbacks = Counter(
            "fallwatch_cloud_clip_fallbacks",
            "requests whose clip had expired from Redis, answered from the frame alone",
            registry=self.registry,
        )
        self.redis_failures = Counter(
            "fallwatch_cloud_redis_failures",
            "clip reads that failed (the frames then come from `frames`)",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "fallwatch_cloud_batch_size", "requests per model forward", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.batch_seconds = Histogram(
            "fallwatch_cloud_batch_seconds",
            "wall time per batch of each stage (collect, fetch, preprocess, model)",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "fallwatch_cloud_request_seconds",
            "wall time per request in the worker, from arrival to its verdict",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.energy_joules = Counter(
            "fallwatch_cloud_energy_joules", "energy measured over model forwards", registry=self.registry
        )
        self.consumer_lag = Gauge(
            "fallwatch_cloud_consumer_lag",
            "requests behind the end of the assigned cloud-requests partitions",
            registry=self.registry,
        )
        self.gpu_memory_bytes = Gauge(
            "fallwatch_cloud_gpu_memory_bytes", "peak GPU memory of the last batch", registry=self.registry
        )

    def count(self, outcome: Outcome, n: int = 1) -> None:
        self.requests.labels(outcome=outcome).inc(n)
