"""Kafka client configuration shared by the worker, replay and the tools.

Security options come from the settings tree; passwords are read from files here and never
stored in the settings object, so printing settings cannot leak them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import create_conn
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
    for_code,
)
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from stream_worker.errors import ConfigError, LookoutError, ServiceUnavailable
from stream_worker.hints import start_hint
from stream_worker.record_batches import tolerate_unreadable_header_names
from stream_worker.settings import KafkaSettings, TopicSettings, read_secret

log = logging.getLogger("lookout.kafka")


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
        try:
            context = ssl.create_default_context(cafile=kafka.ssl_cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot read the CA bundle {kafka.ssl_cafile} ({_one_line(exc)}): "
                "fix --ssl-cafile / KAFKA_SSL_CAFILE or the mounted file"
            ) from None
        if kafka.ssl_certfile:
            try:
                context.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot read the client certificate {kafka.ssl_certfile} or its key "
                    f"{kafka.ssl_keyfile or '(in the same file)'} ({_one_line(exc)}): fix --ssl-certfile / "
                    "KAFKA_SSL_CERTFILE and --ssl-keyfile / KAFKA_SSL_KEYFILE, or the mounted files"
                ) from None
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
    """A consumer with manual commits: offsets move only after every sink has succeeded.

    Like every consumer of lookout's, it reads a record whose header name is not UTF-8 instead
    of dying on it (:mod:`stream_worker.record_batches`).
    """
    tolerate_unreadable_header_names()
    options: dict[str, Any] = {
        "client_id": f"{kafka.client_id}-consumer",
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": kafka.session_timeout_ms,
        "heartbeat_interval_ms": max(1000, kafka.session_timeout_ms // 10),
        "max_poll_interval_ms": kafka.max_poll_interval_ms,
        "metadata_max_age_ms": kafka.metadata_max_age_ms,
        "max_partition_fetch_bytes": kafka.max_partition_fetch_bytes,
        "fetch_max_bytes": kafka.fetch_max_bytes,
        "isolation_level": "read_committed",
    }
    options.update(extra)
    return AIOKafkaConsumer(**client_kwargs(kafka), **options)


async def commit_revoked(
    consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata]
) -> None:
    """Commit offsets of partitions being revoked that the consumer no longer lists as assigned.

    ``AIOKafkaConsumer.commit`` refuses partitions outside the current assignment, and when a
    pattern subscription matches a new topic aiokafka drops the assignment *before* calling
    ``on_partitions_revoked``: the drain's commits would be refused (or, filtered, silently
    skipped). The member is still in the old generation during that callback, so the group
    coordinator accepts the commit; it is sent through the coordinator as ``commit`` itself does
    (``GroupCoordinator.commit_offsets``, aiokafka 0.14; pinned in pyproject.toml).
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or not hasattr(coordinator, "commit_offsets"):
        raise IllegalStateError("this aiokafka cannot commit partitions that are being revoked")
    await coordinator.commit_offsets(None, offsets)


ACLS_HINT = "`stream-worker acls` prints every grant the worker needs"

# What each authorization refusal means for the worker, and the grant that cures it.
_NOT_AUTHORIZED = {
    GroupAuthorizationFailedError: "grant its principal Read on the consumer group",
    TopicAuthorizationFailedError: (
        "grant its principal Read and Describe on the frames topics, Write and Describe on the "
        "topics it produces to (Create too, or make them and pass --no-create-topics)"
    ),
    ClusterAuthorizationFailedError: "grant its principal the cluster permission the operation needs",
}


_CREATE_CURE = "grant its principal Create on the topic, or create it yourself and pass --no-create-topics"


def not_authorized(exc: BaseException, what: str, cure: str | None = None) -> ConfigError | None:
    """The one-line error for an ACL refusal (the broker's authorizer said no), else None."""
    for kind, usual_cure in _NOT_AUTHORIZED.items():
        if isinstance(exc, kind):
            cure = cure or usual_cure
            detail = _one_line(exc).split(": ", 1)[-1]
            return ConfigError(
                f"{what}: the Kafka cluster's ACLs refuse the worker ({kind.__name__}: {detail}): "
                f"{cure}; {ACLS_HINT}"
            )
    return None


def kafka_failure(exc: BaseException, what: str, *, cure: str | None = None) -> LookoutError:
    """Map an aiokafka error to lookout's tree; connection trouble and retriable errors retry.

    An ACL refusal is a ``ConfigError`` (``cure``: the grant to name, when the caller knows it
    better): retrying cannot cure it, an administrator's grant can.
    """
    refused = not_authorized(exc, what, cure)
    if refused is not None:
        return refused
    if isinstance(exc, KafkaConnectionError):
        return ServiceUnavailable(f"{what}: Kafka unreachable ({exc})")
    if isinstance(exc, KafkaError) and getattr(exc, "retriable", False):
        return ServiceUnavailable(f"{what}: {exc.__class__.__name__} ({exc})")
    if isinstance(exc, TimeoutError):
        return ServiceUnavailable(f"{what}: timed out")
    return LookoutError(f"{what}: {exc.__class__.__name__}: {exc}")


