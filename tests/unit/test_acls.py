"""`stream-worker acls`: the grants printed for an operator follow the worker's own settings.

That these grants are enough (and each one needed) is proven against a real broker with an
authorizer in tests/integration/test_security.py; here, that they name the right resources.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from stream_worker.acls import acl_commands, required_acls
from stream_worker.settings import load_settings

STREAM_WORKER = Path(sys.executable).with_name("stream-worker")


def test_grants_follow_the_configured_topics_and_group() -> None:
    settings = load_settings(
        flags={"frames_topic": "cams-a,cams-b", "labels_topic": "l", "counts_topic": "c", "group": "traffic"},
        env={},
    )
    grants = {(g.resource, g.names): g.operations for g in required_acls(settings)}
    assert grants == {
        ("topic", ("cams-a", "cams-b")): ("Read", "Describe"),
        ("group", ("traffic",)): ("Read",),
        ("topic", ("l", "c", "review", "events", "cams-a.dlq", "cams-b.dlq")): (
            "Write",
            "Describe",
            "DescribeConfigs",
            "Create",
        ),
    }
    without_create = required_acls(settings, create_topics=False)
    assert all("Create" not in g.operations for g in without_create)


def test_a_frames_pattern_that_is_not_a_prefix_gets_a_comment_not_a_guess() -> None:
    settings = load_settings(flags={"frames_pattern": "cams-[0-9]+"}, env={})
    lines = acl_commands(settings, "User:lookout")
    assert lines[0].startswith("# --frames-pattern cams-[0-9]+") and "{topic}.dlq" in lines[0]
    assert not any("cams-" in line for line in lines[1:])
    assert "{topic}.dlq" not in " ".join(settings.topics.output_topics())


def test_a_prefix_pattern_gets_prefixed_grants_for_frames_and_dead_letters() -> None:
    settings = load_settings(flags={"frames_pattern": r"^cams\..*", "group": "g"}, env={})
    grants = [(g.resource, g.names, g.prefixed, g.operations) for g in required_acls(settings)]
    assert grants == [
        ("topic", ("cams.",), True, ("Read", "Describe")),
        ("group", ("g",), False, ("Read",)),
        (
            "topic",
            ("labels", "counts", "review", "events"),
            False,
            ("Write", "Describe", "DescribeConfigs", "Create"),
        ),
        (
            "topic",
            ("cams.",),
            True,
            ("Write", "Describe", "DescribeConfigs", "Create"),
        ),  # {topic}.dlq starts with it
    ]
    elsewhere = load_settings(flags={"frames_pattern": "cams-.*", "dlq_topic": "dead.{topic}"}, env={})
    dead = required_acls(elsewhere)[-1]
    assert (dead.names, dead.prefixed, dead.operations) == (
        ("dead.cams-",),
        True,
        ("Write", "Describe", "DescribeConfigs", "Create"),
    )
    assert not acl_commands(elsewhere, "User:x")[0].startswith("#")
    assert acl_commands(elsewhere, "User:x")[0].endswith("--resource-pattern-type prefixed")


def test_cli_prints_runnable_kafka_acls_commands_for_the_sasl_user() -> None:
    result = subprocess.run(
        [
            str(STREAM_WORKER),
            "acls",
            "--sasl-username",
            "lookout",
            "--frames-topic",
            "cams",
            "--bootstrap",
            "k:9094",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(commands) == 3
    for args in commands:
        assert args[:5] == [
            "kafka-acls.sh",
            "--bootstrap-server",
            "k:9094",
            "--command-config",
            "admin.properties",
        ]
        assert args[5:8] == ["--add", "--allow-principal", "User:lookout"]


@pytest.mark.parametrize("flags", [[], ["--ssl-certfile", "client.pem"]])
def test_cli_refuses_to_guess_a_principal(flags: list[str]) -> None:
    # Grants for User:ANONYMOUS, pasted as printed, would open the topics to everyone.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "LOOKOUT_"))}
    result = subprocess.run(
        [str(STREAM_WORKER), "acls", *flags], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--principal" in lines[0] and "Traceback" not in result.stderr


def test_cli_refuses_a_principal_without_its_type() -> None:
    result = subprocess.run(
        [str(STREAM_WORKER), "acls", "--principal", "lookout"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "stream-worker: --principal 'lookout' needs its type, e.g. User:lookout"
