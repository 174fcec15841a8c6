"""The channel interface: one way alerts reach caregivers (Redis, webhooks, snapshots, MQTT).

The dispatcher (`alerting.delivery`) calls every configured channel, in order, for
each change of an alert read from `fall-events`, for each escalation and each
person-down change, and on every tick. A channel never raises into the stream
for a dependency that is down: it logs, counts and retries on its own (the
record is still on its topic for what must not be lost).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, ClassVar

from schemas import FallEvent, PersonDown

log = logging.getLogger(__name__)


class Channel:
    """A delivery channel; every hook is optional, the default does nothing."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connect, before the first alert."""

    async def before_publish(self, alert: FallEvent) -> None:
        """A change the rule made, before it goes to `fall-events` (one try)."""

    async def alert_changed(self, alert: FallEvent) -> None:
        """Every record of `fall-events`: a new alert, a caregiver's answer, a resolution (also redelivered)."""

    async def escalated(self, alert: FallEvent) -> None:
        """An alert nobody acknowledged in time (once per alert)."""

    async def person_down(self, change: PersonDown) -> None:
        """A camera's person-down state changed."""

    async def snapshot_ready(self, alert: FallEvent) -> None:
        """The alert's snapshot is stored: its link opens now."""

    async def tick(self) -> None:
        """Periodic work: retries that are due, state to rebuild."""

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background (cancelled by `close`): a slow receiver must not hold up the stream."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s channel task failed", self.name, exc_info=task.exception())
