"""Signed webhooks to caregiver systems, retried with exponential backoff.

Each POST carries the alert (a `FallEvent` as JSON) and these headers:

- `X-Fallwatch-Timestamp`: Unix time in seconds when the request was signed;
- `X-Fallwatch-Signature`: `sha256=` + hex HMAC-SHA256 with the shared secret over
  `timestamp + "." + body` (reject a request whose timestamp is too old: replays);
- `X-Fallwatch-Event`: `alert.opened` or `alert.escalated`;
- `Idempotency-Key`: the alert id; a retried or redelivered notification repeats it.

Connection errors, timeouts, 429 and 5xx are retried; any other 4xx is final.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time

import aiohttp

from core.settings import AlertingSettings
from schemas import FallEvent, encode

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Fallwatch-Timestamp"
SIGNATURE_HEADER = "X-Fallwatch-Signature"
EVENT_HEADER = "X-Fallwatch-Event"
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_BACKOFF_S = 30.0


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def signature_is_valid(
    secret: str, timestamp: str, body: bytes, signature: str, now_s: float, tolerance_s: float = 300.0
) -> bool:
    """What a receiver checks: the signature, and that the timestamp is recent."""
    try:
        fresh = abs(now_s - int(timestamp)) <= tolerance_s
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature)


def retryable(status: int) -> bool:
    return status == 429 or status >= 500


class WebhookSender:
    """POSTs alerts to webhook URLs; `deliver` returns whether the receiver accepted."""

    def __init__(self, settings: AlertingSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def deliver(self, url: str, event_name: str, alert: FallEvent) -> bool:
        body = encode(alert)
        delay = self.settings.webhook_backoff_s
        for attempt in range(1, self.settings.webhook_attempts + 1):
            timestamp = str(int(time.time()))  # signed anew on each try, so a retry is never stale
            headers = {
                "Content-Type": "application/json",
                TIMESTAMP_HEADER: timestamp,
                SIGNATURE_HEADER: sign(self.settings.webhook_secret, timestamp, body),
                EVENT_HEADER: event_name,
                IDEMPOTENCY_HEADER: alert.alert_id,
            }
            try:
                async with self._client().post(url, data=body, headers=headers) as response:
                    if response.status < 300:
                        return True
                    problem = f"HTTP {response.status}"
                    if not retryable(response.status):
                        log.error("webhook %s refused %s for alert %s: %s", url, event_name, alert.alert_id, problem)
                        return False
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < self.settings.webhook_attempts:
                log.warning(
                    "webhook %s, %s for alert %s, attempt %d failed (%s); retrying in %.1f s",
                    url,
                    event_name,
                    alert.alert_id,
                    attempt,
                    problem,
                    delay,
                )
                await asyncio.sleep(delay)  # backoff between attempts
                delay = min(delay * 2, MAX_BACKOFF_S)
        log.error("webhook %s gave up on %s for alert %s: %s", url, event_name, alert.alert_id, problem)
        return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
