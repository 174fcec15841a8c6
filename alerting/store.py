"""Alert state in Redis: what the dashboard and caregiver apps read.

`fall-events` is the durable record; Redis holds each alert's latest state, the
set of alerts not closed yet, a stream of every change (`fallwatch:alert-events`,
for caregiver apps and the dashboard's live updates; each entry carries its readable
`notification`), evidence snapshots and labels. A state change is applied by one Lua script, atomically and only
forwards (open → acknowledged → resolved / false_alarm), so a replayed `open`
never undoes what a caregiver did, and a change lands on the stream once.
"""

from __future__ import annotations

from typing import Any

from alerting.notifications import Notification
from core.redis_io import redis_client
from core.settings import RedisSettings
from schemas import AlertState, FallEvent, Label, PersonDown, decode, encode

PREFIX = "fallwatch:"
ACTIVE_ALERTS_KEY = f"{PREFIX}active-alerts"
ALERT_STREAM_KEY = f"{PREFIX}alert-events"
ESCALATION_MARK_TTL_S = 7 * 24 * 3600
# how long a worker that claimed an escalation has to hand it to the channels before another may
ESCALATION_LEASE_S = 60
LEASED, ESCALATED = b"leased", b"1"
DELIVERED_MARK_TTL_S = 7 * 24 * 3600
# a worker that has not checked the outbox for this long is taken to be gone (its id leaves the keepers' set)
OUTBOX_KEEPERS_TTL_S = 24 * 3600
ANSWER_CLAIM_TTL_S = 30  # longer than publishing an answer takes (the dashboard's Kafka send)


def alert_key(alert_id: str) -> str:
    return f"{PREFIX}alert:{alert_id}"


def open_alert_key(camera_id: str) -> str:
    return f"{PREFIX}open-alert:{camera_id}"


def snapshot_key(alert_id: str) -> str:
    return f"{PREFIX}snapshot:{alert_id}"


def evidence_key(alert_id: str) -> str:
    """A hash: evidence frame id -> its JPEG (the dashboard's strip)."""
    return f"{PREFIX}evidence:{alert_id}"


def escalated_key(alert_id: str) -> str:
    return f"{PREFIX}escalated:{alert_id}"


def frame_label_key(frame_id: str) -> str:
    return f"{PREFIX}label:{frame_id}"


def answering_key(alert_id: str) -> str:
    """Held while one answer on the alert is being given (`claim_answer`)."""
    return f"{PREFIX}answering:{alert_id}"


# KEYS: alert, its answering mark; ARGV: the state the answer was decided on, the mark's TTL. Only one answer at
# a time, and only on the state it was decided on: two caregivers answering at once give one answer, one label.
CLAIM_ANSWER = """
local stored = redis.call('GET', KEYS[1])
if not stored or cjson.decode(stored)['state'] ~= ARGV[1] then
  return 0
end
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[2])) then
  return 0
end
return 1
"""


def room_down_key(room: str) -> str:
    """A hash: each camera of the room (whichever worker owns it) to its latest person-down change,
    `"<changed_at ms> <1 down | 0 up>"`."""
    return f"{PREFIX}room-cameras-down:{room}"


# KEYS: the room's hash; ARGV: camera, changed_at (ms), 1 down / 0 up. Only forwards in capture time, so
# a change replayed from `person-down` after Redis restarted empty never undoes a newer one; returns how
# many of the room's cameras see a person down.
CAMERA_DOWN = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old or tonumber(string.match(old, '^%d+')) <= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
end
local down = 0
for _, value in ipairs(redis.call('HVALS', KEYS[1])) do
  if string.sub(value, -1) == '1' then
    down = down + 1
  end
end
return down
"""


# an alert's states only move forwards: a state never replaces one of the same or a higher rank
STATE_RANK: dict[AlertState, int] = {"open": 0, "acknowledged": 1, "resolved": 2, "false_alarm": 2}
ACTIVE_STATES: frozenset[AlertState] = frozenset({"open", "acknowledged"})

# KEYS: alert, camera's open-alert pointer, active set, stream; ARGV: event JSON, stream cap, notification JSON,
# 1 to add the change to the stream / 0 not
APPLY_STATE = (
    """
