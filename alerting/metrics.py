"""Prometheus metrics of alerting (the service) and of the dashboard, each with its own registry.

The service counts what it decides (alerts opened, time from the first fall
frame to the alert, escalations, edge fallbacks, webhook failures); the
dashboard counts what caregivers answer (acknowledgement latency, true falls
vs false alarms and the false-alarm share).
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

from core.metrics import ServedMetrics

log = logging.getLogger(__name__)

# from a second (k of n at a few fps, or a cloud confirmation) to minutes (escalated, answered late)
LATENCY_BUCKETS_S = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class AlertingMetrics(ServedMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.alerts_opened = Counter(
            "fallwatch_alerts_opened", "alerts opened, by room and rule", ["room", "rule"], registry=self.registry
        )
        self.time_to_alert = Histogram(
            "fallwatch_alert_time_to_alert_seconds",
            "capture of the first fall frame to the alert being opened",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.person_down_changes = Counter(
            "fallwatch_person_down_changes",
            "person-down state changes, by new state",
            ["state"],
            registry=self.registry,
        )
        self.zone_suppressed = Counter(
            "fallwatch_alerting_zone_suppressed",
            "final fall verdicts not counted: the person lay in a no-alert zone, by room",
            ["room"],
            registry=self.registry,
        )
        self.alerts_resolved = Counter(
            "fallwatch_alerts_auto_resolved", "acknowledged alerts resolved by the rule", registry=self.registry
        )
        self.escalations = Counter("fallwatch_alerts_escalated", "alerts escalated", registry=self.registry)
        self.edge_fallbacks = Counter(
            "fallwatch_alerting_edge_fallbacks", "offloaded frames decided on the edge's answer", registry=self.registry
        )
        self.webhook_deliveries = Counter(
            "fallwatch_webhook_deliveries", "webhooks accepted, by event", ["event"], registry=self.registry
        )
        self.webhook_failures = Counter(
            "fallwatch_webhook_failures", "webhooks given up on, by event", ["event"], registry=self.registry
        )
        self.webhook_leases_lost = Counter(
            "fallwatch_webhook_leases_lost",
            "webhook tries that ended after another claim took their delivery over (not rescheduled)",
            registry=self.registry,
        )
        self.redis_failures = Counter(
            "fallwatch_alerting_redis_failures", "failed Redis writes (retried)", registry=self.registry
        )
        self.state_rebuilds = Counter(
            "fallwatch_alerting_state_rebuilds",
            "times Redis had lost the alert state and it was rebuilt from fall-events",
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "fallwatch_alerting_dead_letters", "records sent to dead-letters", registry=self.registry
        )
        self.consumer_lag = Gauge(
            "fallwatch_alerting_consumer_lag",
            "records of the topic the alerting group has not committed yet",
            ["topic"],
            registry=self.registry,
        )


class DashboardMetrics(ServedMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.answers = Counter(
            "fallwatch_alert_answers", "caregivers' answers, by label verdict", ["verdict"], registry=self.registry
        )
        self.ack_latency = Histogram(
            "fallwatch_alert_ack_latency_seconds",
            "alert opened (capture time of the confirming frame) to acknowledged",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.false_alarm_share = Gauge(
            "fallwatch_alert_false_alarm_share",
            "false alarms among the alerts caregivers answered (this dashboard process)",
            registry=self.registry,
        )
        self._answer_counts = {"true_fall": 0, "false_alarm": 0}

    def answered(self, verdict: str) -> None:
        self.answers.labels(verdict=verdict).inc()
        self._answer_counts[verdict] += 1
        self.false_alarm_share.set(self._answer_counts["false_alarm"] / sum(self._answer_counts.values()))
