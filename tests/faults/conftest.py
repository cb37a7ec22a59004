"""Fault-tier fixtures: a test's harness, and a broker or Redis of its own.

Every fault test follows one script: produce a seeded mix of real frames from traffic cameras
and camera traps to a multi-partition topic (``tests.support.feeds``), run ``stream-worker run``
as a child process (``tests.support.workers``), inject the fault while frames flow, wait until
every frame has come out, labelled or dead-lettered (``tests.support.outputs``), stop the workers
cleanly and run :func:`stream_worker.verify.verify` over everything that went in and came out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bench.host import free_port
from tests.conftest import Services
from tests.support.services import PrivateServices
from tests.support.workers import Harness


@pytest.fixture
def private_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, PrivateServices]]:
    """A second Kafka broker with its own ports and state dir (the fault kills it)."""
    port, controller = free_port(), free_port()
    svc = PrivateServices(
        {
            "LOOKOUT_KAFKA_PORT": str(port),
            "LOOKOUT_KAFKA_CONTROLLER_PORT": str(controller),
            "LOOKOUT_STATE_DIR": str(tmp_path_factory.mktemp("kafka-state")),
            "LOOKOUT_KAFKA_HEAP": "512m",
        }
    )
    svc.run("up", "kafka")
    try:
        yield f"127.0.0.1:{port}", svc
    finally:
        svc.run("kill", "kafka")


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, PrivateServices]]:
    """A second Redis with its own port and state dir (the fault stops it)."""
    port = free_port()
    svc = PrivateServices(
        {"LOOKOUT_REDIS_PORT": str(port), "LOOKOUT_STATE_DIR": str(tmp_path_factory.mktemp("redis-state"))}
    )
    svc.run("up", "redis")
    try:
        yield f"redis://127.0.0.1:{port}/0", svc
    finally:
        svc.run("kill", "redis")


@pytest.fixture
async def harness(services: Services, key_prefix: str, tmp_path: Path) -> AsyncIterator[Harness]:
    """One test's pipelines and workers; every worker left running is killed afterwards."""
    h = Harness(services, key_prefix, tmp_path)
    try:
        yield h
    finally:
        await h.close()