local new = cjson.decode(ARGV[1])
local rank = """
    + "{"
    + ", ".join(f"{state} = {rank}" for state, rank in STATE_RANK.items())
    + "}"
    + """
local old = redis.call('GET', KEYS[1])
if old and rank[cjson.decode(old)['state']] >= rank[new['state']] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
if new['state'] == 'open' or new['state'] == 'acknowledged' then  -- ACTIVE_STATES
  redis.call('SADD', KEYS[3], new['alert_id'])
  redis.call('SET', KEYS[2], new['alert_id'])
else
  redis.call('SREM', KEYS[3], new['alert_id'])
  if redis.call('GET', KEYS[2]) == new['alert_id'] then
    redis.call('DEL', KEYS[2])
  end
end
if ARGV[4] == '1' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*',
    'kind', 'state', 'alert_id', new['alert_id'], 'state', new['state'], 'event', ARGV[1], 'notification', ARGV[3])
end
return 1
"""
)

# KEYS: alert, stream; ARGV: alert id, event JSON, stream cap, notification JSON. Only while the alert is
# still open in Redis: an answer that came in meanwhile must not be shown as "not acknowledged" again.
ADD_ESCALATION = """
local stored = redis.call('GET', KEYS[1])
if stored and cjson.decode(stored)['state'] ~= 'open' then
  return 0
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
  'kind', 'escalation', 'alert_id', ARGV[1], 'state', 'open', 'event', ARGV[2], 'notification', ARGV[4])
return 1
"""


def built_key(fall_events_topic: str) -> str:
    """Set once Redis holds the alert state of `fall_events_topic`; gone after Redis restarted empty."""
    return f"{PREFIX}alerts-built:{fall_events_topic}"


def rebuild_lock_key(fall_events_topic: str) -> str:
    return f"{PREFIX}alerts-rebuilding:{fall_events_topic}"


def outbox_key(fall_events_topic: str) -> str:
    """Webhook deliveries not done yet, scored by when they are due (the outbox)."""
    return f"{PREFIX}webhook-outbox:{fall_events_topic}"


def outbox_payload_key(fall_events_topic: str) -> str:
    return f"{PREFIX}webhook-outbox-payload:{fall_events_topic}"


def outbox_lease_key(fall_events_topic: str) -> str:
    """Who holds each claimed delivery: the token of the claim whose try may finish or reschedule it."""
    return f"{PREFIX}webhook-outbox-lease:{fall_events_topic}"


def delivered_key(member: str) -> str:
    return f"{PREFIX}webhook-delivered:{member}"


def outbox_keepers_key(fall_events_topic: str) -> str:
    """The workers that checked the outbox since Redis last lost it: a worker not in it puts its deliveries back."""
    return f"{PREFIX}webhook-outbox-keepers:{fall_events_topic}"


# KEYS: outbox, payloads, delivered mark; ARGV: member, payload, due time
ENQUEUE_DELIVERY = """
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
if redis.call('ZADD', KEYS[1], 'NX', ARGV[3], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: outbox, payloads, leases; ARGV: now, lease end, limit, claim token. Due deliveries, each leased to the
# caller until the lease ends (another worker takes it over if this one dies first, or its try outlives the lease).
CLAIM_DELIVERIES = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local claimed = {}
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[2], member)
  redis.call('HSET', KEYS[3], member, ARGV[4])
  table.insert(claimed, member)
  table.insert(claimed, redis.call('HGET', KEYS[2], member) or '')
end
return claimed
"""


# KEYS: outbox, payloads, leases; ARGV: member, claim token, payload, due time. Only the claim still holding the
# lease reschedules: a try that outlived it must not queue again what a later claim finished or holds.
RETRY_DELIVERY = """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""

