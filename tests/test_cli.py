"""The command line, the documented config and the production compose file."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient

from core.runtime import exit_on_sigterm, signals_set
from core.settings import CONFIG_ENV, Settings, load_settings
from dmd_offline.clips import LabelledClip
from fallwatch.cli import app
from fallwatch.demo import clip_outcome, demo_settings
from fallwatch.devkit.models import ModelPaths
from fallwatch.processes import write_config
from fallwatch.stack import (
    LocalStack,
    ServiceState,
    StackError,
    StackState,
    free_port,
    pid_alive,
    process_start_time,
    stop_pid,
)
from schemas import FallEvent, Topics
from tests.conftest import run_fallwatch

REPO = Path(__file__).resolve().parents[1]


def command_names() -> set[str]:
    import typer.main

    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_every_service_has_a_subcommand() -> None:
    services = {"producer", "edge", "cloud", "alerting", "dashboard", "dmd"}
    assert services | {"stack", "models", "demo", "bench", "cameras"} <= command_names()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("--config", "/nonexistent.yaml", "edge"), {}, "config file /nonexistent.yaml does not exist"),
        (("producer", "--video", "/nonexistent.mp4"), {}, "video file not found: /nonexistent.mp4"),
        (("producer", "--video", str(REPO / "README.md"), "--fps", "0"), {}, "fps: Input should be greater than 0"),
        (("edge",), {"FALLWATCH_EDGE__BATCH_SIZE": "zero"}, "edge.batch_size"),
        (("demo", "--clips", "/nonexistent-folder"), {}, "point the demo at a folder of your own videos"),
        (("edge",), {"FALLWATCH_EDGE__BATCH_WAIT_MS": "0"}, "edge.batch_wait_ms"),
        (
            ("demo", "--models", "huge"),
            {},
            "Invalid value for '--models': 'huge' is not one of 'auto', 'reference', 'tiny'",
        ),
        (("bench", "edge", "--plumbing-passes", "0"), {}, "--plumbing-passes"),
        (("bench", "edge", "--warmup-frames", "-1"), {}, "--warmup-frames must be 0 or more"),
    ],
)
def test_user_mistakes_get_one_readable_line(args: tuple[str, ...], env: dict[str, str], message: str) -> None:
    result = run_fallwatch(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_unknown_command_is_a_usage_error_not_a_traceback() -> None:
    result = run_fallwatch("fly")
    assert result.returncode == 2
    assert "No such command" in result.stderr and "Traceback" not in result.stderr


def test_python_dash_m_runs_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_workers", "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0 and "Run an edge worker" in result.stdout


def test_example_config_is_valid_and_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    example = REPO / "config" / "fallwatch.example.yaml"
    monkeypatch.setenv(CONFIG_ENV, str(example))
    settings = load_settings()
    documented = yaml.safe_load(example.read_text())
    assert set(documented) == set(type(settings).model_fields), "every top-level setting is documented"
    for section in ("kafka", "edge", "cloud", "alerting", "eval"):
        assert set(documented[section]) == set(type(getattr(settings, section)).model_fields), section
    assert settings.producers.cameras[0].id == "cam-101"
    for shipped in (settings, Settings()):  # the example's and the defaults
        # a cloud answer alerting no longer waits for costs the GPU and is a second final verdict of its frame
        rooms = [shipped.alerting.rule_for(room) for room in shipped.alerting.rooms]
        waits = [shipped.alerting.cloud_wait_s, *(rule.cloud_wait_s for rule in rooms)]
        assert shipped.edge.cloud_deadline_s <= min(waits)


async def partition_counts(bootstrap_servers: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        return {topic["topic"]: len(topic["partitions"]) for topic in await admin.describe_topics(Topics().all())}
    finally:
        await admin.close()


def test_the_config_a_service_is_started_with_keeps_the_secrets_given_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stack_state
) -> None:
    """The demo's and the benchmarks' services read their settings from a file written for them: a password
    given inline must reach them, not pydantic's mask of it."""
    base = Settings(
        kafka={**stack_state.kafka_fields(), "sasl_password": "kafka-secret"},
        redis={**stack_state.redis_fields(), "password": "redis-secret"},
        alerting={"mqtt": {"password": "mqtt-secret"}},
    )
    config = tmp_path / "service.yaml"
    env = write_config(demo_settings(base, {}, [tmp_path / "clip.mp4"], 2.0), config)
    assert config.stat().st_mode & 0o777 == 0o600, "it holds the secrets: readable by its owner only"
    monkeypatch.setenv(CONFIG_ENV, env[CONFIG_ENV])
    loaded = load_settings()
    secrets = (loaded.kafka.sasl_password, loaded.redis.password, loaded.alerting.mqtt.password)
    assert [s.get_secret_value() if s else None for s in secrets] == ["kafka-secret", "redis-secret", "mqtt-secret"]


