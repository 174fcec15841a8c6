"""Loading a checkpoint: one that cannot be found or read is a settings mistake, told in one line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.settings import ConfigError


@contextmanager
def loading(what: str, model_id: str) -> Iterator[None]:
    """A checkpoint that cannot be found or read is a settings mistake: one line, not a traceback."""
    if model_id.startswith(("/", ".", "~")) and not Path(model_id).expanduser().exists():
        raise ConfigError(f"the {what} model directory {model_id} does not exist")
    try:
        yield
    except OSError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load the {what} model {model_id!r}: {first_line}") from None