# KEYS: outbox, payloads, leases, delivered mark; ARGV: member, claim token, delivered (1/0), mark TTL. Out of the
# outbox; a delivery the receiver accepted is marked (whoever holds the lease), so it is never queued again. One
# given up on is dropped only by the claim holding the lease: a later claim may still be trying it.
FINISH_DELIVERY = """
if ARGV[3] == '1' then
  redis.call('SET', KEYS[4], '1', 'EX', tonumber(ARGV[4]))
elseif redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""

# KEYS: keepers, outbox, payloads, then each delivery's delivered mark; ARGV: worker, keepers' TTL, now, then
# each delivery's member and payload, in the marks' order. A worker new to the keepers (Redis lost the outbox,
# or the worker just started) puts back its deliveries not delivered and not queued, due now. Returns
# {new, how many were put back, the members no longer queued (done by another worker: to forget)}.
KEEP_OUTBOX = """
local new = redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
local restored = 0
local gone = {}
for j = 1, #KEYS - 3 do
  local member, payload = ARGV[2 + 2 * j], ARGV[3 + 2 * j]
  if redis.call('EXISTS', KEYS[3 + j]) == 1 then
    table.insert(gone, member)
  elseif new == 1 then
    if redis.call('ZADD', KEYS[2], 'NX', ARGV[3], member) == 1 then
      redis.call('HSET', KEYS[3], member, payload)
      restored = restored + 1
    end
  elseif not redis.call('ZSCORE', KEYS[2], member) then
    table.insert(gone, member)
  end
