"""A SIGTERM at any moment of a worker's life is a clean stop: exit 0, no traceback.

Supervisors stop workers whenever they like: while Python is still importing, while the preflight
waits for a broker that does not answer, and while the worker runs (the fault tier covers that).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import REPO, Services

WORKER_BIN = REPO / ".venv" / "bin" / "stream-worker"


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (Linux: the SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@contextlib.asynccontextmanager
async def silent_broker() -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A TCP port that accepts connections and never answers (a hung broker); set on first connect."""
    connected = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        connected.set()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], connected
    finally:
        for writer in held:
            writer.close()
        server.close()


def start_worker(port: int, services: Services) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(WORKER_BIN), "run", "--bootstrap", f"127.0.0.1:{port}", "--redis-url", services.redis_url],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def wait_until(condition: object, timeout_s: float, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the worker never got there"
        await asyncio.sleep(0.005)


async def test_sigterm_as_soon_as_the_worker_can_catch_it_exits_0(services: Services) -> None:
    async with silent_broker() as (port, _):
        proc = start_worker(port, services)
        await wait_until(lambda: catches_sigterm(proc.pid), 30, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr


@pytest.mark.timeout(60)
async def test_sigterm_while_the_preflight_waits_for_a_broker_exits_0_at_once(services: Services) -> None:
    async with silent_broker() as (port, connected):
        proc = start_worker(port, services)
        await wait_until(connected.is_set, 30, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=30)
    # Before, the stop waited for the preflight's 10 s timeout and then failed "cannot reach Kafka".
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
