"""Redis clients of the services (password or ACL user, TLS) and riding out a Redis outage.

Every service's Redis use is an optimisation or a view that can be rebuilt: clips by claim check
(the frame itself is in `frames`), switcher announcements (the registry is polled anyway), camera
status, alert state (rebuilt from `fall-events`). So a Redis outage must never stop a service:
`RedisOutage` turns failed calls into "not now", says once when Redis went away and once when it is
back, counts the failures, and keeps the worker from waiting on a dead server for every frame.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.settings import RedisSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_TIMEOUT_S = 2.0
# After a failure, calls are skipped this long before Redis is tried again; the pause doubles with each
# failure in a row, up to RETRY_MAX_S: a Redis that hangs (each try waits for the socket timeout) must not
# cost a worker seconds in every few.
RETRY_AFTER_S = 1.0
RETRY_MAX_S = 30.0
REDIS_ERRORS = (RedisError, OSError)


def client_options(settings: RedisSettings) -> dict[str, Any]:
    options: dict[str, Any] = {"socket_timeout": REDIS_TIMEOUT_S, "socket_connect_timeout": REDIS_TIMEOUT_S}
    if settings.username is not None:
        options["username"] = settings.username
    password = settings.secret()
    if password is not None:
        options["password"] = password
    if settings.url.startswith("rediss://"):
        options["ssl_check_hostname"] = settings.ssl_check_hostname
        if settings.ssl_ca_certs is not None:
            options["ssl_ca_certs"] = str(settings.ssl_ca_certs)
    return options


def redis_client(settings: RedisSettings, **overrides: Any) -> Redis:
    """An asyncio client; the URL's scheme picks TLS (`rediss://`), the settings add the credentials."""
    return Redis.from_url(settings.url, **{**client_options(settings), **overrides})


def sync_redis_client(settings: RedisSettings, **overrides: Any) -> SyncRedis:
    return SyncRedis.from_url(settings.url, **{**client_options(settings), **overrides})


class RedisOutage:
    """Runs Redis calls of one service; while Redis is down they return a default instead of raising."""

    def __init__(self, service: str, on_failure: Callable[[], None], clock: Callable[[], float] = time.monotonic):
        self.service = service
        self.on_failure = on_failure
        self.clock = clock
        self.down_since: float | None = None
        self.next_try = 0.0
        self.pause_s = RETRY_AFTER_S

    @property
    def down(self) -> bool:
        return self.down_since is not None

    async def call(self, what: str, call: Callable[[], Awaitable[T]], default: T) -> T:
        """`await call()`, or `default` when Redis fails (or failed less than the pause ago)."""
        now = self.clock()
        if self.down_since is not None and now < self.next_try:
            return default
        try:
            result = await call()
        except REDIS_ERRORS as exc:
            self.on_failure()
            if self.down_since is None:
                self.down_since = now
                self.pause_s = RETRY_AFTER_S
                log.error("%s: Redis unavailable (%s: %s); %s", self.service, type(exc).__name__, exc, what)
            else:
                self.pause_s = min(2 * self.pause_s, RETRY_MAX_S)
            # from when the call failed, not when it started: a call that timed out took longer than the pause
            self.next_try = self.clock() + self.pause_s
            return default
        if self.down_since is not None:
            log.warning("%s: Redis is back after %.0f s", self.service, now - self.down_since)
            self.down_since = None
        return result