async def ensure_topics(
    kafka: KafkaSettings,
    topics: dict[str, tuple[int, dict[str, str]]],
    *,
    replication: int = 1,
    running: bool = False,
) -> list[str]:
    """Create the missing topics (name -> (partitions, config)); returns the ones created.

    At start-up an unreachable broker is the user's one-line error; a ``running`` worker instead
    gets the retriable ``ServiceUnavailable`` and tries the batch again.
    """
    admin = AIOKafkaAdminClient(**client_kwargs(kafka), client_id=f"{kafka.client_id}-admin")
    try:
        await admin.start()
    except KafkaError as exc:
        await admin.close()
        raise (kafka_failure(exc, "creating topics") if running else unreachable(kafka, exc)) from exc
    created: list[str] = []
    try:
        try:
            existing = set(await admin.list_topics())
        except KafkaError as exc:
            raise kafka_failure(exc, "listing topics") from exc
        missing = [name for name in topics if name not in existing]
        for name in missing:
            partitions, config = topics[name]
            try:
                response = await admin.create_topics(
                    [NewTopic(name, partitions, replication, topic_configs=config)]
                )
            except TopicAlreadyExistsError:
                continue
            except KafkaError as exc:
                raise kafka_failure(exc, f"creating topic {name!r}", cure=_CREATE_CURE) from exc
            # The admin client returns per-topic errors instead of raising them.
            errors = [(code, message) for _t, code, *message in getattr(response, "topic_errors", []) if code]
            for code, message in errors:
                if code != TopicAlreadyExistsError.errno:
                    error = for_code(code)(message[0] if message and message[0] else name)
                    raise kafka_failure(error, f"creating topic {name!r}", cure=_CREATE_CURE)
            if not errors:
                created.append(name)
    finally:
        await admin.close()
    return created


async def records_to_end(
    kafka: KafkaSettings, topic: str, *, timeout_s: float, what: str
) -> AsyncIterator[list[Any]]:
    """The records of ``topic`` up to the end offsets it has now, batch by batch (a bounded read).

    Nothing when the topic does not exist. ``what`` names the reader in errors and its client id.
    """
    count = await partitions_of(kafka, topic)
    if count == 0:
        return
    tolerate_unreadable_header_names()  # such a record is read (and found dead-lettered), not fatal
    consumer = AIOKafkaConsumer(
        **client_kwargs(kafka),
        client_id=f"{kafka.client_id}-{what}",
        group_id=None,
        enable_auto_commit=False,
        # Never "latest": a background offset reset to the end would race the seek below.
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=kafka.max_partition_fetch_bytes,
        fetch_max_bytes=kafka.fetch_max_bytes,
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()  # what start() opened; unclosed, aiokafka complains at exit
        raise unreachable(kafka, exc) from exc
    try:
        partitions = [TopicPartition(topic, p) for p in range(count)]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        for tp, first in (await consumer.beginning_offsets(partitions)).items():
            consumer.seek(tp, first)
        pending = {tp for tp, end in ends.items() if end > 0}
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"{what}: reading {topic} did not reach its end offsets within {timeout_s:.0f} s"
                )
            batch = await consumer.getmany(*pending, timeout_ms=500)
            for tp, recs in batch.items():
                yield [r for r in recs if r.offset < ends[tp]]
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    except KafkaError as exc:
        raise ServiceUnavailable(f"{what}: reading {topic} failed: {exc}") from exc
    finally:
        await consumer.stop()


async def missing_topics(kafka: KafkaSettings, names: set[str]) -> set[str]:
    """Which of ``names`` do not exist (a running worker's check: failures are retriable)."""
    admin = AIOKafkaAdminClient(**client_kwargs(kafka), client_id=f"{kafka.client_id}-admin")
    try:
        await admin.start()
        return names - set(await admin.list_topics())
    except KafkaError as exc:
        raise kafka_failure(exc, "listing topics") from exc
    finally:
        await admin.close()


