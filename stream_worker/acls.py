r"""The Kafka ACLs a worker needs, derived from its settings: what ``stream-worker acls`` prints.

On a cluster with an authorizer (KRaft's ``StandardAuthorizer``, or any that denies what no ACL
allows), the worker's principal needs exactly:

- ``Read`` and ``Describe`` on each frames topic: fetch, committed offsets, partition count;
- ``Read`` on its consumer group: join, fetch and commit offsets;
- ``Write`` and ``Describe`` on every topic it produces to: labels, counts, review and each frames
  topic's dead-letter topic (``Write`` on a topic also lets its idempotent producer start, KIP-679);
- ``Create`` on those output topics, unless they are made beforehand and the worker runs with
  ``--no-create-topics``.

No cluster-wide permission, and nothing on any other topic or group. ``tests/integration/
test_security.py`` runs the worker under exactly these ACLs, over SCRAM and over mutual TLS.

With ``--frames-pattern`` the frames topics are not known in advance. A pattern that is a
literal prefix followed by ``.*`` (``cams-.*``, ``^cams\..*``) becomes PREFIXED grants: Read and
Describe on the prefix, and Write, Describe and Create on the prefix of the dead-letter topics
(with the default ``{topic}.dlq`` that is the same prefix, so the frames topics become writable
too: Kafka's prefixes cannot say "ends with .dlq"). Any other pattern gets a comment, not a guess.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from stream_worker.errors import ConfigError
from stream_worker.settings import Settings


@dataclass(frozen=True, slots=True)
class AclGrant:
    """One ``kafka-acls.sh --add``: operations allowed on named resources of one type."""

    resource: str  # "topic" or "group"
    names: tuple[str, ...]
    operations: tuple[str, ...]
    prefixed: bool = False  # names are prefixes (--resource-pattern-type prefixed)

    def args(self, principal: str) -> list[str]:
        """``kafka-acls.sh`` arguments after the connection flags."""
        ops = [arg for op in self.operations for arg in ("--operation", op)]
        names = [arg for name in self.names for arg in (f"--{self.resource}", name)]
        pattern = ["--resource-pattern-type", "prefixed"] if self.prefixed else []
        return ["--add", "--allow-principal", principal, *ops, *names, *pattern]


_PREFIX_PATTERN = re.compile(r"\^?((?:[A-Za-z0-9_-]|\\\.)+)\.\*\$?")


def pattern_prefix(pattern: str) -> str | None:
    """The literal topic-name prefix a ``prefix.*`` pattern stands for, else None."""
    match = _PREFIX_PATTERN.fullmatch(pattern)
    return match.group(1).replace("\\.", ".") if match else None


def required_acls(settings: Settings, *, create_topics: bool = True) -> list[AclGrant]:
    """The grants the worker with ``settings`` needs (see the module docstring).

    For a ``--frames-pattern`` that is not a plain prefix the frames-topic grants are missing
    (:func:`acl_commands` says so in a comment).
    """
    t = settings.topics
    # DescribeConfigs: the worker reads the size limit of the topics that carry frames (review
    # samples, dead letters) so that it never sends a record they would refuse.
    writes = (
        ("Write", "Describe", "DescribeConfigs", "Create")
        if create_topics
        else ("Write", "Describe", "DescribeConfigs")
    )
    grants = [
        AclGrant("group", (t.group,), ("Read",)),
        AclGrant("topic", tuple(t.output_topics()), writes),
    ]
    if not t.frames_pattern:
        grants.insert(0, AclGrant("topic", tuple(t.frames_topic), ("Read", "Describe")))
        return grants
    prefix = pattern_prefix(t.frames_pattern)
    if prefix is not None:
        head, marker, _tail = t.dlq_topic.partition("{topic}")
        grants.insert(0, AclGrant("topic", (prefix,), ("Read", "Describe"), prefixed=True))
        if marker:
            grants.append(AclGrant("topic", (head + prefix,), writes, prefixed=True))
        else:
            grants.append(AclGrant("topic", (t.dlq_topic,), writes))
    return grants


def acl_commands(
    settings: Settings,
    principal: str,
    *,
    create_topics: bool = True,
    command_config: str = "admin.properties",
) -> list[str]:
    """Shell lines that grant ``principal`` what the worker needs, for an administrator to run."""
    lines = []
    if settings.topics.frames_pattern and pattern_prefix(settings.topics.frames_pattern) is None:
        dlq = settings.topics.dlq_topic
        lines.append(
            f"# --frames-pattern {settings.topics.frames_pattern}: grant Read and Describe on the topics it "
            f"matches and Write, Describe and Create on their dead-letter topics ({dlq}), for example "
            "with --resource-pattern-type prefixed"
        )
    base = [
        "kafka-acls.sh",
        "--bootstrap-server",
        settings.kafka.bootstrap,
        "--command-config",
        command_config,
    ]
    for grant in required_acls(settings, create_topics=create_topics):
        lines.append(shlex.join([*base, *grant.args(principal)]))
    return lines


def default_principal(settings: Settings) -> str:
    """The principal the broker will see: the SASL user; without one, a one-line refusal.

    Never ``User:ANONYMOUS``: pasted as printed, those grants would give every unauthenticated
    client read on the frames and write on the outputs. A client certificate's principal depends
    on the broker's ``ssl.principal.mapping.rules``, which only the administrator knows.
    """
    if settings.kafka.sasl_username:
        return f"User:{settings.kafka.sasl_username}"
    if settings.kafka.ssl_certfile:
        raise ConfigError(
            "acls: name the principal your broker maps the worker's client certificate to "
            "(by its ssl.principal.mapping.rules): pass --principal, e.g. --principal User:lookout"
        )
    raise ConfigError(
        "acls: the worker has no SASL user, so its principal is unknown: pass --principal "
        "(e.g. User:lookout) or --sasl-username; grants for User:ANONYMOUS would open the "
        "topics to every unauthenticated client"
    )
