"""Retrying the first connection to a dependency: backoff, one clear line per retry, a bounded overall wait.

A service started while Kafka (or another dependency) is not up yet must not die with a traceback:
orchestrators start everything at once. It retries with jittered exponential backoff and says so on
each retry; past the overall wait it gives up with one `DependencyUnavailable` (shown as `error: ...`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from core.settings import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_RETRY_S = 0.5
LONGEST_RETRY_S = 10.0


class DependencyUnavailable(ConfigError):
    """A dependency stayed unreachable for the whole bounded wait."""


async def retry_until_up(
    attempt: Callable[[], Awaitable[T]],
    what: str,
    timeout_s: float,
    errors: tuple[type[BaseException], ...],
) -> T:
    """`attempt()`, retried on `errors` with backoff for at most `timeout_s`; then DependencyUnavailable."""

    def say_retry(state: RetryCallState) -> None:
        assert state.outcome is not None and state.next_action is not None
        log.warning(
            "%s not reachable (%s); retry %d in %.1f s (giving up after %.0f s)",
            what,
            state.outcome.exception(),
            state.attempt_number,
            state.next_action.sleep,
            timeout_s,
        )

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(errors),
        # doubling from FIRST_RETRY_S, jittered so services started together do not retry in step
        wait=wait_exponential(multiplier=FIRST_RETRY_S, max=LONGEST_RETRY_S) + wait_random(0, FIRST_RETRY_S),
        stop=stop_after_delay(timeout_s),
        before_sleep=say_retry,
        reraise=True,
    )
    try:
        return await retrying(attempt)
    except errors as exc:
        raise DependencyUnavailable(f"{what} unreachable for {timeout_s:.0f} s: {exc}") from None


async def retry_until_done(
    attempt: Callable[[], Awaitable[T]],
    errors: tuple[type[BaseException], ...],
    on_failure: Callable[[BaseException], None],
    longest_s: float = LONGEST_RETRY_S,
) -> T:
    """`attempt()`, retried on `errors` with backoff (at most `longest_s` apart) until it succeeds.

    For work that must not be dropped (it is still on its topic): `on_failure` reports each failure.
    """

    def report(state: RetryCallState) -> None:
        exception = state.outcome.exception() if state.outcome is not None else None
        assert exception is not None  # only errors are retried
        on_failure(exception)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(errors),
        wait=wait_exponential(multiplier=FIRST_RETRY_S / 5, max=longest_s),
        before_sleep=report,
    )
    return await retrying(attempt)
