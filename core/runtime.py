"""Running an asyncio service until SIGINT/SIGTERM, shared by every service entry point."""

import asyncio
import signal
from collections.abc import Awaitable, Callable
from types import FrameType


def exit_on_sigterm() -> None:
    """Let SIGTERM (`timeout`, `kill`, a CI runner giving up) unwind the command like Ctrl-C does.

    Python's default for SIGTERM is to die on the spot, skipping every `with` block: a benchmark's
    temporary Kafka broker and redis-server (their own sessions, so they outlive it) and ~1 GB of
    scratch files stayed behind. A service replaces this with `run_until_signalled`'s drain.
    """

    def exit_with_status(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_with_status)


def run_until_signalled(service: Callable[[asyncio.Event], Awaitable[object]]) -> None:
    """Run `service(stop)`; SIGINT or SIGTERM sets `stop` so the service drains and exits cleanly."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service(stop)

    asyncio.run(main())
