"""Loading a checkpoint: one that cannot be found or read is a settings mistake, told in one line."""

from __future__ import annotations

import hashlib
import os
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


def directory_sha256(directory: Path) -> str:
    """One hash over a directory's file names and contents (sorted), so any changed byte changes it."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def local_checkpoint_sha256(model_id: str) -> str | None:
    """`directory_sha256` of a checkpoint in a local directory; None for a hub id."""
    path = Path(model_id).expanduser()
    return directory_sha256(path) if path.is_dir() else None


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk (before it is renamed into view, or after)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
