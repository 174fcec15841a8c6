"""`RedisOutage`: while Redis fails, calls return their default without waiting on Redis again at once."""

from __future__ import annotations

import asyncio
import itertools

from redis.exceptions import TimeoutError as RedisTimeout

from core.redis_io import REDIS_TIMEOUT_S, RETRY_AFTER_S, RETRY_MAX_S, RedisOutage


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


def test_the_pause_doubles_while_redis_keeps_failing_and_starts_again_once_it_is_back() -> None:
    """A Redis that hangs costs each try the socket timeout: tried every second, a worker would spend most of
    its time waiting on it; the pause grows to RETRY_MAX_S, and a new outage starts from RETRY_AFTER_S again."""
    clock = [0.0]
    healthy = [False]
    tries: list[float] = []

    async def flaky() -> str:
        tries.append(clock[0])
        if not healthy[0]:
            clock[0] += REDIS_TIMEOUT_S
            raise RedisTimeout("Timeout reading from socket")
        return "answer"

    outage = RedisOutage("test", lambda: None, clock=lambda: clock[0])

    async def calls_for(seconds: float) -> list[str]:
        """A call every 0.5 s of the clock, as a worker's batches make them."""
        answers = []
        end = clock[0] + seconds
        while clock[0] < end:
            answers.append(await outage.call("test", flaky, "default"))
            clock[0] += 0.5
        return answers

    async def scenario() -> tuple[list[float], list[str], list[float]]:
        await calls_for(300)
        first_outage = list(tries)
        healthy[0] = True
        back = await calls_for(RETRY_MAX_S + REDIS_TIMEOUT_S + 1)
        healthy[0] = False
        tries.clear()
        await calls_for(3 * RETRY_AFTER_S + REDIS_TIMEOUT_S)
        return first_outage, back, list(tries)

    first_outage, back, second_outage = asyncio.run(scenario())
    pauses = [later - earlier - REDIS_TIMEOUT_S for earlier, later in itertools.pairwise(first_outage)]
    assert pauses[0] < 2 * RETRY_AFTER_S and all(b >= a for a, b in itertools.pairwise(pauses)), pauses
    assert RETRY_MAX_S <= pauses[-1] < RETRY_MAX_S + 1, "the pause stops growing at RETRY_MAX_S"
    assert len(first_outage) < 20, "Redis tried a few times in 300 s, not 100"
    assert back[-1] == "answer", "once back, it is used again within the longest pause"
    assert len(second_outage) == 2, "a new outage starts from the first pause again"
