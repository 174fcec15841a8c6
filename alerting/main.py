"""`python -m alerting` (also `fallwatch alerting`): run the alerting service; `fallwatch dashboard`: its web page."""

from __future__ import annotations

from core.entry import run_command, settings_with_logging


def alerting() -> None:
    """Run the alerting service (faust app on `verdicts`)."""
    from alerting.app import run_alerting

    run_alerting(settings_with_logging())


def dashboard() -> None:
    """Run the caregivers' web dashboard (needs alerting.dashboard_token)."""
    from alerting.dashboard import run_dashboard

    run_dashboard(settings_with_logging())


def main(argv: list[str] | None = None) -> None:
    run_command(alerting, argv)
