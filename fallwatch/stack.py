"""The local stack: a single-node Apache Kafka broker (KRaft) and a redis-server.

Kafka's jars come from Maven Central (pinned version, cached under the cache
directory) and the broker runs with plain `java`; redis-server is the Debian
package. Pids, ports and logs live in the state directory, so `stack status`
and `stack down` work from another process, and services find the addresses
through `stack.json` (see core.settings).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from core.kafka_io import topic_specs
from core.settings import ConfigError, Settings

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
KAFKA_MAIN = "kafka.Kafka"
KAFKA_STORAGE_TOOL = "kafka.tools.StorageTool"
DEFAULT_KAFKA_PORT = 9092
DEFAULT_REDIS_PORT = 6379
START_TIMEOUT_S = 60.0


class StackError(ConfigError):
    """The local stack could not be started or reached."""


@dataclass
class ServiceState:
    pid: int
    port: int
    log: str


@dataclass
class StackState:
    kafka: ServiceState
    kafka_controller_port: int
    redis: ServiceState

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.kafka.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/0"


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(preferred: int | None = None) -> int:
    if preferred is not None and port_is_free(preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours still "exists"; reap it if it is ours
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == 0


def wait_until(predicate: object, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll a readiness check (a port, a pid), never a fixed sleep."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise StackError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def kafka_libs(cache_dir: Path) -> Path:
    """The broker's jars, fetched once from Maven Central with `mvn`."""
    libs = cache_dir / f"kafka-{KAFKA_VERSION}" / "libs"
    if (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
        return libs
    if shutil.which("mvn") is None:
        raise StackError("Maven (mvn) is needed once to fetch the Kafka jars from Maven Central")
    pom = Path(__file__).with_name("kafka") / "pom.xml"
    log.info("fetching Apache Kafka %s jars from Maven Central into %s", KAFKA_VERSION, libs)
    tmp = libs.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    result = subprocess.run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-Dkafka.version={KAFKA_VERSION}",
            f"-DoutputDirectory={tmp.resolve()}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(f"mvn could not fetch the Kafka jars: {(result.stdout + result.stderr).strip()[-500:]}")
    tmp.rename(libs)
    return libs


class LocalStack:
    """Starts, stops and reports on the local Kafka + Redis of one state directory."""

    def __init__(self, state_dir: Path, cache_dir: Path, partitions: int = 4) -> None:
        self.state_dir = state_dir.resolve()
        self.cache_dir = cache_dir.resolve()
        self.partitions = partitions
        self.state_file = self.state_dir / "stack.json"

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalStack:
        return cls(settings.state_dir, settings.cache_dir, settings.kafka.partitions)

    # --- state -----------------------------------------------------------------------------
    def read_state(self) -> StackState | None:
        if not self.state_file.is_file():
            return None
        raw = json.loads(self.state_file.read_text())
        return StackState(
            kafka=ServiceState(**raw["kafka"]),
            kafka_controller_port=raw["kafka_controller_port"],
            redis=ServiceState(**raw["redis"]),
        )

    def write_state(self, state: StackState) -> None:
        self.state_file.write_text(json.dumps(asdict(state), indent=2))

    # --- lifecycle -------------------------------------------------------------------------
    def up(self, topics: dict[str, dict[str, str]]) -> StackState:
        """Start both servers (unless already running) and create the topics."""
        state = self.read_state()
        if state is not None and self.healthy(state):
            log.info("local stack already running (kafka %s, redis %s)", state.bootstrap_servers, state.redis_url)
            self.create_topics(state, topics)
            return state
        self.state_dir.mkdir(parents=True, exist_ok=True)
        libs = kafka_libs(self.cache_dir)
        redis = self.start_redis(free_port(DEFAULT_REDIS_PORT))
        kafka_port = free_port(DEFAULT_KAFKA_PORT)
        controller_port = free_port()
        try:
            kafka = self.start_kafka(libs, kafka_port, controller_port)
        except BaseException:  # a StackError, or the start cut short (SIGTERM): redis-server must not run on
            stop_pid(redis.pid)
            raise
        state = StackState(kafka=kafka, kafka_controller_port=controller_port, redis=redis)
        self.write_state(state)
        self.create_topics(state, topics)
        return state

    def down(self) -> bool:
        state = self.read_state()
        if state is None:
            return False
        stop_pid(state.kafka.pid)
        stop_pid(state.redis.pid)
        self.state_file.unlink(missing_ok=True)
        return True

    def healthy(self, state: StackState) -> bool:
        return all(pid_alive(service.pid) and port_accepts(service.port) for service in (state.kafka, state.redis))

    # --- redis -----------------------------------------------------------------------------
    def start_redis(self, port: int) -> ServiceState:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError("redis-server is not installed (Debian: apt-get install -y redis-server)")
        data = self.state_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        log_path = self.state_dir / "redis.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(data),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(process, port, "redis-server", log_path)
        return ServiceState(pid=process.pid, port=port, log=str(log_path))

    def restart_redis(self) -> StackState:
        """Stop and start redis-server on the same port (used to test outages)."""
        state = self._require_state()
        stop_pid(state.redis.pid)
        state.redis = self.start_redis(state.redis.port)
        self.write_state(state)
        return state

    def stop_redis(self) -> None:
        stop_pid(self._require_state().redis.pid)

    # --- kafka -----------------------------------------------------------------------------
    def start_kafka(self, libs: Path, port: int, controller_port: int) -> ServiceState:
        if shutil.which("java") is None:
            raise StackError("java (17 or newer) is needed to run the local Kafka broker")
        kafka_dir = self.state_dir / "kafka"
        data = kafka_dir / "data"
        config = kafka_dir / "server.properties"
        kafka_dir.mkdir(parents=True, exist_ok=True)
        config.write_text(kafka_properties(port, controller_port, data))
        classpath = f"{libs}/*"
        if not (data / "meta.properties").is_file():
            cluster_id = uuid.uuid4().hex[:22]
            subprocess.run(
                ["java", "-cp", classpath, KAFKA_STORAGE_TOOL, "format", "-t", cluster_id, "-c", str(config)],
                check=True,
                capture_output=True,
            )
        log_path = self.state_dir / "kafka.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                ["java", "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-cp", classpath, KAFKA_MAIN, str(config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(process, port, "Kafka", log_path)
        return ServiceState(pid=process.pid, port=port, log=str(log_path))

    def stop_kafka(self) -> None:
        stop_pid(self._require_state().kafka.pid)

    def start_kafka_again(self) -> StackState:
        """Start the broker again on the same ports and data (after stop_kafka)."""
        state = self._require_state()
        state.kafka = self.start_kafka(kafka_libs(self.cache_dir), state.kafka.port, state.kafka_controller_port)
        self.write_state(state)
        return state

    def create_topics(self, state: StackState, topics: dict[str, dict[str, str]]) -> None:
        asyncio.run(create_topics(state.bootstrap_servers, topics, self.partitions))

    def _require_state(self) -> StackState:
        state = self.read_state()
        if state is None:
            raise StackError(f"no local stack is running in {self.state_dir}")
        return state


def kafka_properties(port: int, controller_port: int, data: Path) -> str:
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={data}",
            "num.partitions=4",
            "offsets.topic.replication.factor=1",
            # a single local broker: fewer offsets partitions make the first consumer group start fast
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "message.max.bytes=10485760",
            "",
        ]
    )