end
return {new, restored, gone}
"""


class AlertStore:
    """Redis access of alerting and the dashboard; RedisError / OSError reach the caller."""

    def __init__(self, settings: RedisSettings, stream_maxlen: int) -> None:
        # short timeouts (core.redis_io): a Redis outage must show quickly, not stall a stream
        self.redis = redis_client(settings)
        self.stream_maxlen = stream_maxlen
        self._apply_state = self.redis.register_script(APPLY_STATE)
        self._enqueue = self.redis.register_script(ENQUEUE_DELIVERY)
        self._claim = self.redis.register_script(CLAIM_DELIVERIES)
        self._retry = self.redis.register_script(RETRY_DELIVERY)
        self._finish = self.redis.register_script(FINISH_DELIVERY)
        self._keep_outbox = self.redis.register_script(KEEP_OUTBOX)
        self._camera_down = self.redis.register_script(CAMERA_DOWN)
        self._add_escalation = self.redis.register_script(ADD_ESCALATION)
        self._claim_answer = self.redis.register_script(CLAIM_ANSWER)

    async def apply(self, event: FallEvent, notification: Notification, to_stream: bool = True) -> bool:
        """Store a state change of an alert, and add it to the stream unless `to_stream` is False; False when
        Redis already has this state or a later one."""
        keys = [alert_key(event.alert_id), open_alert_key(event.camera_id), ACTIVE_ALERTS_KEY, ALERT_STREAM_KEY]
        args: list[bytes | int | str] = [
            encode(event),
            self.stream_maxlen,
            notification.model_dump_json(),
            int(to_stream),
        ]
        return bool(await self._apply_state(keys=keys, args=args))

    async def alert(self, alert_id: str) -> FallEvent | None:
        raw = await self.redis.get(alert_key(alert_id))
        return decode(FallEvent, raw) if raw else None

    async def active_alerts(self) -> list[FallEvent]:
        """Alerts not closed yet (open or acknowledged), oldest first."""
        ids = sorted(member.decode() for member in await self.redis.smembers(ACTIVE_ALERTS_KEY))
        raws = await self.redis.mget([alert_key(alert_id) for alert_id in ids]) if ids else []
        alerts = [decode(FallEvent, raw) for raw in raws if raw]
        return sorted(alerts, key=lambda alert: alert.opened_at)

    async def save_snapshot(self, alert_id: str, jpeg: bytes, ttl_s: int) -> None:
        await self.redis.set(snapshot_key(alert_id), jpeg, ex=ttl_s)

    async def save_evidence(self, alert_id: str, jpegs: dict[str, bytes], ttl_s: int) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(evidence_key(alert_id), mapping=jpegs)
            pipe.expire(evidence_key(alert_id), ttl_s)
            await pipe.execute()

    async def evidence_frame(self, alert_id: str, frame_id: str) -> bytes | None:
        return await self.redis.hget(evidence_key(alert_id), frame_id)

    async def needs_snapshot(self, alert_id: str) -> bool:
        """The alert is still active and has no snapshot yet."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sismember(ACTIVE_ALERTS_KEY, alert_id)
            pipe.exists(snapshot_key(alert_id))
            active, has_snapshot = await pipe.execute()
        return bool(active) and not has_snapshot

    async def snapshot(self, alert_id: str) -> bytes | None:
        return await self.redis.get(snapshot_key(alert_id))

    async def claim_escalation(self, alert_id: str, lease_s: int = ESCALATION_LEASE_S) -> bool:
        """True for the one worker that escalates this alert now (workers swap cameras on a rebalance).

        A lease until `escalation_sent`: a worker that dies in between leaves it to another once it ends.
        """
        return bool(await self.redis.set(escalated_key(alert_id), LEASED, nx=True, ex=lease_s))

    async def escalation_sent(self, alert_id: str) -> None:
        await self.redis.set(escalated_key(alert_id), ESCALATED, ex=ESCALATION_MARK_TTL_S)

    async def escalation_is_sent(self, alert_id: str) -> bool:
        return await self.redis.get(escalated_key(alert_id)) == ESCALATED

    async def escalated(self, alert_ids: list[str]) -> set[str]:
        """Which of these alerts were escalated."""
        if not alert_ids:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for alert_id in alert_ids:
                pipe.exists(escalated_key(alert_id))
            marks = await pipe.execute()
        return {alert_id for alert_id, mark in zip(alert_ids, marks, strict=True) if mark}

    async def closed_alerts(self, limit: int, scan: int = 5000) -> list[FallEvent]:
        """The newest closed alerts (resolved, false alarm), newest first, from the last `scan` stream entries."""
        entries: list[Any] = await self.redis.xrevrange(ALERT_STREAM_KEY, count=scan)
        closed: dict[str, FallEvent] = {}
        for _, fields in entries:
            if fields[b"kind"] == b"state" and fields[b"state"] in (b"resolved", b"false_alarm"):
                alert = decode(FallEvent, fields[b"event"])
                closed.setdefault(alert.alert_id, alert)
                if len(closed) == limit:
                    break
        return list(closed.values())

    async def add_escalation(self, alert: FallEvent, notification: Notification) -> bool:
        """The escalation on the stream; False when Redis knows the alert is no longer open (not added)."""
        keys = [alert_key(alert.alert_id), ALERT_STREAM_KEY]
        args = [alert.alert_id, encode(alert), self.stream_maxlen, notification.model_dump_json()]
        return bool(await self._add_escalation(keys=keys, args=args))

    async def camera_down(self, change: PersonDown) -> int:
        """Record a camera's person-down change unless a newer one is in; returns how many cameras of the
        room see a person down."""
        changed_at_ms = round(change.changed_at.timestamp() * 1000)
        args = [change.camera_id, changed_at_ms, int(change.down)]
        return int(await self._camera_down(keys=[room_down_key(change.room)], args=args))

    async def claim_answer(self, alert_id: str, state: AlertState, ttl_s: int = ANSWER_CLAIM_TTL_S) -> bool:
        """True when the alert is still `state` and no other answer on it is being given; then this one is,
        until `answer_given` (or `ttl_s`, if its process dies first)."""
        keys = [alert_key(alert_id), answering_key(alert_id)]
        return bool(await self._claim_answer(keys=keys, args=[state, ttl_s]))

    async def answer_given(self, alert_id: str) -> None:
        await self.redis.delete(answering_key(alert_id))

    async def save_label(self, label: Label) -> None:
        """The label under each of its frame ids (a later answer on the same frames replaces it)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for frame_id in label.frame_ids:
                pipe.set(frame_label_key(frame_id), encode(label))
            await pipe.execute()

    async def last_event_id(self) -> str:
        """The id of the newest stream entry ("0-0" when there is none)."""
        newest: list[Any] = await self.redis.xrevrange(ALERT_STREAM_KEY, count=1)
        return newest[0][0].decode() if newest else "0-0"

    async def read_events(self, after_id: str, block_ms: int) -> list[tuple[str, dict[str, str]]]:
        """Stream entries after `after_id`, waiting up to `block_ms` for the first."""
        reply = await self.redis.xread({ALERT_STREAM_KEY: after_id}, block=block_ms, count=100)
        return [
            (entry_id.decode(), {k.decode(): v.decode() for k, v in fields.items()})
            for _, entries in reply
            for entry_id, fields in entries
        ]

    # --- rebuilding from fall-events after Redis came back empty ----------------------------------
    async def is_built(self, fall_events_topic: str) -> bool:
        return bool(await self.redis.exists(built_key(fall_events_topic)))

    async def claim_rebuild(self, fall_events_topic: str, lease_s: int) -> bool:
        """True for the one alerting worker that rebuilds (others wait for it to mark the store built)."""
        return bool(await self.redis.set(rebuild_lock_key(fall_events_topic), b"1", nx=True, ex=lease_s))

    async def mark_built(self, fall_events_topic: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(built_key(fall_events_topic), b"1")
            pipe.delete(rebuild_lock_key(fall_events_topic))
            await pipe.execute()

    # --- the webhook outbox -----------------------------------------------------------------------
    async def enqueue_delivery(self, fall_events_topic: str, member: str, payload: bytes, due_s: float) -> bool:
        """Add a delivery unless it is queued or was delivered already."""
        keys = [outbox_key(fall_events_topic), outbox_payload_key(fall_events_topic), delivered_key(member)]
        return bool(await self._enqueue(keys=keys, args=[member, payload, due_s]))

    def _outbox_keys(self, fall_events_topic: str) -> list[str]:
        return [
            outbox_key(fall_events_topic),
            outbox_payload_key(fall_events_topic),
            outbox_lease_key(fall_events_topic),
        ]

    async def claim_deliveries(
        self, fall_events_topic: str, now_s: float, lease_s: float, limit: int, token: str
    ) -> list[tuple[str, bytes]]:
        """Due deliveries, leased to the claim `token` names (`CLAIM_DELIVERIES`)."""
        flat = await self._claim(keys=self._outbox_keys(fall_events_topic), args=[now_s, now_s + lease_s, limit, token])
        return [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]

    async def keep_outbox(
        self, fall_events_topic: str, worker: str, unfinished: dict[str, bytes], now_s: float
    ) -> tuple[int, list[str]]:
        """Check a worker's unfinished deliveries against the outbox (`KEEP_OUTBOX`): how many it put back because
        Redis had lost them, and which are done and to be forgotten."""
        members = list(unfinished)
        keys = [outbox_keepers_key(fall_events_topic), outbox_key(fall_events_topic)]
        keys += [outbox_payload_key(fall_events_topic), *(delivered_key(member) for member in members)]
        args: list[str | bytes | float] = [worker, OUTBOX_KEEPERS_TTL_S, now_s]
        for member in members:
            args += [member, unfinished[member]]
        _, restored, gone = await self._keep_outbox(keys=keys, args=args)
        return int(restored), [member.decode() for member in gone]

    async def delivery_done(self, fall_events_topic: str, member: str, token: str, delivered: bool) -> bool:
        """Out of the outbox (`FINISH_DELIVERY`); False: a failed delivery another claim holds now, left to it."""
        keys = [*self._outbox_keys(fall_events_topic), delivered_key(member)]
        return bool(await self._finish(keys=keys, args=[member, token, int(delivered), DELIVERED_MARK_TTL_S]))

    async def retry_delivery(
        self, fall_events_topic: str, member: str, token: str, payload: bytes, due_s: float
    ) -> bool:
        """Rescheduled (`RETRY_DELIVERY`); False: the lease of claim `token` ran out, the delivery is not its own."""
        keys = self._outbox_keys(fall_events_topic)
        return bool(await self._retry(keys=keys, args=[member, token, payload, due_s]))

    async def close(self) -> None:
        await self.redis.aclose()
