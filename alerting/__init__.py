"""alerting: confirms falls from the `verdicts` stream and opens alerts.

`rules` holds the per-camera confirmation rule (k of the last n final verdicts,
one open alert per camera, cooldown), pure and free of Kafka; `app` is the
faust-streaming glue that feeds it, writes alerts to Redis and `fall-events`,
and sends undecodable records to `dead-letters`.
"""
