"""The local stack: a single-node Apache Kafka broker (KRaft), a redis-server and a mosquitto MQTT broker.

Kafka's jars come from Maven Central (pinned version, cached under the cache
directory) and the broker runs with plain `java`; redis-server and mosquitto are
Debian packages. Pids, ports and logs live in the state directory, so `stack status`
and `stack down` work from another process, and services find the addresses
through `stack.json` (see core.settings).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import secrets
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
from typing import IO, Any

from core.kafka_io import create_topics, topic_specs
from core.settings import ConfigError, KafkaSettings, RedisSettings, Settings
from fallwatch.processes import tied_to_this_process

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
KAFKA_MAIN = "kafka.Kafka"
KAFKA_STORAGE_TOOL = "kafka.tools.StorageTool"
DEFAULT_KAFKA_PORT = 9092
DEFAULT_REDIS_PORT = 6379
DEFAULT_MQTT_PORT = 1883
START_TIMEOUT_S = 60.0
# Debian installs the broker in /usr/sbin, which is not on every user's PATH
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto",)


class StackError(ConfigError):
    """The local stack could not be started or reached."""


@dataclass
class ServiceState:
    pid: int
    port: int
    log: str
    # when the process started (`process_start_time`): after a reboot or the server's exit its pid may be
    # another process's, which must never be stopped as the stack's; None in a state written before this
    started: int | None = None

    def running(self) -> bool:
        """The server this state names runs (its pid, and the same start)."""
        return pid_alive(self.pid) and (self.started is None or process_start_time(self.pid) == self.started)


SCRAM_MECHANISM = "SCRAM-SHA-512"
STACK_USER = "fallwatch"


@dataclass
class StackSecurity:
    """A locked stack: Kafka on SASL_SSL (SCRAM) only, Redis on TLS only with a password, one self-signed
    certificate for both, and the one user's password in a file (0600) that clients read."""

    username: str
    password_file: str
    cert_file: str  # the self-signed certificate, also the clients' CA
    key_file: str
    kafka_keystore: str  # key and certificate in one PEM file, as Kafka's PEM keystore wants them

    def password(self) -> str:
        return Path(self.password_file).read_text().strip()


