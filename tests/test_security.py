"""A locked stack: Kafka on SASL_SSL (SCRAM-SHA-512, a self-signed certificate) and redis-server on TLS with a
password, both started by `LocalStack(secure=True)`. Every kind of client (aiokafka producer, consumer and admin,
the faust alerting app, redis-py) works with the secret; a client without it is refused; the secret is not logged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.errors import KafkaError
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError

from core.kafka_io import make_consumer, make_producer, start_clients
from core.redis_io import sync_redis_client
from core.retry import DependencyUnavailable
from core.settings import ConfigError, Settings
from fallwatch.stack import LocalStack, StackState
from schemas import FallEvent
from tests.alerting_helpers import alerting_worker, make_verdict, read_until, send_verdicts, unique_camera
from tests.conftest import REPO, settings_for


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackState]:
    stack = LocalStack(tmp_path_factory.mktemp("secure-stack"), cache_dir=REPO / ".cache", partitions=2, secure=True)
    try:
        yield stack.up({})
    finally:
        stack.down()


def locked_settings(state: StackState, tmp_path: Path, **sections: object) -> Settings:
    return settings_for(state, tmp_path, kafka={"partitions": 2}, **sections)


def without(settings: Settings, **kafka: object) -> Settings:
    return settings.model_copy(update={"kafka": settings.kafka.model_copy(update=kafka)})


def test_kafka_clients_need_the_scram_secret_and_the_certificate(secure_stack: StackState, tmp_path: Path) -> None:
    settings = locked_settings(secure_stack, tmp_path)
    topic = settings.kafka.topics.verdicts

    async def round_trip() -> bytes:
        producer = make_producer(settings)
        consumer = make_consumer(settings, topic, group_id=None)
        await start_clients(settings, producer, consumer)
        try:
            await (await producer.send(topic, key=b"k", value=b"locked"))
            return (await asyncio.wait_for(consumer.getone(), 30)).value
        finally:
            await producer.stop()
            await consumer.stop()

    assert asyncio.run(round_trip()) == b"locked"

    wrong_password = tmp_path / "wrong"
    wrong_password.write_text("not-the-password")

    async def refused(client_settings: Settings) -> BaseException:
        producer = make_producer(client_settings)
        try:
            await start_clients(client_settings, producer)
        except (KafkaError, DependencyUnavailable, ConfigError) as exc:
            return exc
        finally:
            await producer.stop()
        pytest.fail("a client without the secret was let in")

    short = {"connect_timeout_s": 3.0}
    # a refusal retrying cannot mend is one line naming the settings at once, not "unreachable" after retries
    wrong = asyncio.run(refused(without(settings, sasl_password_file=wrong_password, connect_timeout_s=600.0)))
    assert isinstance(wrong, ConfigError), wrong
    assert str(wrong).startswith(
        f"Kafka at {settings.kafka.bootstrap_servers}: the broker refused the credentials (kafka.sasl_username, "
        "kafka.sasl_password): "
    ), wrong
    asyncio.run(refused(without(settings, security_protocol="SSL", **short)))  # TLS without SASL
    asyncio.run(refused(without(settings, security_protocol="PLAINTEXT", **short)))
    # another CA than the broker's: the certificate is checked
    untrusted = asyncio.run(refused(without(settings, ssl_cafile=None, connect_timeout_s=600.0)))
    assert isinstance(untrusted, ConfigError) and "certificate does not verify with kafka.ssl_cafile" in str(untrusted)


def test_redis_needs_the_password_and_speaks_tls_only(secure_stack: StackState, tmp_path: Path) -> None:
    settings = locked_settings(secure_stack, tmp_path)
    with sync_redis_client(settings.redis) as redis:
        redis.set("fallwatch:security-test", b"ok", ex=60)
        assert redis.get("fallwatch:security-test") == b"ok"
    anonymous = settings.redis.model_copy(update={"username": None, "password_file": None})
    with sync_redis_client(anonymous) as redis, pytest.raises((AuthenticationError, ResponseError)):
        redis.get("fallwatch:security-test")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password")
    with (
        sync_redis_client(settings.redis.model_copy(update={"password_file": wrong})) as redis,
        pytest.raises(AuthenticationError),
    ):
        redis.get("fallwatch:security-test")
    plain = settings.redis.model_copy(update={"url": settings.redis.url.replace("rediss://", "redis://")})
    with sync_redis_client(plain) as redis, pytest.raises(ConnectionError):
        redis.get("fallwatch:security-test")


def test_alerting_runs_on_the_locked_stack_and_never_logs_the_secrets(secure_stack: StackState, tmp_path: Path) -> None:
    settings = locked_settings(secure_stack, tmp_path, alerting={"k": 3, "n": 5, "tick_s": 0.2})
    password = secure_stack.security.password() if secure_stack.security else ""
    assert password and password not in repr(settings) and password not in str(settings.model_dump())
    camera = unique_camera("locked")
    with alerting_worker(settings, tmp_path) as log_path:
        send_verdicts(settings, [make_verdict(camera, seq, fall=True) for seq in range(3)])
        events = asyncio.run(
            read_until(
                settings,
                settings.kafka.topics.fall_events,
                FallEvent,
                lambda got: any(e.camera_id == camera for e in got),
            )
        )
        (alert,) = [event for event in events if event.camera_id == camera]
        with sync_redis_client(settings.redis) as redis:
            assert redis.sismember("fallwatch:active-alerts", alert.alert_id), "the alert reached Redis over TLS"
    assert password not in log_path.read_text()
