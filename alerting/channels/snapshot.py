"""The snapshot channel: a new alert's evidence frames (the newest is its snapshot, the newest
`EVIDENCE_STRIP` the dashboard's strip), read back from `frames`, kept in Redis for a while.

Once it is stored, `on_saved` tells the other channels (the dispatcher's `snapshot_ready`), so a
link to it is only handed out when it opens.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from alerting.channels.base import Channel
from alerting.snapshots import find_frame_jpegs
from alerting.store import AlertStore
from core.settings import Settings
from schemas import FallEvent

log = logging.getLogger(__name__)

EVIDENCE_STRIP = 6  # thumbnails a person can take in at a glance; a k-of-n alert has at most n


class SnapshotChannel(Channel):
    name = "snapshot"

    def __init__(self, settings: Settings, store: AlertStore, on_saved: Callable[[FallEvent], Awaitable[None]]) -> None:
        super().__init__()
        self.settings = settings
        self.store = store
        self._on_saved = on_saved

    async def alert_changed(self, alert: FallEvent) -> None:
        if alert.state == "open" and alert.evidence_frame_ids:  # a fire drill has no frames
            self.spawn(self._save(alert))  # a search of `frames` must not hold up the stream

    async def _save(self, alert: FallEvent) -> None:
        try:
            if not await self.store.needs_snapshot(alert.alert_id):
                return  # a redelivery, or an alert already closed
        except (RedisError, OSError) as exc:
            log.error("no snapshot for alert %s: %s", alert.alert_id, exc)
            return
        # the newest evidence frame shows the person where they are now
        frame_id = alert.evidence_frame_ids[-1]
        strip = alert.evidence_frame_ids[-EVIDENCE_STRIP:]
        jpegs = await find_frame_jpegs(self.settings, alert.camera_id, strip, alert.first_fall_at)
        if frame_id not in jpegs:
            log.warning(
                "no snapshot for alert %s: frame %s is not in %s",
                alert.alert_id,
                frame_id,
                self.settings.kafka.topics.frames,
            )
            return
        ttl_s = self.settings.alerting.snapshot_ttl_s
        try:
            await self.store.save_evidence(alert.alert_id, jpegs, ttl_s)
            await self.store.save_snapshot(alert.alert_id, jpegs[frame_id], ttl_s)
        except (RedisError, OSError) as exc:
            log.error("could not store the snapshot of alert %s: %s", alert.alert_id, exc)
            return
        await self._on_saved(alert)