async def message_limits(kafka: KafkaSettings, names: set[str]) -> dict[str, int]:
    """Each existing topic's ``max.message.bytes`` (its own, or the broker's default it inherits)."""
    if not names:
        return {}
    admin = AIOKafkaAdminClient(**client_kwargs(kafka), client_id=f"{kafka.client_id}-admin")
    try:
        await admin.start()
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in sorted(names)]
        )
    except KafkaError as exc:
        raise kafka_failure(exc, "reading topic size limits") from exc
    finally:
        await admin.close()
    limits: dict[str, int] = {}
    for response in responses:
        for error_code, _message, _type, name, entries in response.resources:
            config = {entry[0]: entry[1] for entry in entries}
            if not error_code and str(config.get("max.message.bytes", "")).isdigit():
                limits[name] = int(config["max.message.bytes"])
            elif error_code and name in names:
                log.warning(
                    "cannot read the size limit of topic %s (%s): a frame too large for it would be "
                    "refused by the broker; grant DescribeConfigs on it (stream-worker acls)",
                    name,
                    for_code(error_code).__name__,
                )
    return limits


def frames_subscription(topics: TopicSettings) -> str:
    """The regex a worker subscribes with: ``--frames-pattern`` minus the worker's own outputs.

    A pattern such as ``cams-.*`` also matches ``cams-1.dlq``, the dead-letter topic the worker
    writes for ``cams-1``: reading it would dead-letter the dead letters into ``cams-1.dlq.dlq``,
    and so on; a broad pattern would read the labels, counts and review topics as frames too.
    Those names are cut out with look-aheads; the user's pattern keeps aiokafka's meaning (it
    must match at the start of the topic name).
    """
    outputs = "|".join(
        re.escape(t)
        for t in (topics.labels_topic, topics.counts_topic, topics.review_topic, topics.events_topic)
    )
    head, marker, tail = topics.dlq_topic.partition("{topic}")
    dead = f"{re.escape(head)}.*{re.escape(tail)}" if marker else re.escape(topics.dlq_topic)
    return f"(?!(?:{outputs})$)(?!(?:{dead})$)(?:{topics.frames_pattern})"


async def partitions_of(kafka: KafkaSettings, topic: str) -> int:
    """How many partitions a topic has (0 when it does not exist).

    A topic the principal may not describe raises the ACL refusal: the broker hides whether it
    exists, and "does not exist" would send the operator looking in the wrong place.
    """
    admin = AIOKafkaAdminClient(**client_kwargs(kafka), client_id=f"{kafka.client_id}-admin")
    try:
        await admin.start()
    except KafkaError as exc:
        await admin.close()
        raise unreachable(kafka, exc) from exc
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for entry in described:
        if entry.get("topic") != topic:
            continue
        if entry.get("error_code") == TopicAuthorizationFailedError.errno:
            raise kafka_failure(
                TopicAuthorizationFailedError(topic),
                f"describing topic {topic!r}",
                cure="grant its principal Describe on the topic (and Read, to consume it)",
            )
        if not entry.get("error_code"):
            return len(entry.get("partitions", []))
    return 0


def unreachable(kafka: KafkaSettings, exc: BaseException) -> ConfigError:
    """The one-line message for a broker that cannot be reached at start-up."""
    return ConfigError(
        f"cannot reach Kafka at {kafka.bootstrap} ({exc.__class__.__name__}): "
        + start_hint("Kafka", "--bootstrap / KAFKA_BOOTSTRAP")
    )


async def check_kafka(kafka: KafkaSettings, *, timeout_s: float = 10.0) -> None:
    """Connect to a bootstrap server exactly as the clients will (TLS, SASL) and name any refusal.

    aiokafka's clients only log why a connection failed and then report "Unable to bootstrap";
    this preflight connection turns the cause into one line that says what to change: an
    untrusted broker certificate, a failed TLS handshake, a refused SASL login, an unknown
    mechanism, or a plaintext client talking to a TLS listener. Security refusals are raised at
    the first server (every broker of a cluster would say the same); an unreachable server
    moves on to the next one.
    """
    kwargs = client_kwargs(kafka)
    unreachable_error: ConfigError | None = None
    for host, port in bootstrap_addresses(kafka.bootstrap):
        try:
            conn = await create_conn(
                host,
                port,
                client_id=f"{kafka.client_id}-preflight",
                request_timeout_ms=int(timeout_s * 1000),
                ssl_context=kwargs.get("ssl_context"),
                security_protocol=kafka.security_protocol,
                sasl_mechanism=kwargs.get("sasl_mechanism", "PLAIN"),
                sasl_plain_username=kwargs.get("sasl_plain_username"),
                sasl_plain_password=kwargs.get("sasl_plain_password"),
            )
        except (KafkaError, OSError, TimeoutError) as exc:
            problem = await _connection_problem(kafka, host, port, exc, timeout_s)
            if problem is not None:
                raise problem from None
            unreachable_error = unreachable(kafka, exc)
            continue
        conn.close()
        return
    if unreachable_error is not None:
        raise unreachable_error
    raise ConfigError(f"--bootstrap {kafka.bootstrap!r} names no host:port")


