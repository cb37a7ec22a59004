"""Locked-down services for the security tests: a SASL_SSL Kafka broker and an ACL + TLS Redis.

Both run as separate processes on their own free ports and state directories, next to (never
instead of) the session's plain services. Certificates are made here with the ``openssl``
command line: a throw-away CA, a server certificate for ``127.0.0.1``/``localhost`` signed by
it, and, for the untrusted-certificate test, a second CA that signed nothing the servers use.

The broker is the same Apache Kafka build that ``scripts/services`` runs (the jars cached in
``~/.cache/lookout/kafka-<version>/libs``), started with the same java command line and a
server.properties of its own:

* ``SASL_SSL`` listener (SCRAM-SHA-512 over TLS) for clients and for inter-broker traffic;
  TLS uses PEM key and trust stores, so no keytool and no JKS passwords;
* ``SSL`` listener that requires a client certificate (mutual TLS); the certificate's
  ``CN=<name>`` maps to the principal ``User:<name>``, the same principal a SCRAM login gets;
* the KRaft controller listener stays PLAINTEXT on loopback (it is not a client port);
* SCRAM users are created when the storage is formatted (``StorageTool format --add-scram``),
  so they exist before the broker first accepts a connection;
* the KRaft ``StandardAuthorizer`` denies everything no ACL allows; ACLs are added with Kafka's
  own ``AclCommand`` (the kafka-tools jar), as an admin super-user over SASL_SSL.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.host import free_port
from tests.conftest import TOOLS_CACHE

REPO = Path(__file__).resolve().parents[2]
KAFKA_POM = REPO / "scripts" / "kafka" / "pom.xml"

# The commands the worker and `stream-worker counts` send to Redis, and nothing else (found by
# running the worker under this ACL): the preflight PING and GET, the counts Lua script
# (EVALSHA, with SCRIPT LOAD/EXISTS when the server does not have it yet; the calls inside the
# script are checked against the same ACL), watermark reads, the dirty-window flush, the live
# view (HSET/SET/EXPIRE) and the counts readers. docs/SECURITY.md shows the same list.
WORKER_REDIS_COMMANDS = (
    "ping",
    "evalsha",
    "script|load",
    "script|exists",
    "get",
    "set",
    "expire",
    "hset",
    "hmget",
    "hgetall",
    "hincrby",
    "sadd",
    "srem",
    "smembers",
    "zadd",
    "zrange",
    "zremrangebyscore",
    "zrem",
    "exists",
)


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def new_secret() -> str:
    """A random password (hex: safe in JAAS strings, StorageTool arguments and ACL files)."""
    return secrets.token_hex(16)


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class Authority:
    """A certificate authority made for one test module: its certificate and private key."""

    name: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerCert:
    """A server certificate and its (unencrypted PKCS#8) key, signed by ``issuer``."""

    cert: Path
    key: Path
    issuer: Authority

    def keystore_pem(self) -> Path:
        """Key and certificate in one PEM file: Kafka's ``ssl.keystore.type=PEM`` format."""
        path = self.cert.with_suffix(".keystore.pem")
        path.write_text(self.key.read_text() + self.cert.read_text())
        path.chmod(0o600)
        return path


def make_authority(directory: Path, name: str) -> Authority:
    """A self-signed CA (EC P-256, valid 2 days) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=lookout test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return Authority(name, cert, key)


def issue_cert(authority: Authority, directory: Path, name: str) -> ServerCert:
    """A certificate with ``CN=name`` for ``127.0.0.1`` and ``localhost``, signed by ``authority``.

    It is good for both ends of TLS (``serverAuth`` and ``clientAuth``): a server's certificate,
    or a client's for mutual TLS.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, csr = directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "basicConstraints=CA:FALSE\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(authority.cert), "-CAkey", str(authority.key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
        cwd=directory,
    )  # fmt: skip
    key.chmod(0o600)
    return ServerCert(cert, key, authority)


def write_secret(directory: Path, name: str, value: str) -> Path:
    """A secret file as a Kubernetes Secret volume would mount it: owner-readable only."""
    path = directory / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


