"""The switcher registry as an edge worker sees it: the newest version, and hot reload.

The registry is a directory of versions written by `edge_workers.switcher.save_switcher`
(atomically, so a half-written version is never seen). A worker checks it every
`registry_poll_s`; a publisher can also announce a new version by setting a Redis key
(`announce_switcher`), which the worker reads every batch, so a new switcher is picked up
within one batch instead of one poll period. A new version loads in the background while the
worker goes on answering; the worker swaps it in between batches, so every frame is answered by
exactly one switcher and offsets stay committed after acks.

A version made for another edge model or hidden size is refused with one log line and the
running switcher stays; the refused version is not retried (publish a new version instead).

With `edge.model_registry` the worker serves an edge model and its switcher published together
(`fallwatch dmd adapt`), and follows the registry's ACTIVE pointer (rollback included); see below.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis import Redis as SyncRedis

from core.checkpoints import directory_sha256, fsync_path, local_checkpoint_sha256
from core.locks import file_lock
from core.operator_events import operator_event
from core.settings import ConfigError
from edge_workers.switcher import (
    VERSION_PATTERN,
    Switcher,
    SwitcherMetadata,
    SwitcherMismatch,
    check_compatible,
    latest_version,
    load_switcher,
    save_switcher,
)
from schemas import OperatorEvent, validation_problems

if TYPE_CHECKING:
    from edge_workers.model import EdgeModel

log = logging.getLogger(__name__)

LoadedT = TypeVar("LoadedT")  # what a registry loads: a switcher, or an edge model with its switcher


@dataclass(frozen=True)
class ActiveSwitcher:
    switcher: Switcher
    metadata: SwitcherMetadata
    path: Path


def announce_switcher(redis: SyncRedis, key: str, version: str) -> None:
    """Tell running edge workers that `version` is in the registry (they check the key every batch)."""
    redis.set(key, version)


class PolledRegistry(Generic[LoadedT]):
    """A registry directory the worker looks at again when the announcement changes, or every `poll_s`.

    A new version loads in the background (`look`, which subclasses implement) while the worker
    answers with the one it serves; `refresh` hands it over once loaded, between two batches.
    """

    def __init__(
        self, directory: Path, poll_s: float, announce_key: str | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.directory = directory
        self.poll_s = poll_s
        self.announce_key = announce_key
        self.clock = clock
        self.next_poll = clock() + poll_s
        self.last_announced: bytes | None = None
        self.refused: set[str] = set()  # versions that did not fit: not tried again
        self.events: list[OperatorEvent] = []  # refusals not sent to operator-events yet
        self.loading: asyncio.Task[LoadedT | None] | None = None

    def refuse(self, name: str, message: str) -> None:
        self.refused.add(name)
        self.events.append(operator_event(log, logging.ERROR, "version_refused", "edge_workers", message, None, name))

    def due(self, announced: bytes | None) -> bool:
        """Time to look: `announced` (the key's value now) changed, or the poll interval is over."""
        now = self.clock()
        if announced == self.last_announced and now < self.next_poll:
            return False
        self.last_announced = announced
        self.next_poll = now + self.poll_s
        return True

    async def refresh(self, current: ActiveSwitcher, announced: bytes | None) -> LoadedT | None:
        """A new version whose background load has finished since the last call, else None.

        `announced` is the announcement key's value now (the last one seen while Redis is down). A
        due look starts the load; a load can take seconds (a real edge model's `from_pretrained` and
        its CPU-option check), and the worker's cameras are answered meanwhile.
        """
        if self.loading is None:
            if self.due(announced):
                self.loading = asyncio.create_task(self.look(current))
            return None
        if not self.loading.done():
            return None
        loaded, self.loading = self.loading, None
        return loaded.result()

    async def look(self, current: ActiveSwitcher) -> LoadedT | None:
        """The version to serve instead of `current`'s, loaded; None when there is none or it is refused."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Give up a load in progress (its thread ends on its own)."""
        if self.loading is not None:
            self.loading.cancel()
            await asyncio.gather(self.loading, return_exceptions=True)
            self.loading = None


class SwitcherRegistry(PolledRegistry[ActiveSwitcher]):
    def __init__(
        self,
        directory: Path,
        edge_model: str,
        hidden_size: int,
        poll_s: float,
        announce_key: str | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(directory, poll_s, announce_key, clock)
        self.edge_model = edge_model
        self.edge_model_sha256 = local_checkpoint_sha256(edge_model)
        self.hidden_size = hidden_size

    def load_newest(self) -> ActiveSwitcher:
        """The newest version at start-up; a missing or unfit switcher is a configuration mistake."""
        newest = latest_version(self.directory)
        if newest is None:
            raise ConfigError(
                f"no switcher in {self.directory}: train one (fallwatch dmd) "
                "or create an untrained one (fallwatch models tiny)"
            )
        try:
            return self._load(newest)
        except Exception as exc:  # a mismatch or an unreadable artifact: one line, not a traceback
            raise ConfigError(f"cannot use switcher {newest}: {exc}") from None

    async def look(self, current: ActiveSwitcher) -> ActiveSwitcher | None:
        """A newer fitting switcher when one was published since `current`, else None."""
        newest = await asyncio.to_thread(latest_version, self.directory)
        if newest is None or newest.name <= current.metadata.version or newest.name in self.refused:
            return None
        try:
            loaded = await asyncio.to_thread(self._load, newest)
        except Exception as exc:  # keep serving with the switcher that works
            self.refuse(newest.name, f"switcher {newest.name} refused, keeping {current.metadata.version}: {exc}")
            return None
        log.info(
            "switcher %s loaded (threshold %.3f), replacing %s",
            loaded.metadata.version,
            loaded.metadata.threshold,
            current.metadata.version,
        )
        return loaded

    def _load(self, path: Path) -> ActiveSwitcher:
        switcher, metadata = load_switcher(path)
        check_compatible(metadata, self.edge_model, self.hidden_size, self.edge_model_sha256)
        return ActiveSwitcher(switcher, metadata, path)


# --- edge model and switcher published together (`edge.model_registry`) ---------------------------
#
# <registry>/<version>/edge/                the edge model (save_pretrained)
# <registry>/<version>/switcher/<version>/  the switcher, bound to that edge model by its hash
# <registry>/<version>/version.json         `PairVersion`: hashes, the calibration the drift guard reads
# <registry>/ACTIVE                         `ActivePointer`: the version workers serve, and the ones before
#
# Publishing writes a version (atomically, as switchers are) and then points ACTIVE at it; rollback
# points ACTIVE at the previous one. Workers follow ACTIVE, newer or older.

ACTIVE_FILE = "ACTIVE"
VERSION_FILE = "version.json"
LOCK_FILE = ".lock"  # held while ACTIVE is read and replaced
PAIR_EDGE_DIR = "edge"
PAIR_SWITCHER_DIR = "switcher"


class Calibration(BaseModel):
    """What the pair does on frames it did not learn from: the drift guard compares live cameras with it."""

    model_config = ConfigDict(extra="forbid")

    frames: int = Field(ge=0)
    fall_rate: float = Field(ge=0, le=1, description="share of frames the edge calls a fall")
    offload_share: float = Field(ge=0, le=1, description="share of frames the switcher sends to the cloud")
    score_quantiles: list[float] = Field(description="deciles of the switcher's scores (10 %, 20 %, … 90 %)")


class PairVersion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=VERSION_PATTERN)
    created_at: datetime
    parent: str | None = Field(description="the version that was active when this one was made")
    edge_base: str = Field(description="the edge model this one was adapted from")
    edge_sha256: str = Field(description="of the edge directory's files; the switcher names it too")
    switcher_sha256: str
    calibration: Calibration
    training_window: str
    gate: dict[str, float] = Field(default_factory=dict)


class ActivePointer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    previous: list[str] = Field(default_factory=list, description="versions active before, the latest last")


def read_active(registry: Path) -> ActivePointer | None:
    """The pointer, None when there is none; a ConfigError naming the file when it cannot be read."""
    path = registry / ACTIVE_FILE
    if not path.is_file():
        return None
    try:
        return ActivePointer.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise ConfigError(f"{path} is not a pointer to a version: {validation_problems(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a pointer to a version: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc}") from None


def active_version(registry: Path) -> str | None:
    pointer = read_active(registry)
    return None if pointer is None else pointer.version


def write_active(registry: Path, pointer: ActivePointer) -> None:
    """Replace ACTIVE atomically: a worker reads the old pointer or the new one, never half of one."""
    staging = registry / f".{ACTIVE_FILE}.{uuid.uuid4().hex}.tmp"
    staging.write_text(pointer.model_dump_json(indent=2))
    fsync_path(staging)
    os.replace(staging, registry / ACTIVE_FILE)
    fsync_path(registry)


def activate(registry: Path, version: str, replacing: str | None) -> None:
    """Make `version` active, if ACTIVE still names `replacing` (the version it was judged against; None:
    no version was active): a rollback or another publish meanwhile leaves ACTIVE as it is."""
    with file_lock(registry / LOCK_FILE):  # a publish and a rollback never interleave
        current = read_active(registry)
        if active_version(registry) != replacing:
            now = "no version" if current is None else current.version
            raise ConfigError(
                f"not published: ACTIVE moved from {replacing or 'no version'} to {now} while {version} was made "
                "(a rollback or another publish); ACTIVE unchanged, adapt again to judge against it"
            )
        previous = [] if current is None else [*current.previous, current.version]
        write_active(registry, ActivePointer(version=version, previous=previous))


def rollback(registry: Path) -> tuple[str, str]:
    """Point ACTIVE back at the version active before, if that version still loads; returns (from, to)."""
    with file_lock(registry / LOCK_FILE):  # a publish and a rollback never interleave
        current = read_active(registry)
        if current is None:
            raise ConfigError(f"nothing to roll back: no version is active in {registry}")
        if not current.previous:
            raise ConfigError(f"nothing to roll back to: {current.version} is the first version in {registry}")
        back_to = current.previous[-1]
        try:
            pair_files(registry, back_to)
        except (ConfigError, OSError, ValueError, SwitcherMismatch) as exc:
            raise ConfigError(f"cannot roll back to {back_to}: {exc}; ACTIVE still names {current.version}") from None
        write_active(registry, ActivePointer(version=back_to, previous=current.previous[:-1]))
    return current.version, back_to


def pair_edge_name(version: str) -> str:
    """The edge model's name inside a pair: verdicts carry it, and the pair's switcher is made for it."""
    return f"{version}/{PAIR_EDGE_DIR}"


def save_pair(
    registry: Path, version: PairVersion, edge_dir: Path, switcher: Switcher, switcher_metadata: SwitcherMetadata
) -> Path:
    """Write `<registry>/<version>/` atomically from a saved edge model and a switcher; does not activate it."""
    registry.mkdir(parents=True, exist_ok=True)
    final = registry / version.version
    if final.exists():
        raise FileExistsError(f"version {version.version} already exists in {registry}")
    staging = registry / f".{version.version}.{uuid.uuid4().hex}.tmp"
    try:
        shutil.copytree(edge_dir, staging / PAIR_EDGE_DIR)
        edge_sha256 = directory_sha256(staging / PAIR_EDGE_DIR)
        bound = switcher_metadata.model_copy(
            update={
                "edge_model": pair_edge_name(version.version),
                "edge_model_revision": edge_sha256,
                "edge_model_sha256": edge_sha256,
            }
        )
        switcher_dir = save_switcher(staging / PAIR_SWITCHER_DIR, switcher, bound)
        written = version.model_copy(
            update={"edge_sha256": edge_sha256, "switcher_sha256": directory_sha256(switcher_dir)}
        )
        (staging / VERSION_FILE).write_text(written.model_dump_json(indent=2))
        # on disk before ACTIVE can name it: after a power cut, a version ACTIVE names is whole
        for path in sorted(staging.rglob("*"), reverse=True):
            fsync_path(path)
        fsync_path(staging)
        staging.rename(final)
        fsync_path(registry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def read_pair_version(registry: Path, version: str) -> PairVersion:
    path = registry / version / VERSION_FILE
    if not path.is_file():
        raise ConfigError(f"version {version} is not in {registry} (no {VERSION_FILE})")
    return PairVersion.model_validate_json(path.read_text())


@dataclass(frozen=True)
class PairFiles:
    version: PairVersion
    edge_dir: Path
    switcher_dir: Path


def pair_files(registry: Path, name: str) -> PairFiles:
    """A version's edge model and switcher, checked against the hashes its record holds."""
    version = read_pair_version(registry, name)
    edge_dir = registry / name / PAIR_EDGE_DIR
    if directory_sha256(edge_dir) != version.edge_sha256:
        raise SwitcherMismatch(f"the edge model of {name} does not match its recorded hash")
    switcher_dir = latest_version(registry / name / PAIR_SWITCHER_DIR)
    if switcher_dir is None or directory_sha256(switcher_dir) != version.switcher_sha256:
        raise SwitcherMismatch(f"the switcher of {name} is missing or does not match its recorded hash")
    return PairFiles(version, edge_dir, switcher_dir)


def active_pair_files(registry: Path) -> PairFiles:
    """The files of the version ACTIVE names, as a worker would serve them; one readable line otherwise."""
    pointer = read_active(registry)
    if pointer is None:
        raise ConfigError(f"no active version in {registry} (edge.model_registry): run `fallwatch dmd adapt`")
    try:
        return pair_files(registry, pointer.version)
    except ConfigError:
        raise
    except Exception as exc:  # a mismatch or an unreadable record
        raise ConfigError(f"cannot use version {pointer.version}: {exc}") from None


@dataclass(frozen=True)
class LoadedPair:
    version: PairVersion
    model: EdgeModel
    switcher: ActiveSwitcher


class PairRegistry(PolledRegistry[LoadedPair]):
    """The edge worker's view of `edge.model_registry`: the active pair, and the next one when ACTIVE moves."""

    def __init__(
        self,
        directory: Path,
        load_model: Callable[[Path], EdgeModel],
        poll_s: float,
        announce_key: str | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(directory, poll_s, announce_key, clock)
        self.load_model = load_model
        self.pointer_problem: str | None = None  # the last unreadable ACTIVE, reported once

    def load_active(self) -> LoadedPair:
        files = active_pair_files(self.directory)
        try:
            return self._load(files)
        except ConfigError:
            raise
        except Exception as exc:  # an unreadable artifact: one line, not a traceback
            raise ConfigError(f"cannot use version {files.version.version}: {exc}") from None

    async def look(self, current: ActiveSwitcher) -> LoadedPair | None:
        """The active pair when ACTIVE names another version than `current`'s, else None."""
        running = current.metadata.edge_model.split("/")[0]
        try:
            pointer = await asyncio.to_thread(read_active, self.directory)
        except ConfigError as exc:  # edited by hand, half copied: keep serving the pair that works
            problem = f"{exc}; keeping {running}"
            if problem != self.pointer_problem:
                self.pointer_problem = problem
                self.events.append(operator_event(log, logging.ERROR, "version_refused", "edge_workers", problem))
            return None
        self.pointer_problem = None
        if pointer is None or pointer.version == running or pointer.version in self.refused:
            return None
        try:
            loaded = await asyncio.to_thread(lambda: self._load(pair_files(self.directory, pointer.version)))
        except Exception as exc:  # keep serving with the pair that works
            self.refuse(pointer.version, f"version {pointer.version} refused, keeping {running}: {exc}")
            return None
        now_active = await asyncio.to_thread(self._active_or_none)
        if now_active != pointer.version:  # a rollback or a publish during the load: follow ACTIVE, not the load
            log.info("version %s loaded, but ACTIVE names %s now: not served", pointer.version, now_active)
            self.next_poll = self.clock()  # look again at the next batch
            return None
        log.info("version %s loaded (edge model and switcher), replacing %s", pointer.version, running)
        return loaded

    def _active_or_none(self) -> str | None:
        try:
            return active_version(self.directory)
        except ConfigError:  # unreadable now: reported by the next look
            return None

    def _load(self, files: PairFiles) -> LoadedPair:
        name = files.version.version
        model = self.load_model(files.edge_dir)
        model.name = pair_edge_name(name)
        switcher, metadata = load_switcher(files.switcher_dir)
        check_compatible(metadata, model.name, model.hidden_size)
        if metadata.edge_model_revision != files.version.edge_sha256:
            raise SwitcherMismatch(f"the switcher of {name} was made for another edge model")
        return LoadedPair(files.version, model, ActiveSwitcher(switcher, metadata, files.switcher_dir))
