"""`python -m producers` (also `fallwatch producer`): stream the cameras to the `frames` topic."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from core.entry import run_command, settings_with_logging
from core.runtime import run_until_signalled
from core.settings import CameraSettings, ConfigError, settings_problem

# the settings sections this service reads besides kafka and redis; the others are not validated
SECTIONS = ("producers",)


def producer(
    video: Annotated[
        list[Path] | None, typer.Option(help="add a camera that streams this video file (repeatable)")
    ] = None,
    fps: Annotated[float, typer.Option(help="sampling rate of --video cameras")] = 2.0,
) -> None:
    """Stream the configured cameras (and any --video files) to the `frames` topic."""
    from producers.service import run_producers

    settings = settings_with_logging(SECTIONS)
    if video:
        taken = {camera.id for camera in settings.producers.cameras}
        settings.producers.cameras.extend(video_cameras(video, fps, taken))
    if not settings.producers.cameras:
        raise ConfigError("no cameras: list them under producers.cameras in the config, or pass --video FILE")
    run_until_signalled(lambda stop: run_producers(settings, stop))


def video_cameras(videos: list[Path], fps: float, taken: set[str]) -> list[CameraSettings]:
    """A camera per video file, named `cam-N` with an N no configured camera's id has."""
    missing = [str(path) for path in videos if not path.is_file()]
    if missing:
        raise ConfigError(f"video file not found: {', '.join(missing)}")
    ids = (f"cam-{n}" for n in range(1, len(videos) + len(taken) + 1) if f"cam-{n}" not in taken)
    try:
        return [CameraSettings(id=next(ids), room=path.stem, url=str(path), fps=fps) for path in videos]
    except ValidationError as exc:
        raise settings_problem(exc, "--video camera") from None


def main(argv: list[str] | None = None) -> None:
    run_command(producer, argv)
