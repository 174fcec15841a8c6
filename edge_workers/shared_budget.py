"""An offload budget counted across edge workers in Redis (`edge.offload_budget_key`).

Each worker's own budget (`edge_workers.routing.OffloadBudget`) caps what it sends; a facility's
cloud workers serve every edge worker, so with N of them the cloud would see N budgets. Workers that
name the same key count their frames and offloads together, per second of Redis's clock (one clock
for all of them), over the same sliding window and limits as the local budget.

A batch reserves its slots before routing (`reserve`: seen frames and the slots it may fill, both
counted at once, so two workers never spend the same slot) and hands back what it did not use
(`release`). Without Redis the worker routes by its own budget alone: the cap is a cost, and no
camera waits for Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from edge_workers.routing import EPSILON, RoutingPolicy

# KEYS: the budget's hash (fields s:<second> frames seen, o:<second> slots taken); ARGV: window, frames,
# ratio, frames/s (negative: no such limit). Returns {slots, the second they were counted under}.
RESERVE_SLOTS = """
local clock = redis.call('TIME')
local second = tonumber(clock[1])
local now = second + tonumber(clock[2]) / 1000000
local window, frames = tonumber(ARGV[1]), tonumber(ARGV[2])
local ratio, fps = tonumber(ARGV[3]), tonumber(ARGV[4])
local oldest = math.floor(now - window) + 1
local seen, taken = 0, 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local name = fields[i]
  if tonumber(string.sub(name, 3)) < oldest then
    redis.call('HDEL', KEYS[1], name)
  elseif string.sub(name, 1, 1) == 's' then
    seen = seen + tonumber(fields[i + 1])
  else
    taken = taken + tonumber(fields[i + 1])
  end
end
local slots = frames
if ratio >= 0 then
  slots = math.min(slots, math.floor(ratio * (seen + frames) + tonumber(ARGV[5])) - taken)
end
if fps >= 0 then
  slots = math.min(slots, math.floor(fps * window + tonumber(ARGV[5])) - taken)
end
slots = math.max(0, slots)
redis.call('HINCRBY', KEYS[1], 's:' .. second, frames)
redis.call('HINCRBY', KEYS[1], 'o:' .. second, slots)
redis.call('EXPIRE', KEYS[1], math.ceil(window) + 1)
return {slots, second}
"""

# KEYS: the budget's hash; ARGV: the reservation's second, slots not used. A second that left the window
# meanwhile is gone with what it counted.
RELEASE_SLOTS = """
local field = 'o:' .. ARGV[1]
if redis.call('HEXISTS', KEYS[1], field) == 1 then
  redis.call('HINCRBY', KEYS[1], field, -tonumber(ARGV[2]))
end
return 0
"""


@dataclass(frozen=True)
class Reservation:
    slots: int
    second: int


def limit_arg(limit: float | None) -> float:
    return -1.0 if limit is None else limit


class SharedOffloadBudget:
    """The budget every edge worker naming `key` counts against; RedisError / OSError reach the caller."""

    def __init__(self, redis: Redis, key: str) -> None:
        self.key = key
        self._reserve = redis.register_script(RESERVE_SLOTS)
        self._release = redis.register_script(RELEASE_SLOTS)

    async def reserve(self, policy: RoutingPolicy, frames: int) -> Reservation:
        """Count a batch of `frames` and take the slots it may send to the cloud."""
        args = [policy.window_s, frames, limit_arg(policy.max_offload_ratio), limit_arg(policy.max_offload_fps)]
        slots, second = await self._reserve(keys=[self.key], args=[*args, EPSILON])
        return Reservation(int(slots), int(second))

    async def release(self, reservation: Reservation, used: int) -> None:
        """Hand back the slots of `reservation` the batch did not send."""
        if used < reservation.slots:
            await self._release(keys=[self.key], args=[reservation.second, reservation.slots - used])
