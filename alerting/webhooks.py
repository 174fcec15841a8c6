"""Signed webhooks to caregiver systems, retried with exponential backoff.

Each POST carries the alert (a `FallEvent` as JSON, with the notification's fields
`message`, `down_for_s`, `snapshot_url`, `escalated` and `drill`; `alerting.notifications`) and these headers:

- `X-Fallwatch-Timestamp`: Unix time in seconds when the request was signed;
- `X-Fallwatch-Signature`: `sha256=` + hex HMAC-SHA256 with the shared secret over
  `timestamp + "." + body` (reject a request whose timestamp is too old: replays);
- `X-Fallwatch-Event`: `alert.opened` or `alert.escalated`;
- `Idempotency-Key`: the alert id and the event (`<alert id>:alert.opened`); a retried or
  redelivered notification repeats it, the escalation of the same alert has its own.

Connection errors, timeouts, 429 and 5xx are retried; any other 4xx is final. A redirect is not
followed (a POST redirected becomes a GET without the alert, and the signed headers would go to
another host): it is final, and the log names where it points.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_attempt

from core.settings import AlertingSettings

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


def idempotency_key(alert_id: str, event_name: str) -> str:
    return f"{alert_id}:{event_name}"


def retryable(status: int) -> bool:
    return status == 429 or status >= 500


@dataclass(frozen=True)
class Attempt:
    accepted: bool
    final: bool  # accepted, or refused for good (a 4xx other than 429)
    problem: str


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

    async def attempt(self, url: str, event_name: str, alert_id: str, body: bytes) -> Attempt:
        """One POST of `body` (about alert `alert_id`), signed now."""
        timestamp = str(int(time.time()))  # signed anew on each try, so a retry is never stale
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.settings.webhook_key(), timestamp, body),
            EVENT_HEADER: event_name,
            IDEMPOTENCY_HEADER: idempotency_key(alert_id, event_name),
        }
        try:
            async with self._client().post(url, data=body, headers=headers, allow_redirects=False) as response:
                if response.status < 300:
                    return Attempt(accepted=True, final=True, problem="")
                problem = f"HTTP {response.status}"
                if 300 <= response.status < 400:
                    problem += f", a redirect to {response.headers.get('Location', '?')} (not followed: set that URL)"
                if not retryable(response.status):
                    log.error("webhook %s refused %s for alert %s: %s", url, event_name, alert_id, problem)
                    return Attempt(accepted=False, final=True, problem=problem)
                return Attempt(accepted=False, final=False, problem=problem)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Attempt(accepted=False, final=False, problem=f"{type(exc).__name__}: {exc}")

    def retry_delay_s(self, attempt: int) -> float:
        """Backoff before try `attempt + 1`: doubling from `webhook_backoff_s`, at most MAX_BACKOFF_S."""
        return min(self.settings.webhook_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)

    def say_retry(self, url: str, event_name: str, alert_id: str, attempt: int, problem: str) -> None:
        log.warning(
            "webhook %s, %s for alert %s, attempt %d failed (%s); retrying in %.1f s",
            url,
            event_name,
            alert_id,
            attempt,
            problem,
            self.retry_delay_s(attempt),
        )

    def say_gave_up(self, url: str, event_name: str, alert_id: str, problem: str) -> None:
        log.error("webhook %s gave up on %s for alert %s: %s", url, event_name, alert_id, problem)

    async def deliver(self, url: str, event_name: str, alert_id: str, body: bytes) -> bool:
        """Every attempt in this process, with backoff (the outbox's retries survive a restart instead)."""

        def say_retry(state: RetryCallState) -> None:
            assert state.outcome is not None
            self.say_retry(url, event_name, alert_id, state.attempt_number, state.outcome.result().problem)

        retrying = AsyncRetrying(
            retry=retry_if_result(lambda result: not result.final),
            stop=stop_after_attempt(self.settings.webhook_attempts),
            wait=lambda state: self.retry_delay_s(state.attempt_number),
            before_sleep=say_retry,
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )
        result: Attempt = await retrying(self.attempt, url, event_name, alert_id, body)
        if not result.final:
            self.say_gave_up(url, event_name, alert_id, result.problem)
        return result.accepted

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
