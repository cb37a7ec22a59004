"""User mistakes end in one line that says what to do, exit code 2, no traceback.

Some of them need the real services up (to get past the checks before the one under test).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from engine_build.default import ensure_default_engine
from tests.conftest import REPO, TEST_CACHE, Services

pytestmark = pytest.mark.usefixtures("services")

CLI = [sys.executable, "-m", "stream_worker.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def assert_one_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_bad_flag() -> None:
    assert_one_line(run("run", "--max-bach", "8"), "unrecognized arguments: --max-bach", "--help")


def test_a_bad_flag_value() -> None:
    assert_one_line(run("run", "--max-batch", "lots"), "--max-batch must be a whole number", "'lots'")


def test_an_unreachable_redis() -> None:
    port = closed_port()
    assert_one_line(
        run("run", "--redis-url", f"redis://127.0.0.1:{port}/0"), "cannot reach Redis", "REDIS_URL"
    )


def test_an_unreachable_broker(services: Services) -> None:
    port = closed_port()
    result = run("run", "--bootstrap", f"127.0.0.1:{port}", "--redis-url", services.redis_url)
    assert_one_line(result, f"127.0.0.1:{port}", "--bootstrap")


def test_a_missing_engine(tmp_path: Path, services: Services) -> None:
    missing = tmp_path / "nope.plan"
    assert_one_line(
        run("run", "--engine", str(missing), "--redis-url", services.redis_url),
        str(missing),
        "engine-build build",
    )


def test_a_precision_that_contradicts_the_named_engine_file(services: Services) -> None:
    engine = ensure_default_engine(TEST_CACHE)  # an fp32 engine
    assert_one_line(
        run("run", "--engine", str(engine), "--precision", "int8", "--redis-url", services.redis_url),
        f"--precision is int8, but the engine file {engine} is fp32",
        "drop --precision (the file decides)",
    )
    assert_one_line(
        run("run", "--precision", "int4"), "--precision must be one of auto, fp32, int8, not 'int4'"
    )


def test_a_bad_log_level() -> None:
    assert_one_line(run("run", "--log-level", "LOUD"), "--log-level must be one of DEBUG, INFO", "'LOUD'")


def test_config_hides_the_test_only_fault_settings() -> None:
    result = run("config", "--json")
    assert result.returncode == 0, result.stderr
    assert "faults" not in result.stdout and "fault_kill_at" not in result.stdout


def test_config_prints_effective_settings() -> None:
    result = run("config", "--max-batch", "4", "--max-in-flight", "8", "--json")
    assert result.returncode == 0, result.stderr
    assert '"max_batch": 4' in result.stdout


def run_on_missing_topic(services: Services) -> subprocess.CompletedProcess[str]:
    """``run`` against the real services, for a frames topic that does not exist."""
    return run(
        "run", "--bootstrap", services.bootstrap, "--redis-url", services.redis_url,
        "--frames-topic", "no-such-topic-4f1c",
    )  # fmt: skip


def test_a_missing_frames_topic(services: Services) -> None:
    assert_one_line(run_on_missing_topic(services), "'no-such-topic-4f1c' does not exist", "--frames-topic")


def test_a_redis_that_may_evict_watermarks_is_refused(services: Services) -> None:
    # volatile-* policies evict exactly the count keys (they have a TTL), allkeys-* the
    # watermarks too: either silently breaks exactly-once counting.
    client = redis.Redis.from_url(services.redis_url)
    before = client.config_get("maxmemory-policy")["maxmemory-policy"]
    client.config_set("maxmemory-policy", "volatile-lru")
    try:
        result = run_on_missing_topic(services)
    finally:
        client.config_set("maxmemory-policy", before)
        client.close()
    assert_one_line(result, "maxmemory-policy volatile-lru", "noeviction")


# --- validation before any connection (issue #17) ---------------------------------------------


@pytest.mark.parametrize(
    ("flag", "bad", "expected"),
    [
        ("--windows", "5x", "durations like 30s, 1m, 15m, 1h or 1d, comma separated"),
        ("--rollup-threshold", "5", "a number from 0 to 1"),
        ("--top-k", "-3", "a whole number, 0 or more"),
        ("--event-gap-s", "-1", "a number of seconds above 0"),
    ],
)
def test_config_refuses_each_bad_value_naming_its_flag_and_the_expected_format(
    flag: str, bad: str, expected: str
) -> None:
    # `config` is the lint step of CI and of an init container: exit 2 on what `run` would refuse.
    assert_one_line(run("config", flag, bad), f"{flag} must be {expected}, not {bad!r}")


def test_config_names_the_env_variable_or_yaml_key_a_bad_value_came_from(tmp_path: Path) -> None:
    env = {**os.environ, "LOOKOUT_WINDOWS": "1m,5x"}
    assert_one_line(run("config", env=env), "LOOKOUT_WINDOWS must be durations like", "'1m,5x'", "'5x'")
    settings_file = tmp_path / "lookout.yaml"
    settings_file.write_text("counts:\n  windows: [1m, 5x]\n")
    assert_one_line(
        run("config", "--config", str(settings_file)), f"counts.windows in {settings_file} must be durations"
    )


def test_config_reports_every_bad_value_of_the_issue_at_once() -> None:
    result = run(
        "config", "--windows", "5x", "--rollup-threshold", "5", "--top-k", "-3", "--event-gap-s", "-1"
    )
    assert_one_line(
        result, "4 settings are wrong", "--windows", "--rollup-threshold", "--top-k", "--event-gap-s"
    )


def test_config_refuses_a_misspelt_label_in_the_thresholds() -> None:
    env = {**os.environ, "LOOKOUT_LABEL_THRESHOLDS": "carr=0.2"}
    assert_one_line(run("config", env=env), "LOOKOUT_LABEL_THRESHOLDS names 'carr'", "did you mean 'car'?")


def test_label_thresholds_in_another_format_get_the_expected_format() -> None:
    env = {**os.environ, "LOOKOUT_LABEL_THRESHOLDS": "car:0.5"}
    assert_one_line(run("config", env=env), "LOOKOUT_LABEL_THRESHOLDS must be label=score pairs", "car=0.5")


def test_run_refuses_a_bad_window_before_it_connects_to_anything() -> None:
    # Both services unreachable: any connection attempt would end in "cannot reach ...".
    started = time.monotonic()
    result = run(
        "run", "--windows", "5x",
        "--bootstrap", f"127.0.0.1:{closed_port()}", "--redis-url", f"redis://127.0.0.1:{closed_port()}/0",
    )  # fmt: skip
    assert_one_line(result, "--windows must be durations like 30s")
    assert "cannot reach" not in result.stderr
    assert time.monotonic() - started < 20


def help_text(command: str) -> str:
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())


def test_run_help_lists_the_env_only_settings_and_no_dashboard_flags() -> None:
    text = help_text("run")
    for env in (
        "LOOKOUT_SESSION_TIMEOUT_MS",
        "LOOKOUT_MAX_POLL_INTERVAL_MS",
        "LOOKOUT_METADATA_MAX_AGE_MS",
        "LOOKOUT_LABEL_THRESHOLDS",
    ):
        assert env in text, env
    for dashboard_flag in ("--port", "--host", "--token-file", "LOOKOUT_DASHBOARD"):
        assert dashboard_flag not in text, dashboard_flag
    assert "LOOKOUT_FAULT" not in text and "LOOKOUT_FAULT" not in help_text("config")


def test_each_command_help_lists_the_settings_it_uses_with_their_env() -> None:
    run_help = help_text("run")
    assert "--precision" in run_help and "env LOOKOUT_PRECISION; default auto" in run_help
    verify = help_text("verify")
    assert "--redis-url" in verify and "env REDIS_URL" in verify and "--windows" in verify
    assert "--max-batch" not in verify and "--group" not in verify
    dashboard = help_text("dashboard")
    assert "--token-file" in dashboard and "env LOOKOUT_DASHBOARD_TOKEN_FILE" in dashboard
    assert "--bootstrap" not in dashboard  # the dashboard reads Redis only
    counts = help_text("counts")
    assert "--key-prefix" in counts and "--bootstrap" not in counts


def test_verify_with_kafka_unreachable_says_so_in_one_line() -> None:
    result = run("verify", "--bootstrap", f"127.0.0.1:{closed_port()}")
    assert_one_line(result, "cannot reach Kafka", "--bootstrap / KAFKA_BOOTSTRAP")
    assert "aiokafka" not in result.stderr and "Unclosed" not in result.stderr


def test_replay_with_kafka_unreachable_says_so_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "frame.png"
    image.write_bytes(tiny_png())
    result = run("replay", str(image), "--no-progress", "--bootstrap", f"127.0.0.1:{closed_port()}")
    assert_one_line(result, "cannot reach Kafka", "--bootstrap / KAFKA_BOOTSTRAP")
    assert "aiokafka" not in result.stderr and "Unclosed" not in result.stderr


def test_outside_a_source_checkout_hints_do_not_mention_scripts_services(tmp_path: Path) -> None:
    # lookout as a container or a wheel has it: the package without the repository around it.
    installed = tmp_path / "site"
    shutil.copytree(REPO / "stream_worker", installed / "stream_worker")
    env = {**os.environ, "PYTHONPATH": str(installed)}
    port = closed_port()
    inside = run("verify", "--bootstrap", f"127.0.0.1:{port}")
    outside = subprocess.run(
        [*CLI, "verify", "--bootstrap", f"127.0.0.1:{port}"],
        cwd=installed, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert "scripts/services up" in inside.stderr
    assert_one_line(outside, "cannot reach Kafka", "--bootstrap / KAFKA_BOOTSTRAP")
    assert "scripts/services" not in outside.stderr


def tiny_png() -> bytes:
    """A 1x1 PNG, written by hand so the test needs no image library."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0\0\0\0"))
        + chunk(b"IEND", b"")
    )
