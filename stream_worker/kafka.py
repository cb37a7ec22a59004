"""Kafka client configuration shared by the worker, replay and the tools.

Security options come from the settings tree; passwords are read from files here and never
stored in the settings object, so printing settings cannot leak them.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from stream_worker.errors import ConfigError, LookoutError, ServiceUnavailable
from stream_worker.settings import KafkaSettings, read_secret


def client_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """Connection and security keyword arguments for any aiokafka client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        if not kafka.ssl_cafile:
            raise ConfigError(
                f"{kafka.security_protocol} needs --ssl-cafile (the CA that signed the brokers)"
            )
        context = ssl.create_default_context(cafile=kafka.ssl_cafile)
        if kafka.ssl_certfile:
            context.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile or None)
        kwargs["ssl_context"] = context
    if kafka.security_protocol.startswith("SASL"):
        if not kafka.sasl_username or not kafka.sasl_password_file:
            raise ConfigError("SASL needs --sasl-username and --sasl-password-file")
        kwargs["sasl_mechanism"] = kafka.sasl_mechanism
        kwargs["sasl_plain_username"] = kafka.sasl_username
        kwargs["sasl_plain_password"] = read_secret(kafka.sasl_password_file, "the Kafka SASL password")
    return kwargs


def make_producer(
    kafka: KafkaSettings, *, client_id_suffix: str = "producer", **extra: Any
) -> AIOKafkaProducer:
    """An idempotent, acks=all producer: a retried send never writes a record twice."""
    options: dict[str, Any] = {
        "client_id": f"{kafka.client_id}-{client_id_suffix}",
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": 5,
        "max_request_size": 26_214_400,
        "request_timeout_ms": 30_000,
    }
    options.update(extra)
    return AIOKafkaProducer(**client_kwargs(kafka), **options)


def make_consumer(kafka: KafkaSettings, group: str, **extra: Any) -> AIOKafkaConsumer:
    """A consumer with manual commits: offsets move only after every sink has succeeded."""
    options: dict[str, Any] = {
        "client_id": f"{kafka.client_id}-consumer",
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": kafka.session_timeout_ms,
        "heartbeat_interval_ms": max(1000, kafka.session_timeout_ms // 10),
        "max_poll_interval_ms": kafka.max_poll_interval_ms,
        "max_partition_fetch_bytes": 26_214_400,
        "fetch_max_bytes": 52_428_800,
        "isolation_level": "read_committed",
    }
    options.update(extra)
    return AIOKafkaConsumer(**client_kwargs(kafka), **options)


def kafka_failure(exc: BaseException, what: str) -> LookoutError:
    """Map an aiokafka error to lookout's tree; connection trouble and retriable errors retry."""
    if isinstance(exc, KafkaConnectionError):
        return ServiceUnavailable(f"{what}: Kafka unreachable ({exc})")
    if isinstance(exc, KafkaError) and getattr(exc, "retriable", False):
        return ServiceUnavailable(f"{what}: {exc.__class__.__name__} ({exc})")
    if isinstance(exc, TimeoutError):
        return ServiceUnavailable(f"{what}: timed out")
    return LookoutError(f"{what}: {exc.__class__.__name__}: {exc}")


async def ensure_topics(
    kafka: KafkaSettings, topics: dict[str, tuple[int, dict[str, str]]], *, replication: int = 1
) -> list[str]:
    """Create the missing topics (name -> (partitions, config)); returns the ones created."""
    admin = AIOKafkaAdminClient(**client_kwargs(kafka), client_id=f"{kafka.client_id}-admin")
    try:
        await admin.start()
    except KafkaError as exc:
        raise unreachable(kafka, exc) from exc
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in topics if name not in existing]
        for name in missing:
            partitions, config = topics[name]
            try:
                await admin.create_topics([NewTopic(name, partitions, replication, topic_configs=config)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
    return created


async def partitions_of(kafka: KafkaSettings, topic: str) -> int:
    """How many partitions a topic has (0 when it does not exist)."""
    admin = AIOKafkaAdminClient(**client_kwargs(kafka), client_id=f"{kafka.client_id}-admin")
    try:
        await admin.start()
    except KafkaError as exc:
        raise unreachable(kafka, exc) from exc
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for entry in described:
        if entry.get("topic") == topic and not entry.get("error_code"):
            return len(entry.get("partitions", []))
    return 0


def unreachable(kafka: KafkaSettings, exc: BaseException) -> ConfigError:
    """The one-line message for a broker that cannot be reached at start-up."""
    return ConfigError(
        f"cannot reach Kafka at {kafka.bootstrap} ({exc.__class__.__name__}): start it "
        "(scripts/services up) or fix --bootstrap / KAFKA_BOOTSTRAP"
    )