async def create_topics(bootstrap_servers: str, topics: dict[str, dict[str, str]], partitions: int) -> None:
    """Create missing topics (idempotent), each with `partitions` partitions and its configs.

    Returns once every partition has a leader, so the first clients do not meet NotLeader errors.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=30000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, partitions, 1, topic_configs=configs)
            for name, configs in topics.items()
            if name not in existing
        ]
        if missing:
            await admin.create_topics(missing)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all_partitions_led(await admin.describe_topics(list(topics))):
            if time.monotonic() > deadline:
                raise StackError(f"topics {sorted(topics)} have partitions without a leader")
            await asyncio.sleep(0.1)  # polling the broker's metadata, not waiting blindly
    finally:
        await admin.close()


def all_partitions_led(descriptions: list[dict]) -> bool:
    return all(
        topic["error_code"] == 0 and topic["partitions"] and all(p["leader"] >= 0 for p in topic["partitions"])
        for topic in descriptions
    )


def wait_for_port(process: subprocess.Popen[bytes], port: int, name: str, log_path: Path) -> None:
    """Wait until the server just started listens on `port`; stop it if it exits or the wait is cut short.

    The servers run in their own sessions (Ctrl-C in a terminal must not stop `fallwatch stack up`'s),
    so one whose start is interrupted (a timeout, SIGTERM) would otherwise run on with nobody knowing it.
    """
    try:
        wait_until(lambda: port_accepts(port) or process.poll() is not None, f"{name} on port {port}")
        if process.poll() is not None:
            raise StackError(f"{name} exited with {process.returncode}; see {log_path}")
    except BaseException:
        stop_pid(process.pid)
        raise


def stop_pid(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM, wait for the process to exit, SIGKILL if it does not."""
    if not pid_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        wait_until(lambda: not pid_alive(pid), f"pid {pid} to exit", timeout_s)
    except StackError:
        log.warning("pid %s ignored SIGTERM for %.0f s; killing it", pid, timeout_s)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), f"pid {pid} to die", 10.0)


@contextmanager
def local_stack_settings(settings: Settings, state_dir: Path) -> Iterator[Settings]:
    """`settings` pointed at the running local stack, or at one started in `state_dir` and stopped on exit."""
    stack = LocalStack.from_settings(settings)
    state = stack.read_state()
    temporary = state is None or not stack.healthy(state)
    if temporary:
        stack = LocalStack(state_dir, settings.cache_dir, settings.kafka.partitions)
    try:
        if temporary:
            state = stack.up({})  # inside the `try`: a stack interrupted while it starts is stopped too
        assert state is not None
        yield settings.model_copy(
            update={
                "kafka": settings.kafka.model_copy(update={"bootstrap_servers": state.bootstrap_servers}),
                "redis": settings.redis.model_copy(update={"url": state.redis_url}),
            }
        )
    finally:
        if temporary:
            stack.down()


def fresh_run(settings: Settings, name: str) -> Settings:
    """The settings of a new run `name-<id>`: its own topics (created now), consumer groups and alerting app."""
    run = f"{name}-{uuid.uuid4().hex[:8]}"
    fresh = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update={"topics": settings.kafka.topics.prefixed(run)}),
            "edge": settings.edge.model_copy(update={"group_id": f"{run}.{settings.edge.group_id}"}),
            "cloud": settings.cloud.model_copy(update={"group_id": f"{run}.{settings.cloud.group_id}"}),
            "alerting": settings.alerting.model_copy(update={"app_id": f"{run}-{settings.alerting.app_id}"}),
        }
    )
    asyncio.run(create_topics(fresh.kafka.bootstrap_servers, topic_specs(fresh), fresh.kafka.partitions))
    return fresh
