"""Running an asyncio service until SIGINT/SIGTERM, shared by every service entry point."""

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_on_sigterm() -> None:
    """Let SIGTERM (`timeout`, `kill`, a CI runner giving up) unwind the command like Ctrl-C does.

    Python's default for SIGTERM is to die on the spot, skipping every `with` block: a benchmark's
    temporary Kafka broker and redis-server (their own sessions, so they outlive it) and ~1 GB of
    scratch files stayed behind. A service replaces this with `run_until_signalled`'s drain.
    """

    def exit_with_status(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_with_status)


@contextmanager
def signals_set(stop: asyncio.Event) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM set `stop`; afterwards their handlers are the ones before.

    asyncio alone puts back the defaults when its loop closes: SIGTERM would then kill a command on the
    spot while it cleans up after the loop (a demo stopping its services and temporary stack).
    """
    loop = asyncio.get_running_loop()
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig, handler in before.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)


def run_until_signalled(service: Callable[[asyncio.Event], Awaitable[object]]) -> None:
    """Run `service(stop)`; SIGINT or SIGTERM sets `stop` so the service drains and exits cleanly."""

    async def main() -> None:
        stop = asyncio.Event()
        with signals_set(stop):
            await service(stop)

    asyncio.run(main())
