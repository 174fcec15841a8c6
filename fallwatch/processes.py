"""Services as `python -m <package>` processes on given settings: for the demo, the benchmarks and the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from core.settings import CONFIG_ENV, Settings, settings_data


def tied_to_this_process(command: list[str]) -> list[str]:
    """`command`, run so that it gets SIGTERM when this process dies, by kill -9 too (Linux's parent-death
    signal, set by util-linux's `setpriv` before it execs the command); unchanged where there is no setpriv.

    The signal follows the thread that starts the command: start it from one that lives as long as it must.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command


def write_config(settings: Settings, path: Path) -> dict[str, str]:
    """Write settings as a YAML config, readable by its owner only (it holds the secrets); returns the
    environment for a subprocess that reads it."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(yaml.safe_dump(settings_data(settings)))
    return {**os.environ, CONFIG_ENV: str(path), "PYTHONUNBUFFERED": "1"}


def start_services(settings: Settings, config: Path, packages: Mapping[str, str]) -> dict[str, subprocess.Popen]:
    """`python -m <package>` per name, all on these settings (written to `config`), each logging to
    `<name>.log` beside the config; each stops when this process dies."""
    env = write_config(settings, config)
    processes = {}
    for name, package in packages.items():
        with (config.parent / f"{name}.log").open("wb") as log:
            processes[name] = subprocess.Popen(
                tied_to_this_process([sys.executable, "-m", package]), env=env, stdout=log, stderr=subprocess.STDOUT
            )
    return processes


def stop_services(processes: Iterable[subprocess.Popen], timeout_s: float = 30.0) -> None:
    """SIGTERM to every one still running, then wait for each; one that is not gone within `timeout_s` is killed."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
