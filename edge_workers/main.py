"""`python -m edge_workers` (also `fallwatch edge`): run an edge worker."""

from __future__ import annotations

from core.entry import run_command, settings_with_logging
from core.runtime import run_until_signalled


def edge() -> None:
    """Run an edge worker (consumer group on `frames`)."""
    from edge_workers.service import run_edge_worker

    settings = settings_with_logging()
    run_until_signalled(lambda stop: run_edge_worker(settings, stop))


def main(argv: list[str] | None = None) -> None:
    run_command(edge, argv)
