"""`RedisOutage`: while Redis fails, calls return their default without waiting on Redis again at once."""

from __future__ import annotations

import asyncio

from redis.exceptions import TimeoutError as RedisTimeout

from core.redis_io import REDIS_TIMEOUT_S, RETRY_AFTER_S, RedisOutage


def test_a_call_that_timed_out_pauses_the_next_ones_from_when_it_failed() -> None:
    clock = [100.0]
    attempts: list[float] = []
    failures: list[float] = []

    async def timing_out() -> str:
        attempts.append(clock[0])
        clock[0] += REDIS_TIMEOUT_S  # the call hangs until the socket timeout
        raise RedisTimeout("Timeout reading from socket")

    outage = RedisOutage("test", lambda: failures.append(clock[0]), clock=lambda: clock[0])

    async def scenario() -> list[str]:
        answers = [await outage.call("test", timing_out, "default")]
        # calls right after the failure, within the pause: none may wait on Redis again
        for _ in range(5):
            clock[0] += RETRY_AFTER_S / 10
            answers.append(await outage.call("test", timing_out, "default"))
        clock[0] += RETRY_AFTER_S  # past the pause: Redis is tried again
        answers.append(await outage.call("test", timing_out, "default"))
        return answers

    answers = asyncio.run(scenario())
    assert answers == ["default"] * 7
    assert len(attempts) == 2, attempts
    assert outage.down and len(failures) == 2