def test_stack_up_status_down_uses_free_ports(tmp_path: Path, stack_state) -> None:
    env = {"FALLWATCH_STATE_DIR": str(tmp_path / "state"), "FALLWATCH_CACHE_DIR": str(REPO / ".cache")}
    up = run_fallwatch("stack", "up", env=env)
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((tmp_path / "state" / "stack.json").read_text())
        # the session's stack already holds its ports: this one must have found others
        assert state["kafka"]["port"] != stack_state.kafka.port
        assert state["redis"]["port"] != stack_state.redis.port
        assert state["mqtt"]["port"] != stack_state.mqtt.port
        assert state["clients"]["mqtt"] == {"host": "127.0.0.1", "port": state["mqtt"]["port"]}
        assert asyncio.run(partition_counts(f"127.0.0.1:{state['kafka']['port']}")) == {
            name: 4 for name in Topics().all()
        }, "every topic is created with 4 partitions"
        status = run_fallwatch("stack", "status", env=env)
        assert status.returncode == 0
        assert "kafka: up" in status.stdout and "redis: up" in status.stdout and "mqtt: up" in status.stdout
        # Kafka dies (out of memory, say); `stack up` again stops what is left of the stack before it
        # starts a whole one, or redis-server and mosquitto would run on unknown to any state
        os.kill(state["kafka"]["pid"], signal.SIGKILL)
        again = run_fallwatch("stack", "up", env=env)
        assert again.returncode == 0, again.stderr
        assert not pid_alive(state["redis"]["pid"]) and not pid_alive(state["mqtt"]["pid"])
        state = json.loads((tmp_path / "state" / "stack.json").read_text())
        assert all(pid_alive(state[name]["pid"]) for name in ("kafka", "redis", "mqtt"))
    finally:
        down = run_fallwatch("stack", "down", env=env)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not pid_alive(state["mqtt"]["pid"]), "mosquitto stops with the stack"
    after = run_fallwatch("stack", "status", env=env)
    assert after.returncode == 1 and "no local stack" in after.stdout


