"""Every kind of operator mistake is one `error:` line and exit status 2; the settings in effect, shown.

Kinds: a YAML syntax error, a usage error (unknown option, a value not among the choices), an
unreachable broker, a port in use, a setting another service reads, secrets. An unreachable
Redis is in test_producers (`cameras status`); a missing checkpoint in test_cli.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from core.settings import CameraSettings, ConfigError, load_settings
from fallwatch.stack import free_port
from tests.conftest import REPO, run_fallwatch


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The `error:` lines (logs may precede them on stderr); a traceback is never one of them."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def python_m(package: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", package, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture
def broken_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text("kafka:\n  partitions: 4\n bootstrap_servers: kafka:9092\n")
    return path


def test_a_yaml_syntax_error_names_the_file_and_the_line(broken_yaml: Path) -> None:
    for result in (
        run_fallwatch("--config", str(broken_yaml), "edge"),
        run_fallwatch("edge", "--config", str(broken_yaml)),  # after the subcommand too
        python_m("edge_workers", "--config", str(broken_yaml)),  # and in a service's own entry
    ):
        assert error_lines(result) == [
            f"error: config file {broken_yaml} line 3 column 2: expected <block end>, but found "
            "'<block mapping start>' (while parsing a block mapping)"
        ]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FALLWATCH_KAFKA": "localhost:9092"},
         'error: invalid settings: error parsing value for field "kafka" from source "EnvSettingsSource"'),
        ({"FALLWATCH_KAFKA__BOOTSTRAP_SERVERS": "localhost:abc"}, "error: invalid settings: "
         "kafka.bootstrap_servers: 'localhost:abc' is not host:port (a comma-separated list, no scheme)"),
        ({"FALLWATCH_KAFKA__BOOTSTRAP_SERVERS": "kafka:9092,kafka://b:9092"}, "error: invalid settings: "
         "kafka.bootstrap_servers: 'kafka://b:9092' is not host:port (a comma-separated list, no scheme)"),
        ({"FALLWATCH_REDIS__URL": "secret@localhost:6379"},
         "error: invalid settings: redis.url: must start with redis://, rediss:// (TLS) or unix://"),
    ],
    ids=["section-not-json", "port-not-a-number", "a-scheme", "redis-without-scheme"],
)  # fmt: skip
def test_a_mistaken_address_or_environment_variable_is_one_line(env: dict[str, str], message: str) -> None:
    result = python_m("fallwatch", "config", "check", env=env)
    assert error_lines(result) == [message]
    assert "secret" not in result.stderr, "a URL may hold a password: it is not echoed"


def test_a_config_file_that_is_not_sections_is_one_line(tmp_path: Path) -> None:
    listed = tmp_path / "listed.yaml"
    listed.write_text("- kafka\n- redis\n")
    result = run_fallwatch("--config", str(listed), "config", "check")
    assert error_lines(result) == [
        f"error: config file {listed}: its top level must be sections (kafka:, …), not a list"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("edge", "--bogus"), "error: No such option: --bogus (see fallwatch edge --help)"),
        (
            ("demo", "--models", "huge"),
            "error: Invalid value for '--models': 'huge' is not one of 'auto', 'reference', 'tiny'. "
            "(see fallwatch demo --help)",
        ),
        (
            ("health", "printer"),
            "error: Invalid value for 'service': 'printer' is not one of "
            "'producer', 'edge', 'cloud', 'alerting', 'dashboard'. (see fallwatch health --help)",
        ),
        (("fly",), "error: No such command 'fly'. (see fallwatch --help)"),
    ],
)
def test_usage_errors_are_one_line(args: tuple[str, ...], message: str) -> None:
    result = run_fallwatch(*args)
    assert result.stderr.strip().splitlines() == [message] and result.returncode == 2


def test_an_unreachable_broker_is_one_line_naming_the_setting_after_a_bounded_retry() -> None:
    nothing_there = f"127.0.0.1:{free_port()}"
    env = {"FALLWATCH_KAFKA__BOOTSTRAP_SERVERS": nothing_there, "FALLWATCH_KAFKA__CONNECT_TIMEOUT_S": "2"}
    result = run_fallwatch("topics", "create", env=env)
    [line] = error_lines(result)
    assert line.startswith(f"error: Kafka at {nothing_there} (kafka.bootstrap_servers) unreachable for 2 s: ")
    assert "retry 1 in" in result.stderr, "it retried before giving up"


@pytest.fixture
def port_in_use() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_metrics_port_in_use_names_the_setting(port_in_use: int, stack_state, clip_path: Path) -> None:
    env = {"FALLWATCH_PRODUCERS__METRICS_PORT": str(port_in_use),
           "FALLWATCH_KAFKA__BOOTSTRAP_SERVERS": stack_state.bootstrap_servers}  # fmt: skip
    result = python_m("producers", "--video", str(clip_path), env=env)
    assert error_lines(result) == [
        f"error: producers.metrics_port: port {port_in_use} is already in use (another service, or a second copy)"
    ]
    assert "Unclosed" not in result.stderr, "nothing was started before the port was found taken"


def test_the_dashboard_port_in_use_names_the_setting(port_in_use: int, stack_state) -> None:
    env = {"FALLWATCH_ALERTING__DASHBOARD_PORT": str(port_in_use), "FALLWATCH_ALERTING__DASHBOARD_TOKEN": "t",
           "FALLWATCH_ALERTING__DASHBOARD_HOST": "0.0.0.0",
           "FALLWATCH_KAFKA__BOOTSTRAP_SERVERS": stack_state.bootstrap_servers}  # fmt: skip
    result = run_fallwatch("dashboard", env=env)
    assert error_lines(result) == [
        f"error: alerting.dashboard_port: port {port_in_use} is already in use (another service, or a second copy)"
    ]


def test_a_service_validates_only_the_settings_it_reads(tmp_path: Path) -> None:
    config = tmp_path / "fallwatch.yaml"
    config.write_text(yaml.safe_dump({
        "alerting": {"webhook_urls": ["https://nurse-call.example/hook"]},  # no webhook_secret: alerting's mistake
        "edge": {"batch_size": 0},  # the edge worker's mistake
    }))  # fmt: skip
    producer = python_m("producers", "--config", str(config), "--video", "/nonexistent.mp4")
    assert error_lines(producer) == ["error: video file not found: /nonexistent.mp4"], "past the settings"
    assert run_fallwatch("config", "check", "--service", "producer", "-c", str(config)).returncode == 0
    [alerting] = error_lines(run_fallwatch("config", "check", "--service", "alerting", "-c", str(config)))
    assert "webhook_secret (or webhook_secret_file) must be set" in alerting and "edge" not in alerting
    every = run_fallwatch("config", "check", "-c", str(config))
    assert every.returncode == 2 and "invalid settings (2 problems)" in every.stderr


def test_version_short_help_and_choices_in_help() -> None:
    assert run_fallwatch("--version").stdout.strip().startswith("fallwatch ")
    assert python_m("producers", "--version").stdout.strip().startswith("fallwatch ")
    short = run_fallwatch("edge", "-h")
    assert short.returncode == 0 and "--config" in short.stdout and "Run an edge worker" in short.stdout
    wide = {"COLUMNS": "200"}  # help tables wrap long cells at the terminal's width
    assert "<auto|reference|tiny>" in run_fallwatch("demo", "--help", env=wide).stdout
    assert "<tiny|configured|random-7b>" in run_fallwatch("bench", "cloud", "--help", env=wide).stdout
    assert "producer|edge|cloud|alerting|dashboard|dmd" in run_fallwatch("config", "show", "--help", env=wide).stdout


def test_config_show_tells_where_each_value_came_from_and_never_shows_a_secret(tmp_path: Path) -> None:
    secret = tmp_path / "webhook_secret"
    secret.write_text("from-a-file\n")
    config = tmp_path / "fallwatch.yaml"
    config.write_text(yaml.safe_dump({
        "producers": {"cameras": [{"id": "cam-1", "room": "1", "url": "rtsp://admin:hunter2@10.0.0.5/stream",
                                   "detect_url": "rtsp://admin:hunter4@10.0.0.5/sub"}]},
        "alerting": {"dashboard_token": "hunter3", "webhook_secret_file": str(secret),
                     "webhook_urls": ["https://hooks.example/T000/B000/abcdef"]},
    }))  # fmt: skip
    result = run_fallwatch("config", "show", "-c", str(config), env={"FALLWATCH_EDGE__BATCH_SIZE": "16"})
    assert result.returncode == 0, result.stderr
    shown = {line.split()[0]: line.split(maxsplit=1)[1] for line in result.stdout.splitlines()}
    assert shown["edge.batch_size"].split() == ["16", "#", "env", "FALLWATCH_EDGE__BATCH_SIZE"]
    assert shown["edge.batch_wait_ms"].split() == ["50", "#", "default"]
    assert shown["alerting.dashboard_token"].split() == ["***", "#", "file", str(config)]
    assert shown["alerting.webhook_secret"].split() == ["(not", "set)", "#", "default"]
    assert shown["alerting.webhook_secret_file"].split()[0] == str(secret)
    assert shown["producers.cameras.0.url"].split()[0] == "rtsp://***@10.0.0.5/stream"
    assert shown["producers.cameras.0.detect_url"].split()[0] == "rtsp://***@10.0.0.5/sub"
    assert shown["alerting.webhook_urls"].split()[0] == '["https://hooks.example/***"]'
    for secret_text in ("hunter2", "hunter3", "hunter4", "from-a-file", "abcdef"):
        assert secret_text not in result.stdout + result.stderr


def test_secrets_come_from_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    password = tmp_path / "camera_password"
    password.write_text("p@ss word\n")
    camera = CameraSettings(id="cam-1", room="1", url="rtsp://admin@10.0.0.5/stream", password_file=password)
    assert camera.source_url == "rtsp://admin:p%40ss%20word@10.0.0.5/stream", "quoted into the url it opens"
    assert "p@ss" not in repr(camera) and camera.url == "rtsp://admin@10.0.0.5/stream"
    with pytest.raises(ValueError, match="password_file needs a user in the url"):
        CameraSettings(id="cam-1", room="1", url="rtsp://10.0.0.5/stream", password_file=password)
    monkeypatch.setenv("FALLWATCH_ALERTING__DASHBOARD_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"dashboard_token_file .*missing cannot be read: No such file"):
        load_settings(("alerting",))
    assert load_settings(("producers",)).producers.cameras == [], "a service that does not read it is not stopped"
