"""The switcher registry as an edge worker sees it: the newest version, and hot reload.

The registry is a directory of versions written by `edge_workers.switcher.save_switcher`
(atomically, so a half-written version is never seen). A worker checks it every
`registry_poll_s`; a publisher can also announce a new version by setting a Redis key
(`announce_switcher`), which the worker reads every batch, so a new switcher is picked up
within one batch instead of one poll period. The worker swaps switchers between batches, so
every frame is answered by exactly one switcher and offsets stay committed after acks.

A version made for another edge model or hidden size is refused with one log line and the
running switcher stays; the refused version is not retried (publish a new version instead).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from redis import Redis as SyncRedis

from core.settings import ConfigError
from edge_workers.switcher import Switcher, SwitcherMetadata, check_compatible, latest_version, load_switcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveSwitcher:
    switcher: Switcher
    metadata: SwitcherMetadata
    path: Path


def announce_switcher(redis: SyncRedis, key: str, version: str) -> None:
    """Tell running edge workers that `version` is in the registry (they check the key every batch)."""
    redis.set(key, version)


class SwitcherRegistry:
    def __init__(
        self,
        directory: Path,
        edge_model: str,
        hidden_size: int,
        poll_s: float,
        announce_key: str | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.edge_model = edge_model
        self.hidden_size = hidden_size
        self.poll_s = poll_s
        self.announce_key = announce_key
        self.clock = clock
        self.next_poll = clock() + poll_s
        self.last_announced: bytes | None = None
        self.refused: set[str] = set()

    def load_newest(self) -> ActiveSwitcher:
        """The newest version at start-up; a missing or unfit switcher is a configuration mistake."""
        newest = latest_version(self.directory)
        if newest is None:
            raise ConfigError(
                f"no switcher in {self.directory}: train one (fallwatch dmd) "
                "or create an untrained one (fallwatch models tiny)"
            )
        try:
            return self._load(newest)
        except Exception as exc:  # a mismatch or an unreadable artifact: one line, not a traceback
            raise ConfigError(f"cannot use switcher {newest}: {exc}") from None

    async def refresh(self, current: ActiveSwitcher, announced: bytes | None) -> ActiveSwitcher | None:
        """A newer fitting switcher when one was published since `current`, else None.

        `announced` is the announcement key's value now (the last one seen while Redis is down).
        """
        now = self.clock()
        if announced == self.last_announced and now < self.next_poll:
            return None
        self.last_announced = announced
        self.next_poll = now + self.poll_s
        newest = await asyncio.to_thread(latest_version, self.directory)
        if newest is None or newest.name <= current.metadata.version or newest.name in self.refused:
            return None
        try:
            loaded = await asyncio.to_thread(self._load, newest)
        except Exception as exc:  # keep serving with the switcher that works
            self.refused.add(newest.name)
            log.error("switcher %s refused, keeping %s: %s", newest.name, current.metadata.version, exc)
            return None
        log.info(
            "switcher %s loaded (threshold %.3f), replacing %s",
            loaded.metadata.version,
            loaded.metadata.threshold,
            current.metadata.version,
        )
        return loaded

    def _load(self, path: Path) -> ActiveSwitcher:
        switcher, metadata = load_switcher(path)
        check_compatible(metadata, self.edge_model, self.hidden_size)
        return ActiveSwitcher(switcher, metadata, path)