@dataclass
class StackState:
    kafka: ServiceState
    kafka_controller_port: int
    redis: ServiceState
    security: StackSecurity | None = None
    mqtt: ServiceState | None = None  # None: a state file written before the stack had a broker

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.kafka.port}"

    @property
    def redis_url(self) -> str:
        scheme = "rediss" if self.security else "redis"
        return f"{scheme}://127.0.0.1:{self.redis.port}/0"

    def kafka_fields(self) -> dict[str, Any]:
        """The `kafka` settings a client of this stack needs (address and, when locked, credentials)."""
        fields: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers, "security_protocol": "PLAINTEXT"}
        if self.security is not None:
            fields |= {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": SCRAM_MECHANISM,
                "sasl_username": self.security.username,
                "sasl_password": None,
                "sasl_password_file": self.security.password_file,
                "ssl_cafile": self.security.cert_file,
            }
        return fields

    def redis_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"url": self.redis_url}
        if self.security is not None:
            fields |= {
                "username": self.security.username,
                "password": None,
                "password_file": self.security.password_file,
                "ssl_ca_certs": self.security.cert_file,
            }
        return fields

    def services(self) -> list[ServiceState]:
        return [self.kafka, self.redis, *([self.mqtt] if self.mqtt else [])]

    def mqtt_fields(self) -> dict[str, Any]:
        """The `alerting.mqtt` settings a client of this stack needs ({} without a broker)."""
        if self.mqtt is None:
            return {}
        fields: dict[str, Any] = {"host": "127.0.0.1", "port": self.mqtt.port}
        if self.security is not None:
            fields |= {
                "username": self.security.username,
                "password_file": self.security.password_file,
                "tls": True,
                "ca_file": self.security.cert_file,
            }
        return fields

    def kafka_settings(self, base: KafkaSettings | None = None) -> KafkaSettings:
        """`base` (or the defaults) pointed at this stack."""
        return KafkaSettings.model_validate({**(base or KafkaSettings()).model_dump(), **self.kafka_fields()})

    def redis_settings(self, base: RedisSettings | None = None) -> RedisSettings:
        return RedisSettings.model_validate({**(base or RedisSettings()).model_dump(), **self.redis_fields()})


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


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` itself listens on TCP `port` on this host (Linux's /proc): another process's
    listener there is not the server just started. Where /proc cannot tell, whether anything accepts there."""
    tables = [table for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")) if table.is_file()]
    if not tables:
        return port_accepts(port)
    sockets = set()
    for table in tables:
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()  # sl, local address:port (hex), remote, state (0A: LISTEN), ..., inode
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                sockets.add(f"socket:[{fields[9]}]")
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except PermissionError:  # another user's process
        return port_accepts(port)
    except OSError:  # gone
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(descriptor) in sockets:
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def process_start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (Linux's /proc); None where that is unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the fields after the command name (which may hold spaces, in parentheses): starttime is the 20th
    return int(stat.rpartition(")")[2].split()[19])


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
    """Starts, stops and reports on the local Kafka + Redis + mosquitto of one state directory.

    `default_ports`: take 9092, 6379 and 1883 when free (`fallwatch stack up`: what a developer expects);
    otherwise any free ports (a temporary stack: a test session, the demo, a benchmark), so stacks running
    side by side on one machine do not race for them. `outlives_caller`: the servers run on after this process exits
    (`fallwatch stack up`); otherwise they stop when it dies, however it dies.
    """

    def __init__(
        self,
        state_dir: Path,
        cache_dir: Path,
        partitions: int = 4,
        secure: bool = False,
        default_ports: bool = False,
        outlives_caller: bool = False,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.cache_dir = cache_dir.resolve()
        self.partitions = partitions
        self.secure = secure
        self.default_ports = default_ports
        self.outlives_caller = outlives_caller
        self.state_file = self.state_dir / "stack.json"

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalStack:
        """The stack of the settings' state directory, the one `fallwatch stack up` starts and leaves running."""
        return cls(
            settings.state_dir, settings.cache_dir, settings.kafka.partitions, default_ports=True, outlives_caller=True
        )

    def server(self, command: list[str], log_file: IO[bytes]) -> subprocess.Popen[bytes]:
        """Start one server, in its own session (Ctrl-C in a terminal must not stop `fallwatch stack up`'s)."""
        return subprocess.Popen(
            command if self.outlives_caller else tied_to_this_process(command),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    # --- state -----------------------------------------------------------------------------
    def read_state(self) -> StackState | None:
        if not self.state_file.is_file():
            return None
        raw = json.loads(self.state_file.read_text())
        raw.pop("clients", None)
        return StackState(
            kafka=ServiceState(**raw["kafka"]),
            kafka_controller_port=raw["kafka_controller_port"],
            redis=ServiceState(**raw["redis"]),
            security=StackSecurity(**raw["security"]) if raw.get("security") else None,
            mqtt=ServiceState(**raw["mqtt"]) if raw.get("mqtt") else None,
        )

    def write_state(self, state: StackState) -> None:
        # `clients`: what a service's settings take from the running stack (core.settings.LocalStackSource)
        clients = {"kafka": state.kafka_fields(), "redis": state.redis_fields(), "mqtt": state.mqtt_fields()}
        self.state_file.write_text(json.dumps({**asdict(state), "clients": clients}, indent=2))

    # --- lifecycle -------------------------------------------------------------------------
    def up(self, topics: dict[str, dict[str, str]]) -> StackState:
        """Start both servers (unless already running) and create the topics."""
        state = self.read_state()
        if state is not None and self.healthy(state):
            log.info("local stack already running (kafka %s, redis %s)", state.bootstrap_servers, state.redis_url)
            self.create_topics(state, topics)
            return state
        if state is not None:
            # part of it runs (Kafka died, say): those servers would be left running, unknown to the new state
            log.warning("the local stack in %s is not whole: stopping what is left of it, starting it again",
                        self.state_dir)  # fmt: skip
            self.stop_servers(state)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        libs = kafka_libs(self.cache_dir)
        security = self.make_security() if self.secure else None

        # a locked stack runs beside an ordinary one (tests): it takes any free ports, not the defaults
        def port(default: int) -> int:
            return free_port(default if self.default_ports and security is None else None)

        redis = self.start_redis(port(DEFAULT_REDIS_PORT), security)
        kafka_port = port(DEFAULT_KAFKA_PORT)
        controller_port = free_port()
        started = [redis]
        try:
            started.append(self.start_mosquitto(port(DEFAULT_MQTT_PORT), security))
            kafka = self.start_kafka(libs, kafka_port, controller_port, security)
        except BaseException:  # a StackError, or the start cut short (SIGTERM): no server may run on
            for service in started:
                stop_pid(service.pid)
            raise
        state = StackState(
            kafka=kafka, kafka_controller_port=controller_port, redis=redis, security=security, mqtt=started[1]
        )
        self.write_state(state)
        self.create_topics(state, topics)
        return state

    def down(self) -> bool:
        state = self.read_state()
        if state is None:
            return False
        self.stop_servers(state)
        self.state_file.unlink(missing_ok=True)
        return True

    def stop_servers(self, state: StackState) -> None:
        """Stop the servers of `state` that still run; a pid now another process's is left alone."""
        for service in state.services():
            if service.running():
                stop_pid(service.pid)
            elif pid_alive(service.pid):
                log.warning("pid %d (%s) is no longer the stack's server: left alone", service.pid, service.log)

    def healthy(self, state: StackState) -> bool:
        # a stack from before the broker was part of it is restarted, so alerting finds one
        return state.mqtt is not None and all(
            service.running() and listens_on(service.pid, service.port) for service in state.services()
        )

    def make_security(self) -> StackSecurity:
        """A fresh password and a self-signed certificate for 127.0.0.1 / localhost (openssl)."""
        if shutil.which("openssl") is None:
            raise StackError("openssl is needed for the locked stack's certificate")
        secret_dir = self.state_dir / "secrets"
        secret_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        password_file = secret_dir / "password"
        password_file.touch(mode=0o600)
        password_file.write_text(secrets.token_urlsafe(24))
        cert, key = secret_dir / "cert.pem", secret_dir / "key.pem"
        result = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise StackError(f"openssl could not make the certificate: {result.stderr.strip()[-300:]}")
        key.chmod(0o600)
        keystore = secret_dir / "kafka-keystore.pem"
        keystore.touch(mode=0o600)
        keystore.write_text(key.read_text() + cert.read_text())
        return StackSecurity(STACK_USER, str(password_file), str(cert), str(key), str(keystore))

    # --- redis -----------------------------------------------------------------------------
    def start_redis(self, port: int, security: StackSecurity | None = None) -> ServiceState:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError("redis-server is not installed (Debian: apt-get install -y redis-server)")
        data = self.state_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        log_path = self.state_dir / "redis.log"
        # no persistence: a restart comes back empty, and alerting rebuilds its state from `fall-events`
        options = ["--bind", "127.0.0.1", "--dir", str(data), "--save", "", "--appendonly", "no", "--daemonize", "no"]
        if security is None:
            options += ["--port", str(port)]
        else:
            password = security.password()
            options += [
                "--port", "0", "--tls-port", str(port),
                "--tls-cert-file", security.cert_file, "--tls-key-file", security.key_file,
                "--tls-ca-cert-file", security.cert_file, "--tls-auth-clients", "no",
                # the default user needs the password too, and the stack's clients log in as their own ACL user
                "--requirepass", password,
                "--user", security.username, "on", f">{password}", "~*", "&*", "+@all",
            ]  # fmt: skip
        with log_path.open("ab") as log_file:
            process = self.server([binary, *options], log_file)
        wait_for_port(process, port, "redis-server", log_path)
        return ServiceState(process.pid, port, str(log_path), process_start_time(process.pid))

    def stop_redis(self) -> None:
        stop_pid(self._require_state().redis.pid)

    def start_redis_again(self) -> StackState:
        """Start redis-server again on the same port, empty (after stop_redis)."""
        state = self._require_state()
        state.redis = self.start_redis(state.redis.port, state.security)
        self.write_state(state)
        return state

    # --- mosquitto -------------------------------------------------------------------------
    def start_mosquitto(self, port: int, security: StackSecurity | None = None) -> ServiceState:
        binary = shutil.which("mosquitto") or next((p for p in MOSQUITTO_PATHS if Path(p).is_file()), None)
        if binary is None:
            raise StackError("mosquitto is not installed (Debian: apt-get install -y mosquitto)")
        config_path = self.state_dir / "mosquitto.conf"
        # no persistence: retained state comes back from the alerting service on its next connection
        lines = [f"listener {port} 127.0.0.1", "persistence false", "log_dest stdout", "log_type error warning notice"]
        if os.geteuid() == 0:
            lines.append("user root")  # as root it would switch to `mosquitto`, who cannot read the state dir
        if security is None:
            lines.append("allow_anonymous true")
        else:
            passwords = Path(security.password_file).with_name("mosquitto-passwords")
            passwords.touch(mode=0o600)
            passwords.write_text(f"{security.username}:{mosquitto_password_hash(security.password())}\n")
            lines += [
                "allow_anonymous false", f"password_file {passwords}",
                f"certfile {security.cert_file}", f"keyfile {security.key_file}",
            ]  # fmt: skip
        config_path.write_text("\n".join(lines) + "\n")
        log_path = self.state_dir / "mosquitto.log"
        with log_path.open("ab") as log_file:
            process = self.server([binary, "-c", str(config_path)], log_file)
        wait_for_port(process, port, "mosquitto", log_path)
        return ServiceState(process.pid, port, str(log_path), process_start_time(process.pid))

    # --- kafka -----------------------------------------------------------------------------
    def start_kafka(
        self, libs: Path, port: int, controller_port: int, security: StackSecurity | None = None
    ) -> ServiceState:
        if shutil.which("java") is None:
            raise StackError("java (17 or newer) is needed to run the local Kafka broker")
        kafka_dir = self.state_dir / "kafka"
        data = kafka_dir / "data"
        config = kafka_dir / "server.properties"
        kafka_dir.mkdir(parents=True, exist_ok=True)
        config.touch(mode=0o600)  # a locked broker's file holds its own SCRAM password
        config.write_text(kafka_properties(port, controller_port, data, security))
        classpath = f"{libs}/*"
        if not (data / "meta.properties").is_file():
            cluster_id = uuid.uuid4().hex[:22]
            format_command = ["java", "-cp", classpath, KAFKA_STORAGE_TOOL, "format", "-t", cluster_id]
            format_command += ["-c", str(config)]
            if security is not None:
                # KRaft keeps SCRAM credentials in its metadata log: the user exists before the first start
                scram = f"{SCRAM_MECHANISM}=[name={security.username},password={security.password()}]"
                format_command += ["--add-scram", scram]
            formatted = subprocess.run(format_command, capture_output=True, text=True)
            if formatted.returncode != 0:
                output = (formatted.stderr or formatted.stdout).strip().splitlines()
                last = output[-1] if output else f"exit status {formatted.returncode}"
                if security is not None:
                    last = last.replace(security.password(), "***")
                raise StackError(f"Kafka's storage could not be formatted (java 17 or newer is needed): {last}")
        log_path = self.state_dir / "kafka.log"
        with log_path.open("ab") as log_file:
            command = ["java", "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-cp", classpath, KAFKA_MAIN, str(config)]
            process = self.server(command, log_file)
        wait_for_port(process, port, "Kafka", log_path)
        return ServiceState(process.pid, port, str(log_path), process_start_time(process.pid))

    def stop_kafka(self) -> None:
        stop_pid(self._require_state().kafka.pid)

    def start_kafka_again(self) -> StackState:
        """Start the broker again on the same ports and data (after stop_kafka)."""
        state = self._require_state()
        state.kafka = self.start_kafka(
            kafka_libs(self.cache_dir), state.kafka.port, state.kafka_controller_port, state.security
        )
        self.write_state(state)
        return state

    def create_topics(self, state: StackState, topics: dict[str, dict[str, str]]) -> None:
        asyncio.run(create_topics(state.kafka_settings(), topics, self.partitions))

    def _require_state(self) -> StackState:
        state = self.read_state()
        if state is None:
            raise StackError(f"no local stack is running in {self.state_dir}")
        return state


def kafka_properties(port: int, controller_port: int, data: Path, security: StackSecurity | None = None) -> str:
    listener = "PLAINTEXT" if security is None else "SASL_SSL"
    locked: list[str] = []
    if security is not None:
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{security.username}" password="{security.password()}";'
        )
        locked = [
            f"sasl.enabled.mechanisms={SCRAM_MECHANISM}",
            f"sasl.mechanism.inter.broker.protocol={SCRAM_MECHANISM}",
            f"listener.name.sasl_ssl.{SCRAM_MECHANISM.lower()}.sasl.jaas.config={jaas}",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={security.kafka_keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={security.cert_file}",
        ]
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
            f"listeners={listener}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners={listener}://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            f"listener.security.protocol.map=CONTROLLER:PLAINTEXT,{listener}:{listener}",
            f"inter.broker.listener.name={listener}",
            *locked,
            f"log.dirs={data}",
            "num.partitions=4",
            # as in production (docker-compose.yml): a topic `topics create` does not make is an error, not a
            # topic with the broker's defaults
            "auto.create.topics.enable=false",
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


def mosquitto_password_hash(password: str) -> str:
    """A mosquitto password file entry's hash ($7$: PBKDF2-SHA512), as `mosquitto_passwd` writes it."""
    salt = secrets.token_bytes(12)
    iterations = 101
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def wait_for_port(process: subprocess.Popen[bytes], port: int, name: str, log_path: Path) -> None:
    """Wait until the server just started listens on `port` itself (a listener of another process that took
    the port meanwhile is not it); stop it if it exits or the wait is cut short.

    The servers run in their own sessions (Ctrl-C in a terminal must not stop `fallwatch stack up`'s),
    so one whose start is interrupted (a timeout, SIGTERM) would otherwise run on with nobody knowing it.
    """
    try:
        wait_until(lambda: listens_on(process.pid, port) or process.poll() is not None, f"{name} on port {port}")
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
        yield on_stack(settings, state)
    finally:
        if temporary:
            stack.down()


def on_stack(settings: Settings, state: StackState) -> Settings:
    """`settings` with the Kafka and Redis addresses (and credentials) of a local stack."""
    return settings.model_copy(
        update={
            "kafka": state.kafka_settings(settings.kafka),
            "redis": state.redis_settings(settings.redis),
        }
    )


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
    asyncio.run(create_topics(fresh.kafka, topic_specs(fresh), fresh.kafka.partitions))
    return fresh