# --- Kafka --------------------------------------------------------------------------------


def kafka_libs() -> Path:
    """The cached jars of the Kafka version ``scripts/services`` runs (it fetches them on `up`)."""
    match = re.search(r"<kafka.version>(.*)</kafka.version>", KAFKA_POM.read_text())
    if match is None:
        raise RuntimeError(f"no <kafka.version> in {KAFKA_POM}")
    cache = Path(TOOLS_CACHE)  # where scripts/services keeps them
    libs = cache / f"kafka-{match.group(1)}" / "libs"
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise RuntimeError(f"Kafka jars missing in {libs}: run scripts/services up (it fetches them)")
    return libs


@dataclass
class SecureKafka:
    """A running single-node broker with a SASL_SSL (SCRAM-SHA-512) and a mutual-TLS listener."""

    bootstrap: str
    mtls_bootstrap: str
    directory: Path
    process: subprocess.Popen[bytes]
    log: Path
    admin_config: Path
    admin_password: str

    def acls(self, *args: str) -> str:
        """Run Kafka's ``AclCommand`` (``kafka-acls.sh``) as the admin super-user; its output.

        ``args`` as for ``kafka-acls.sh`` without the connection flags, e.g.
        ``--add --allow-principal User:lookout --operation Read --group lookout``.
        """
        result = subprocess.run(
            ["java", "-Xshare:auto", "-XX:TieredStopAtLevel=1", "-cp", f"{kafka_libs()}/*",
             "org.apache.kafka.tools.AclCommand", "--bootstrap-server", self.bootstrap,
             "--command-config", str(self.admin_config), *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(
                f"kafka-acls {' '.join(args)} failed: {(result.stderr or result.stdout).strip()}"
            )
        return result.stdout

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; the broker's state directory is left for the caller."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


ADMIN_USER = "lookout-admin"
BROKER_USER = "lookout-broker"


def _kafka_properties(
    directory: Path, ports: tuple[int, int, int], keystore: Path, ca: Path, broker: tuple[str, str]
) -> str:
    port, mtls_port, controller_port = ports
    user, password = broker
    jaas = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{user}" password="{password}";'
    )
    return f"""process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=SASL_SSL://127.0.0.1:{port},SSL://127.0.0.1:{mtls_port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=SASL_SSL://127.0.0.1:{port},SSL://127.0.0.1:{mtls_port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=SASL_SSL:SASL_SSL,SSL:SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={jaas}
ssl.keystore.type=PEM
ssl.keystore.location={keystore}
ssl.truststore.type=PEM
ssl.truststore.location={ca}
ssl.client.auth=none
listener.name.ssl.ssl.client.auth=required
ssl.principal.mapping.rules=RULE:^CN=([^,]+)$/$1/,DEFAULT
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
# ANONYMOUS is the broker talking to its own controller over the loopback PLAINTEXT listener.
super.users=User:{user};User:{ADMIN_USER};User:ANONYMOUS
allow.everyone.if.no.acl.found=false
log.dirs={directory}/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=2
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
message.max.bytes=26214400
"""


_LOG4J = """Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: INFO
      AppenderRef:
        - ref: STDOUT
"""


@contextlib.contextmanager
def secure_kafka(
    directory: Path, server: ServerCert, users: Mapping[str, str], *, start_timeout_s: float = 90
) -> Iterator[SecureKafka]:
    """Format and start the secure broker with SCRAM-SHA-512 ``users`` (name -> password); stop it after.

    A broker user for inter-broker traffic and an admin user (both super-users) are added to
    ``users``; every other principal needs ACLs (:meth:`SecureKafka.acls`). Raises ``RuntimeError`` with
    the end of the broker's log when it does not start.
    """
    directory.mkdir(parents=True, exist_ok=True)
    libs = kafka_libs()
    port, controller_port = free_port(), free_port()
    mtls_port = free_port()
    broker_user, admin_user = (BROKER_USER, new_secret()), (ADMIN_USER, new_secret())
    properties = directory / "server.properties"
    properties.write_text(
        _kafka_properties(
            directory,
            (port, mtls_port, controller_port),
            server.keystore_pem(),
            server.issuer.cert,
            broker_user,
        )
    )
    admin_config = directory / "admin.properties"
    admin_config.write_text(
        "security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n"
        "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{admin_user[0]}" password="{admin_user[1]}";\n'
        f"ssl.truststore.type=PEM\nssl.truststore.location={server.issuer.cert}\n"
    )
    admin_config.chmod(0o600)
    (directory / "log4j2.yaml").write_text(_LOG4J)
    classpath = f"{libs}/*"
    scram = [
        arg
        for name, password in {**users, **dict([broker_user, admin_user])}.items()
        for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]")
    ]
    cluster_id = subprocess.run(
        ["java", "-cp", classpath, "kafka.tools.StorageTool", "random-uuid"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    formatted = subprocess.run(
        ["java", "-cp", classpath, "kafka.tools.StorageTool", "format", "-t", cluster_id,
         "-c", str(properties), *scram],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if formatted.returncode != 0:
        raise RuntimeError(f"formatting the secure broker's storage failed: {formatted.stderr.strip()}")
    log = directory / "kafka.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["java", "-Xmx512m", "-Xms128m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
             f"-Dlog4j2.configurationFile={directory / 'log4j2.yaml'}", "-cp", classpath,
             "kafka.Kafka", str(properties)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    broker = SecureKafka(
        f"127.0.0.1:{port}", f"127.0.0.1:{mtls_port}", directory, process, log, admin_config, admin_user[1]
    )
    try:
        deadline = time.monotonic() + start_timeout_s
        while not (
            "Kafka Server started" in log.read_text(errors="replace")
            and port_open(port)
            and port_open(mtls_port)
        ):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"the secure broker did not start (see {log}):\n{tail}")
            time.sleep(0.3)
        yield broker
    finally:
        broker.stop()


# --- Redis --------------------------------------------------------------------------------


@dataclass
class SecureRedis:
    """A running redis-server: default user off, one ACL user, TLS only (no plaintext port)."""

    tls_port: int
    directory: Path
    process: subprocess.Popen[bytes]
    log: Path

    def url(self, db: int = 0) -> str:
        """The ``rediss://`` URL of the server (no credentials: those come from files)."""
        return f"rediss://127.0.0.1:{self.tls_port}/{db}"


def redis_acl(
    user: str, password: str, key_pattern: str, commands: tuple[str, ...] = WORKER_REDIS_COMMANDS
) -> str:
    """An ACL file: the default user disabled, ``user`` limited to ``key_pattern`` and ``commands``."""
    allowed = " ".join(f"+{c}" for c in commands)
    return (
        "user default off resetkeys -@all\n"
        f"user {user} on >{password} resetkeys ~{key_pattern} resetchannels -@all {allowed}\n"
    )


@contextlib.contextmanager
def secure_redis(
    directory: Path, server: ServerCert, acl: str, *, start_timeout_s: float = 20
) -> Iterator[SecureRedis]:
    """Start redis-server with ``acl`` (see :func:`redis_acl`) on a TLS-only port; stop it after."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is missing: run scripts/services up (it installs it)")
    directory.mkdir(parents=True, exist_ok=True)
    aclfile = directory / "users.acl"
    aclfile.write_text(acl)
    aclfile.chmod(0o600)
    tls_port = free_port()
    log = directory / "redis.log"
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(tls_port),
         "--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key),
         "--tls-ca-cert-file", str(server.issuer.cert), "--tls-auth-clients", "no",
         "--aclfile", str(aclfile), "--dir", str(directory), "--save", "", "--appendonly", "no",
         "--logfile", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    redis = SecureRedis(tls_port, directory, process, log)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not port_open(tls_port):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise RuntimeError(f"the secure redis-server did not start:\n{tail}")
            time.sleep(0.1)
        yield redis
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
