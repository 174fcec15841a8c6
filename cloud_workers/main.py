"""`python -m cloud_workers` (also `fallwatch cloud`): run a cloud worker."""

from __future__ import annotations

from core.entry import run_command, settings_with_logging
from core.runtime import run_until_signalled


def cloud() -> None:
    """Run a cloud worker (consumer group on `cloud-requests`)."""
    from cloud_workers.service import run_cloud_worker

    settings = settings_with_logging()
    run_until_signalled(lambda stop: run_cloud_worker(settings, stop))


def main(argv: list[str] | None = None) -> None:
    run_command(cloud, argv)
