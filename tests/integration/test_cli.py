"""User mistakes end in one line that says what to do, exit code 2, no traceback.

Some of them need the real services up (to get past the checks before the one under test).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.conftest import REPO, Services

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
    assert_one_line(run("run", "--max-batch", "lots"), "max_batch", "'lots'")


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


def test_a_bad_log_level() -> None:
    assert_one_line(run("run", "--log-level", "LOUD"), "--log-level 'LOUD'", "DEBUG, INFO")


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
