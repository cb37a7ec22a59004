"""Security end to end: Kafka over SASL_SSL (SCRAM-SHA-512) and mutual TLS under ACLs, Redis with
ACLs over TLS, no leaked secret.

A separate broker and a separate redis-server are started for this module (tests/support/
secure.py) with a CA and certificates made here. The broker's authorizer denies what no ACL
allows; the worker's principal ``User:lookout`` gets exactly the grants ``stream-worker acls``
prints, run through Kafka's own ``AclCommand``. The test's own clients (making frames topics,
producing frames, reading labels) use an admin super-user, as an operator's tooling would.
The worker runs as the real command, ``stream-worker run``, reading every credential from
files, as it would from a mounted Kubernetes Secret. The misconfigurations an operator really
makes must each end in exit code 2 and one line on stderr that names the cause, never a
traceback or a retry loop.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from redis import exceptions as redis_errors

from bench.host import free_port
from stream_worker import codec
from stream_worker.frames import SourceKind
from stream_worker.kafka import client_kwargs, ensure_topics, make_producer
from stream_worker.redis_client import make_redis
from stream_worker.settings import KafkaSettings, RedisSettings, TopicSettings
from stream_worker.sinks.counts import CountsReader
from tests.support import secure
from tests.support.media import photo_jpeg, street_jpegs

STREAM_WORKER = Path(sys.executable).with_name("stream-worker")
USER = "lookout"
KEY_PREFIX = "lookout-secure"


@dataclass(frozen=True)
class Secured:
    """The locked-down services of this module and the files a deployment would mount."""

    kafka: secure.SecureKafka
    redis: secure.SecureRedis
    ca: secure.Authority
    other_ca: secure.Authority
    client_cert: secure.ServerCert  # CN=lookout, signed by ca: the worker's mutual-TLS identity
    stranger_cert: secure.ServerCert  # CN=lookout, signed by other_ca
    kafka_password: str
    redis_password: str
    kafka_password_file: Path
    redis_password_file: Path
    wrong_password_file: Path
    admin_password_file: Path

    def kafka_settings(self) -> KafkaSettings:
        """How this test's own clients reach the secure broker: as the admin super-user."""
        return KafkaSettings(
            bootstrap=self.kafka.bootstrap,
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username=secure.ADMIN_USER,
            sasl_password_file=str(self.admin_password_file),
            ssl_cafile=str(self.ca.cert),
        )

    def mtls_changes(self, cert: secure.ServerCert | None) -> dict[str, str | None]:
        """``worker_flags`` changes for the mutual-TLS listener, presenting ``cert`` (or none)."""
        return {
            "bootstrap": self.kafka.mtls_bootstrap,
            "security_protocol": "SSL",
            "sasl_mechanism": None,
            "sasl_username": None,
            "sasl_password_file": None,
            "ssl_certfile": str(cert.cert) if cert else None,
            "ssl_keyfile": str(cert.key) if cert else None,
        }

    def redis_settings(self) -> RedisSettings:
        """How this test's own clients reach the ACL redis-server."""
        return RedisSettings(
            redis_url=self.redis.url(),
            redis_username=USER,
            redis_password_file=str(self.redis_password_file),
            redis_ca_file=str(self.ca.cert),
            key_prefix=KEY_PREFIX,
        )

    def grant_worker(self, flags: list[str], *, skip: tuple[str, ...] = ()) -> None:
        """Run the ACL commands ``stream-worker acls`` prints for ``flags``.

        ``skip`` = (resource, operation, ...): leave those operations out of the grants on that
        resource type ("topic" or "group"), to play an administrator who forgot them.
        """
        printed = subprocess.run(
            [str(STREAM_WORKER), "acls", "--principal", f"User:{USER}", *flags],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        bootstrap = flags[flags.index("--bootstrap") + 1]
        for line in printed.splitlines():
            args = shlex.split(line)
            connection = [
                "kafka-acls.sh",
                "--bootstrap-server",
                bootstrap,
                "--command-config",
                "admin.properties",
            ]
            assert args[:5] == connection, line
            args = args[5:]
            if skip and f"--{skip[0]}" in args:
                for operation in skip[1:]:
                    if operation in args:
                        i = args.index(operation)
                        args = args[: i - 1] + args[i + 1 :]  # drop "--operation <operation>"
                if "--operation" not in args:
                    continue
            self.kafka.acls(*args)

    def worker_flags(self, topic: str, **changes: str | None) -> list[str]:
        """``stream-worker run`` flags for the secure services; ``changes`` replace (None drops) flags."""
        topics = TopicSettings.named_after(topic)
        flags: dict[str, str | None] = {
            "bootstrap": self.kafka.bootstrap,
            "security-protocol": "SASL_SSL",
            "sasl-mechanism": "SCRAM-SHA-512",
            "sasl-username": USER,
            "sasl-password-file": str(self.kafka_password_file),
            "ssl-cafile": str(self.ca.cert),
            "redis-url": self.redis.url(),
            "redis-username": USER,
            "redis-password-file": str(self.redis_password_file),
            "redis-ca-file": str(self.ca.cert),
            "key-prefix": KEY_PREFIX,
            "frames-topic": topic,
            "labels-topic": topics.labels_topic,
            "counts-topic": topics.counts_topic,
            "review-topic": topics.review_topic,
            "events-topic": topics.events_topic,
            "group": f"g-{uuid.uuid4().hex[:8]}",
            "metrics-port": "0",
            "metrics-host": "127.0.0.1",
            "max-wait-ms": "20",
        }
        flags.update({k.replace("_", "-"): v for k, v in changes.items()})
        return [arg for name, value in flags.items() if value is not None for arg in (f"--{name}", value)]

    @property
    def passwords(self) -> tuple[str, str]:
        return self.kafka_password, self.redis_password


def clean_env() -> dict[str, str]:
    """The environment without lookout/Kafka/Redis settings, so only the flags configure the worker."""
    keep = {"LOOKOUT_CACHE_DIR", "LOOKOUT_PRECISION"}  # the test session's cache and fp32 (conftest)
    return {
        k: v for k, v in os.environ.items() if k in keep or not k.startswith(("LOOKOUT_", "KAFKA_", "REDIS_"))
    }


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """One SASL_SSL broker and one ACL + TLS redis-server for the whole module."""
    root = tmp_path_factory.mktemp("secure")
    pki = root / "pki"
    ca = secure.make_authority(pki, "ca")
    other_ca = secure.make_authority(pki, "other-ca")  # signed nothing the servers use
    server = secure.issue_cert(ca, pki, "server")
    client_cert = secure.issue_cert(ca, pki, USER)
    stranger_cert = secure.issue_cert(other_ca, pki / "other", USER)
    kafka_password, redis_password = secure.new_secret(), secure.new_secret()
    secrets_dir = root / "secrets"
    secrets_dir.mkdir()
    acl = secure.redis_acl(USER, redis_password, f"{KEY_PREFIX}:*")
    with (
        secure.secure_kafka(root / "kafka", server, {USER: kafka_password}) as kafka,
        secure.secure_redis(root / "redis", server, acl) as redis,
    ):
        yield Secured(
            kafka=kafka,
            redis=redis,
            ca=ca,
            other_ca=other_ca,
            client_cert=client_cert,
            stranger_cert=stranger_cert,
            kafka_password=kafka_password,
            redis_password=redis_password,
            kafka_password_file=secure.write_secret(secrets_dir, "kafka-password", kafka_password),
            redis_password_file=secure.write_secret(secrets_dir, "redis-password", redis_password),
            wrong_password_file=secure.write_secret(secrets_dir, "wrong-password", secure.new_secret()),
            admin_password_file=secure.write_secret(secrets_dir, "admin-password", kafka.admin_password),
        )


async def secure_topic(secured: Secured, partitions: int = 2) -> str:
    topic = f"frames-{uuid.uuid4().hex[:12]}"
    await ensure_topics(secured.kafka_settings(), {topic: (partitions, {})})
    return topic


async def read_secure(secured: Secured, topic: str, expected: int, timeout_s: float = 90) -> list[bytes]:
    """Values of ``topic`` read over SASL_SSL until ``expected`` arrived."""
    consumer = AIOKafkaConsumer(
        topic, **client_kwargs(secured.kafka_settings()), group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(values) < expected:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    values.extend(r.value for r in records)
    finally:
        await consumer.stop()
    return values


def free_metrics_port() -> str:
    return str(free_port())


async def produce_frames(secured: Secured, topic: str, count: int, *, traps: int = 0) -> list[str]:
    """``count`` real street frames from three cameras, then ``traps`` cat photos from a camera trap
    (their events exercise the rest of the counts script), produced as the admin; their frame ids."""
    producer = make_producer(secured.kafka_settings(), client_id_suffix="test")
    await producer.start()
    ids = []
    cameras = [(f"cam-{i % 3}", SourceKind.TRAFFIC, data) for i, data in enumerate(street_jpegs(count))]
    cameras += [("trap-1", SourceKind.WILDLIFE, photo_jpeg("chelsea.png"))] * traps
    try:
        for i, (source, kind, data) in enumerate(cameras):
            frame_id = f"secure-{i}-{uuid.uuid4().hex[:6]}"
            headers = codec.frame_headers(source, kind, frame_id, 1_790_000_000_000 + i * 1000, "image/jpeg")
            await producer.send_and_wait(topic, data, key=source.encode(), headers=headers)
            ids.append(frame_id)
    finally:
        await producer.stop()
    return ids


async def test_worker_labels_frames_over_sasl_ssl_and_counts_in_acl_redis_without_leaking_secrets(
    secured: Secured, tmp_path: Path
) -> None:
    topic = await secure_topic(secured)
    ids = await produce_frames(secured, topic, 24, traps=3)

    port = free_metrics_port()
    stderr_path = tmp_path / "worker.stderr"
    flags = secured.worker_flags(topic, metrics_port=port)
    secured.grant_worker(flags)  # the worker's principal has these ACLs and no others
    # DEBUG: the most a log can say; a secret must not appear even there.
    args = [str(STREAM_WORKER), "run", *flags, "--log-level", "DEBUG"]
    with stderr_path.open("wb") as stderr:
        worker = subprocess.Popen(args, env=clean_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        try:
            labels = await read_secure(secured, TopicSettings.named_after(topic).labels_topic, len(ids))
        except TimeoutError:
            raise AssertionError(
                f"no labels over SASL_SSL; worker exit {worker.poll()}: {stderr_path.read_text()[-2000:]}"
            ) from None
        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(worker.wait, 60)
    log = stderr_path.read_text()
    assert exit_code == 0 and "Traceback" not in log, log[-2000:]
    assert sorted(codec.parse_label_record(v)["frame_id"] for v in labels) == sorted(ids)
    assert "lookout_frames_labelled_total" in metrics

    # The counts went to the ACL user's prefix, over TLS.
    client = make_redis(secured.redis_settings())
    try:
        counts = CountsReader(client, key_prefix=KEY_PREFIX)
        sources = await counts.sources()
        frames_counted = 0
        for source in sources:
            frames_counted += sum(w.frames for w in await counts.read(source, "1m"))
    finally:
        await client.aclose()
    assert sources == ["cam-0", "cam-1", "cam-2", "trap-1"] and frames_counted == len(ids)

    # No secret in the worker's log, its metrics, or `stream-worker config` (even when a
    # password is written into the Redis URL, which people do: it is refused).
    config = subprocess.run(
        [
            str(STREAM_WORKER),
            "config",
            *secured.worker_flags(
                topic,
                redis_url=secured.redis.url().replace(
                    "rediss://", f"rediss://{USER}:{secured.redis_password}@"
                ),
            ),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    # A password written into the URL is refused (secrets come only from files), in one line
    # that shows the URL redacted.
    assert config.returncode == 2, config.stderr
    assert "--redis-password-file" in config.stderr and f"rediss://{USER}:***@" in config.stderr
    for password in secured.passwords:
        assert password not in log
        assert password not in metrics
        assert password not in config.stdout + config.stderr


async def label_with_worker(
    secured: Secured, flags: list[str], labels_topic: str, count: int, tmp_path: Path
) -> list[str]:
    """Run ``stream-worker run flags`` until ``count`` labels are out, stop it; the labelled frame ids."""
    stderr_path = tmp_path / f"worker-{uuid.uuid4().hex[:6]}.stderr"
    with stderr_path.open("wb") as stderr:
        worker = subprocess.Popen(
            [str(STREAM_WORKER), "run", *flags], env=clean_env(), stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        try:
            labels = await read_secure(secured, labels_topic, count)
        except TimeoutError:
            raise AssertionError(
                f"no labels; worker exit {worker.poll()}: {stderr_path.read_text()[-2000:]}"
            ) from None
    finally:
        worker.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(worker.wait, 60)
    log = stderr_path.read_text()
    assert exit_code == 0 and "Traceback" not in log, log[-2000:]
    return sorted(codec.parse_label_record(v)["frame_id"] for v in labels)


async def test_worker_labels_frames_over_mutual_tls_with_the_printed_acls(
    secured: Secured, tmp_path: Path
) -> None:
    # The broker maps the certificate's CN=lookout to User:lookout, the principal of the grants.
    topic = await secure_topic(secured)
    ids = await produce_frames(secured, topic, 9)
    flags = secured.worker_flags(topic, **secured.mtls_changes(secured.client_cert))
    secured.grant_worker(flags)
    labels_topic = TopicSettings.named_after(topic).labels_topic
    assert await label_with_worker(secured, flags, labels_topic, len(ids), tmp_path) == sorted(ids)


async def test_a_prefix_frames_pattern_runs_under_the_printed_prefixed_acls(
    secured: Secured, tmp_path: Path
) -> None:
    prefix = f"pat-{uuid.uuid4().hex[:8]}-"
    topic = f"{prefix}a"
    await ensure_topics(secured.kafka_settings(), {topic: (2, {})})
    # A corrupt frame first, on cam-0's partition: once cam-0's later frames are labelled, its
    # dead letter has been published too (a partition's batches are published in order).
    producer = make_producer(secured.kafka_settings(), client_id_suffix="test")
    await producer.start()
    try:
        headers = codec.frame_headers(
            "cam-0", SourceKind.TRAFFIC, "corrupt-1", 1_790_000_000_000, "image/jpeg"
        )
        await producer.send_and_wait(topic, b"\xff\xd8\xff\xe0" + bytes(256), key=b"cam-0", headers=headers)
    finally:
        await producer.stop()
    ids = await produce_frames(secured, topic, 4)
    outputs = {f"{t}_topic": f"{prefix}{t}" for t in ("labels", "counts", "review")}
    flags = secured.worker_flags(topic, frames_pattern=f"{prefix}.*", **outputs)
    secured.grant_worker(flags)  # prefixed grants on the pattern's prefix, literal ones on outputs
    assert await label_with_worker(secured, flags, f"{prefix}labels", len(ids), tmp_path) == sorted(ids)
    # The worker created the new topic's dead-letter topic itself (Create on the prefix).
    dead = await read_secure(secured, f"{topic}.dlq", 1)
    assert len(dead) == 1


ACL_GAPS = [
    pytest.param(("topic", "Read", "Describe"), "describing topic", id="nothing-on-frames-topic"),
    pytest.param(("topic", "Read"), "consuming frames", id="no-read-on-frames-topic"),
    pytest.param(("group", "Read"), "joining consumer group", id="no-read-on-group"),
    pytest.param(("topic", "Create"), "creating topic", id="no-create-on-output-topics"),
    pytest.param(("topic", "Write"), "publishing", id="no-write-on-output-topics"),
]


@pytest.mark.parametrize(("missing", "where"), ACL_GAPS)
async def test_a_missing_acl_is_one_line_and_loses_nothing_once_granted(
    secured: Secured, tmp_path: Path, missing: tuple[str, ...], where: str
) -> None:
    topic = await secure_topic(secured)
    ids = await produce_frames(secured, topic, 3)
    flags = secured.worker_flags(topic)
    secured.grant_worker(flags, skip=missing)
    result = await asyncio.to_thread(
        subprocess.run,
        [str(STREAM_WORKER), "run", *flags],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith(f"stream-worker: {where}") and "ACLs refuse the worker" in last, last
    assert "stream-worker acls" in last
    # The administrator grants what was missing; the same worker then labels every frame.
    secured.grant_worker(flags)
    labels_topic = TopicSettings.named_after(topic).labels_topic
    assert await label_with_worker(secured, flags, labels_topic, len(ids), tmp_path) == sorted(ids)


REFUSALS = [
    pytest.param({"sasl_password_file": "WRONG"}, "refused SASL user 'lookout'", id="kafka-wrong-password"),
    pytest.param({"MTLS": "none"}, "requires a client certificate", id="kafka-mtls-without-certificate"),
    pytest.param(
        {"MTLS": "stranger"}, "rejected the client certificate", id="kafka-mtls-certificate-from-other-ca"
    ),
    pytest.param({"security_protocol": "PLAINTEXT"}, "expects TLS", id="kafka-plaintext-to-tls-port"),
    pytest.param(
        {"ssl_cafile": "OTHER_CA"}, "TLS certificate is not trusted", id="kafka-untrusted-certificate"
    ),
    pytest.param(
        {"redis_username": None, "redis_password_file": None}, "requires a login", id="redis-no-credentials"
    ),
    pytest.param({"redis_password_file": "WRONG"}, "refused user 'lookout'", id="redis-wrong-password"),
    pytest.param(
        {"key_prefix": "lookout"}, "may not use keys under 'lookout:'", id="redis-outside-its-prefix"
    ),
    pytest.param({"redis_url": "PLAIN"}, "expects TLS", id="redis-plaintext-to-tls-port"),
    pytest.param(
        {"redis_ca_file": "OTHER_CA"}, "TLS certificate is not trusted", id="redis-untrusted-certificate"
    ),
]


@pytest.mark.parametrize(("changes", "cause"), REFUSALS)
def test_misconfigured_security_is_refused_with_one_clear_line(
    secured: Secured, changes: dict[str, str | None], cause: str
) -> None:
    stand_ins = {
        "WRONG": str(secured.wrong_password_file),
        "OTHER_CA": str(secured.other_ca.cert),
        "PLAIN": secured.redis.url().replace("rediss://", "redis://"),
    }
    resolved = {k: stand_ins.get(v, v) if v is not None else None for k, v in changes.items()}
    if "MTLS" in resolved:  # the mutual-TLS listener, with no certificate or another CA's
        resolved = secured.mtls_changes(secured.stranger_cert if resolved["MTLS"] == "stranger" else None)
    result = subprocess.run(
        [str(STREAM_WORKER), "run", *secured.worker_flags("frames-never-read", **resolved)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("stream-worker: "), result.stderr
    assert cause in lines[0]
    for password in secured.passwords:
        assert password not in result.stderr


async def test_redis_refuses_anonymous_clients_and_keeps_lookouts_user_in_its_prefix(
    secured: Secured,
) -> None:
    anonymous = aioredis.from_url(secured.redis.url(), ssl_ca_certs=str(secured.ca.cert))
    try:
        with pytest.raises(redis_errors.AuthenticationError):
            await anonymous.ping()
    finally:
        await anonymous.aclose()
    client = make_redis(secured.redis_settings())
    try:
        assert await client.ping()
        await client.set(f"{KEY_PREFIX}:probe", b"1", ex=60)
        with pytest.raises(redis_errors.NoPermissionError):
            await client.set("other-app:probe", b"1")
        with pytest.raises(redis_errors.NoPermissionError):
            await client.flushall()
        with pytest.raises(redis_errors.NoPermissionError):
            await client.config_get("requirepass")
    finally:
        await client.aclose()
