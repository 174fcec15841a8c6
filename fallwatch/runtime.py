"""Running an asyncio service until SIGINT/SIGTERM, shared by every service entry point."""

import asyncio
import signal
from collections.abc import Awaitable, Callable


def run_until_signalled(service: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `service(stop)`; SIGINT or SIGTERM sets `stop` so the service drains and exits cleanly."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service(stop)

    asyncio.run(main())