def test_services_find_the_stack_of_the_state_dir_their_config_file_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stack up` with `state_dir` in the config file writes its addresses there: the services must read them
    from there too (they read `.fallwatch/` only), or they connect to another stack or none."""
    stack = LocalStack(tmp_path / "state", REPO / ".cache")
    stack.state_dir.mkdir(parents=True)
    kafka, redis = ServiceState(1, free_port(), "kafka.log"), ServiceState(1, free_port(), "redis.log")
    stack.write_state(StackState(kafka=kafka, kafka_controller_port=free_port(), redis=redis, security=None, mqtt=None))
    config = tmp_path / "fallwatch.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(stack.state_dir)}))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    monkeypatch.delenv("FALLWATCH_STATE_DIR", raising=False)
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == f"127.0.0.1:{kafka.port}"
    assert settings.redis.url == f"redis://127.0.0.1:{redis.port}/0"


def test_a_java_too_old_for_kafka_is_one_line_and_nothing_is_left_running(tmp_path: Path, stack_state) -> None:
    """Java 11 cannot load Kafka 4's classes; this machine has 17, so a `java` that answers as an old one
    does (the one thing faked: a JVM this machine does not have)."""
    old_java = tmp_path / "bin" / "java"
    old_java.parent.mkdir()
    old_java.write_text(
        "#!/bin/sh\n"
        "echo 'Error: LinkageError occurred while loading main class kafka.tools.StorageTool' >&2\n"
        "echo 'java.lang.UnsupportedClassVersionError: kafka/tools/StorageTool has been compiled by a more "
        "recent version of the Java Runtime (class file version 61.0)' >&2\n"
        "exit 1\n"
    )
    old_java.chmod(0o755)
    state_dir = tmp_path / "state"
    env = {"FALLWATCH_STATE_DIR": str(state_dir), "FALLWATCH_CACHE_DIR": str(REPO / ".cache"),
           "PATH": f"{old_java.parent}:{os.environ['PATH']}"}  # fmt: skip
    result = run_fallwatch("stack", "up", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: Kafka's storage could not be formatted (java 17 or newer is needed): "
        "java.lang.UnsupportedClassVersionError: kafka/tools/StorageTool has been compiled by a more recent "
        "version of the Java Runtime (class file version 61.0)"
    )
    assert not (state_dir / "stack.json").exists()
    assert processes_in(state_dir) == [], "redis-server and mosquitto, started before Kafka, are stopped"


def processes_in(directory: Path) -> list[int]:
    """Processes whose command line or working directory names `directory` (redis-server rewrites its
    command line, and works in its data directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if str(directory) in cmdline or cwd.startswith(str(directory)):
            found.append(int(proc.name))
    return found


def test_stack_down_leaves_alone_a_process_that_took_a_server_s_pid(tmp_path: Path) -> None:
    """After a reboot, or once its servers exited, a stack's recorded pids may be other processes'."""
    other = subprocess.Popen(["sleep", "600"])
    ended = subprocess.Popen(["true"])
    ended.wait()
    try:
        stack = LocalStack(tmp_path / "state", REPO / ".cache")
        stack.state_dir.mkdir(parents=True)
        started = process_start_time(other.pid)
        assert started is not None

        def recorded(redis_started: int) -> StackState:
            gone = ServiceState(ended.pid, free_port(), "gone.log", None)
            redis = ServiceState(other.pid, free_port(), "redis.log", redis_started)
            return StackState(kafka=gone, kafka_controller_port=free_port(), redis=redis, security=None, mqtt=gone)

        stack.write_state(recorded(started + 1))  # the server that had this pid started at another time
        assert stack.down()
        assert other.poll() is None, "the process now holding the pid keeps running"
        stack.write_state(recorded(started))  # the stack's own server: stopped
        assert stack.down()
        assert not pid_alive(other.pid), "stopped (and reaped)"
    finally:
        other.kill()
        other.wait()


def test_sigterm_still_unwinds_a_command_after_its_event_loop_ends() -> None:
    """Inside the loop SIGTERM sets the stop event; after it (a demo stopping its services and its
    temporary stack), SIGTERM unwinds the command again instead of killing it on the spot."""
    original = signal.getsignal(signal.SIGTERM)
    try:
        exit_on_sigterm()
        unwinding = signal.getsignal(signal.SIGTERM)

        async def loop() -> bool:
            stop = asyncio.Event()
            with signals_set(stop):
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.wait_for(stop.wait(), 10)
            return stop.is_set()

        assert asyncio.run(loop()), "the loop's SIGTERM set the stop event"
        assert signal.getsignal(signal.SIGTERM) is unwinding
    finally:
        signal.signal(signal.SIGTERM, original)


def test_sigterm_stops_a_benchmarks_temporary_stack_and_removes_its_files(tmp_path: Path) -> None:
    """`timeout`, `kill` or a CI runner stop a command with SIGTERM: like Ctrl-C, the temporary broker and
    redis-server a benchmark started are stopped and its scratch directory (~1 GB of Kafka log) removed."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(scratch),  # where the benchmark's temporary directory goes
        "FALLWATCH_STATE_DIR": str(tmp_path / "no-stack"),  # no running stack to borrow: it starts its own
        "FALLWATCH_CACHE_DIR": str(REPO / ".cache"),
    }
    # its log goes to a file: a pipe nobody reads while it runs would block it once full (a loaded broker's
    # retry warnings fill one)
    log_path = tmp_path / "bench.log"
    with log_path.open("w") as log_file:
        bench = subprocess.Popen(
            [sys.executable, "-m", "fallwatch", "bench", "edge", "--plumbing-frames", "1000000", "--no-options"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log_file, text=True,
        )  # fmt: skip
    servers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while not (state_files := list(scratch.glob("fallwatch-bench-edge-*/stack/stack.json"))):
            assert bench.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the benchmark's stack never came up"
            time.sleep(0.1)  # polling for the stack's state file
        state = LocalStack(state_files[0].parent, REPO / ".cache").read_state()
        assert state is not None
        servers = [service.pid for service in state.services()]
        assert len(servers) == 3 and all(pid_alive(pid) for pid in servers)  # broker, redis-server, mosquitto
        bench.send_signal(signal.SIGTERM)
        try:
            status = bench.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("no exit within 120 s of SIGTERM; its log ends: " + log_path.read_text()[-3000:])
        still_running = [pid for pid in servers if pid_alive(pid)]
        left_behind = list(scratch.iterdir())
    finally:
        if bench.poll() is None:
            bench.kill()
        for pid in servers:  # whatever the outcome, leave no server running
            stop_pid(pid)
    assert status == 128 + signal.SIGTERM, log_path.read_text()[-3000:]
    assert still_running == [], "the broker, redis-server and mosquitto were stopped"
    assert left_behind == [], "the scratch directory was removed"


OWNS_A_TEMPORARY_STACK = """
import sys, threading
from pathlib import Path
from fallwatch.stack import LocalStack
stack = LocalStack(Path(sys.argv[1]), Path(sys.argv[2]), partitions=1)
state = stack.up({})
print(" ".join(str(service.pid) for service in state.services()), flush=True)
threading.Event().wait()
"""


def test_kill_9_of_the_process_that_started_a_temporary_stack_stops_its_servers(tmp_path: Path) -> None:
    """A demo, a benchmark or a test session killed with -9 runs no `finally`: its broker, redis-server and
    mosquitto must not run on (holding ports and a Kafka log) with nobody to stop them."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNS_A_TEMPORARY_STACK, str(tmp_path / "stack"), str(REPO / ".cache")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    servers: list[int] = []
    try:
        assert owner.stdout is not None
        servers = [int(pid) for pid in owner.stdout.readline().split()]
        assert len(servers) == 3 and all(pid_alive(pid) for pid in servers), "broker, redis-server, mosquitto"
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 60
        while (running := [pid for pid in servers if pid_alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)  # polling for the servers' exit
    finally:
        if owner.poll() is None:
            owner.kill()
        for pid in servers:  # whatever the outcome, leave no server running
            stop_pid(pid)
    assert running == [], "every server of the stack stopped when its owner was killed"


def test_a_server_whose_port_another_process_took_is_not_taken_for_started(tmp_path: Path) -> None:
    """Between choosing a free port and the server binding it, another process may take it: the stack must
    not take that process's listener for its server (which then exits, unable to bind)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack = LocalStack(tmp_path / "state", REPO / ".cache")
        stack.state_dir.mkdir(parents=True)
        with pytest.raises(StackError, match="redis-server exited"):
            stack.start_redis(port)
    assert processes_in(tmp_path / "state") == []


def test_models_tiny_writes_loadable_untrained_models(tmp_path: Path) -> None:
    result = run_fallwatch("models", "tiny", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    snippet = yaml.safe_load(result.stdout.split("use them with:\n", 1)[1])
    assert Path(snippet["edge"]["model"], "config.json").is_file()
    assert Path(snippet["cloud"]["model"], "config.json").is_file()
    assert any(Path(snippet["edge"]["switcher_registry"]).iterdir())
    assert "UNTRAINED" in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FALLWATCH_EDGE__MODEL": "/nonexistent/vilt"}, "the edge model directory /nonexistent/vilt does not exist"),
        ({"FALLWATCH_CLOUD__MODEL": "no-such-org/no-such-model"}, "cannot load the cloud model"),
    ],
)
def test_unloadable_checkpoints_get_one_line(env: dict[str, str], message: str) -> None:
    command = "edge" if "FALLWATCH_EDGE__MODEL" in env else "cloud"
    result = run_fallwatch(command, env={**env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_clip_outcome_compares_the_first_alert_with_the_annotated_fall_start() -> None:
    start = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    alert = FallEvent(
        alert_id="a",
        camera_id="cam-1",
        room="room-1",
        state="open",
        opened_at=start + timedelta(seconds=3.5),
        updated_at=start + timedelta(seconds=4.0),
        first_fall_at=start + timedelta(seconds=2),
        confidence=0.9,
        evidence_frame_ids=["f"],
        rule="3 of 5",
    )
    fall = LabelledClip("fall.mp4", is_fall=True, fall_start_s=1.5)
    no_fall = LabelledClip("adl.mp4", is_fall=False, fall_start_s=None)
    assert clip_outcome(fall, start, alert) == "alert +2.0 s after the fall start, sent +2.5 s"
    assert clip_outcome(fall, start, None) == "MISSED fall"
    assert clip_outcome(no_fall, start, alert) == "FALSE ALARM (opened at 3.5 s)"
    assert clip_outcome(no_fall, start, None) == "no alert (right)"
    assert clip_outcome(None, start, alert) == "alert"
    late_fall = LabelledClip("fall.mp4", is_fall=True, fall_start_s=3.5)
    assert clip_outcome(late_fall, start, alert) == "FALSE ALARM: opened 0.0 s before the fall started"


def test_demo_prints_a_final_verdict_for_every_frame(tmp_path: Path, clip_path: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / clip_path.name).symlink_to(clip_path)
    (clips / "clips.csv").write_text(f"file,label,fall_start_s\n{clip_path.name},fall,0.4\n")
    env = {"FALLWATCH_STATE_DIR": str(tmp_path / "state"), "FALLWATCH_CACHE_DIR": str(REPO / ".cache")}
    result = subprocess.run(
        [sys.executable, "-m", "fallwatch", "demo", "--clips", str(clips)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "TINY UNTRAINED" in result.stdout  # no reference pair was trained in this directory
    outcome = re.search(r"(MISSED fall|FALSE ALARM|alert [+-]\d+\.\d s after the fall start)", result.stdout)
    assert outcome is not None, "the summary judges the clip against clips.csv"
    summary = re.search(r"frames (\d+), final verdicts (\d+)", result.stdout)
    assert summary is not None and int(summary[1]) > 0 and summary[1] == summary[2], result.stdout[-1500:]
    printed = len(re.findall(r"^cam-1 room-1 frame +\d+ +(?:edge|cloud|edge-fallback) .* final$", result.stdout, re.M))
    assert printed == int(summary[1]), "each final verdict is printed as it arrives"
    assert not (tmp_path / "state" / "stack.json").exists(), "the stack the demo started is stopped again"


@pytest.mark.parametrize("command", ["edge", "cloud", "alerting"])
def test_a_service_started_while_kafka_is_down_retries_then_says_so_in_one_line(
    command: str, tiny_models: ModelPaths, tmp_path: Path
) -> None:
    sections = tiny_models.settings_sections()
    nothing_there = f"127.0.0.1:{free_port()}"
    env = {
        "FALLWATCH_STATE_DIR": str(tmp_path),
        "FALLWATCH_KAFKA__BOOTSTRAP_SERVERS": nothing_there,
        "FALLWATCH_KAFKA__CONNECT_TIMEOUT_S": "4",
        "FALLWATCH_EDGE__MODEL": sections["edge"]["model"],
        "FALLWATCH_EDGE__SWITCHER_REGISTRY": sections["edge"]["switcher_registry"],
        "FALLWATCH_CLOUD__MODEL": sections["cloud"]["model"],
        "FALLWATCH_CLOUD__DEVICE": "cpu",
    }
    result = run_fallwatch(command, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    retries = [
        line
        for line in result.stderr.splitlines()
        if f"Kafka at {nothing_there} (kafka.bootstrap_servers) not reachable" in line
    ]
    assert len(retries) >= 2 and "retry 1 in" in retries[0], result.stderr[-2000:]
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: Kafka at {nothing_there} (kafka.bootstrap_servers) unreachable for 4 s")
    )


def test_bench_soak_refuses_a_run_of_no_length_in_one_line() -> None:
    result = run_fallwatch("bench", "soak", "--minutes", "0")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --minutes, --fps and --sample-s must be positive and --cameras at least 1"