def bootstrap_addresses(bootstrap: str) -> list[tuple[str, int]]:
    """``host:port[,host:port]`` (IPv6 hosts in brackets) as (host, port) pairs."""
    addresses: list[tuple[str, int]] = []
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--bootstrap entry {item.strip()!r} is not host:port")
        addresses.append((host.strip("[]"), int(port)))
    return addresses


async def _connection_problem(
    kafka: KafkaSettings, host: str, port: int, exc: BaseException, timeout_s: float
) -> ConfigError | None:
    """The security misconfiguration behind a failed connection, or None when it looks unreachable."""
    where = f"Kafka at {host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConfigError(
            f"{where}: the broker's TLS certificate is not trusted ({_one_line(exc.verify_message)}): "
            f"set --ssl-cafile / KAFKA_SSL_CAFILE to the CA that signed it (now {kafka.ssl_cafile})"
        )
    if isinstance(exc, ssl.SSLError):
        return ConfigError(
            f"{where}: TLS handshake failed ({_one_line(exc.reason or exc)}): this is not a TLS "
            f"listener; use the broker's SSL/SASL_SSL port or set --security-protocol to match it"
        )
    if isinstance(exc, SaslAuthenticationFailed):
        return ConfigError(
            f"{where} refused SASL user {kafka.sasl_username!r} ({kafka.sasl_mechanism}): wrong password "
            f"or unknown user; check --sasl-username and the password in {kafka.sasl_password_file}"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return ConfigError(
            f"{where} does not enable SASL mechanism {kafka.sasl_mechanism}: "
            "set --sasl-mechanism / KAFKA_SASL_MECHANISM to one it enables"
        )
    if isinstance(exc, ConnectionRefusedError):
        return None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        alert = await _tls_alert(host, port, client_kwargs(kafka)["ssl_context"], timeout_s)
        if alert is not None and not kafka.ssl_certfile:
            return ConfigError(
                f"{where} requires a client certificate (mutual TLS; the broker said {alert}): set "
                "--ssl-certfile and --ssl-keyfile (KAFKA_SSL_CERTFILE, KAFKA_SSL_KEYFILE) to a certificate "
                "signed by a CA the broker trusts"
            )
        if alert is not None:
            return ConfigError(
                f"{where} rejected the client certificate {kafka.ssl_certfile} ({alert}): it must be "
                "signed by a CA in the broker's truststore and not be expired"
            )
    if kafka.security_protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
        if await speaks_tls(host, port, timeout_s):
            return ConfigError(
                f"{where} expects TLS but --security-protocol is {kafka.security_protocol}: "
                "set it to SASL_SSL (or SSL) and give --ssl-cafile"
            )
    elif await _speaks_plaintext_kafka(host, port, timeout_s):
        return ConfigError(
            f"{where} does not speak TLS (a plaintext connection works) but --security-protocol is "
            f"{kafka.security_protocol}: use the broker's TLS listener or fix --security-protocol"
        )
    return None


async def _speaks_plaintext_kafka(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host:port`` answers a plaintext Kafka ApiVersions request."""
    try:
        conn = await create_conn(host, port, request_timeout_ms=int(timeout_s * 1000))
    except (KafkaError, OSError, TimeoutError):
        return False
    conn.close()
    return True


async def speaks_tls(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host:port`` completes a TLS handshake.

    The certificate is not checked and no data is sent: this only asks what the port speaks, to
    tell a plaintext client on a TLS port from an unreachable server.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(timeout_s):
            _reader, writer = await asyncio.open_connection(host, port, ssl=context)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return True


# TLS alerts a broker sends when it wants a client certificate or does not accept the one sent.
_CLIENT_CERT_ALERTS = (
    "CERTIFICATE_REQUIRED",
    "HANDSHAKE_FAILURE",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_UNKNOWN",
    "ACCESS_DENIED",
)


async def _tls_alert(host: str, port: int, context: ssl.SSLContext, timeout_s: float) -> str | None:
    """The TLS alert ``host:port`` answers a client with ``context`` with, if it is about the client.

    With TLS 1.3 a broker that requires a client certificate finishes the handshake and only
    then sends its alert, so aiokafka sees a dropped connection; this reads one byte after the
    handshake to catch the alert and tell it apart from an unreachable broker.
    """
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
        try:
            # A broker that accepted us sends nothing until asked; its alert comes at once.
            async with asyncio.timeout(min(timeout_s, 2.0)):
                await reader.read(1)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                await writer.wait_closed()
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc)
        return reason if any(alert in reason.upper() for alert in _CLIENT_CERT_ALERTS) else None
    except (OSError, TimeoutError):
        return None
    return None


def _one_line(value: object) -> str:
    return " ".join(str(value).split())
