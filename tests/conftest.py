"""Shared fixtures. Integration tiers start the real services through scripts/services.

A service that cannot start is a test error, never a skip.

The engines, calibration sets and frames the tests build go into the checkout's own scratch
cache, ``.state/test-cache``, never into the user's ``~/.cache/lookout`` (or their
``LOOKOUT_CACHE_DIR``): ``LOOKOUT_CACHE_DIR`` is set for the whole session, before lookout is
imported, so every worker, bench and CLI the tests start inherits it. ``scripts/services`` keeps
using the user's cache for the Kafka jars it fetches (:data:`TOOLS_CACHE`, passed to it explicitly).

Workers the tests start serve the fp32 default engine (``LOOKOUT_PRECISION=fp32``, set the same
way): ``auto`` would build the int8 engine and time both at every first start. The tests of
``auto`` and ``int8`` set the precision themselves.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "scripts" / "services"
TOOLS_CACHE = os.environ.get("LOOKOUT_CACHE_DIR") or str(Path.home() / ".cache" / "lookout")
TEST_CACHE = REPO / ".state" / "test-cache"
TEST_CACHE.mkdir(parents=True, exist_ok=True)
os.environ["LOOKOUT_CACHE_DIR"] = str(TEST_CACHE)
os.environ["LOOKOUT_PRECISION"] = "fp32"


def services_env(**extra: str) -> dict[str, str]:
    """The environment for ``scripts/services``: the user's cache for Kafka's jars."""
    return {**os.environ, "LOOKOUT_CACHE_DIR": TOOLS_CACHE, **extra}


@dataclass(frozen=True)
class Services:
    """Where the real Kafka broker and Redis server of this test session listen."""

    bootstrap: str
    redis_url: str


def _services_env() -> dict[str, str]:
    out = subprocess.run(
        [str(SERVICES), "env"], check=True, capture_output=True, text=True, env=services_env()
    ).stdout
    pairs = (line.removeprefix("export ").split("=", 1) for line in out.splitlines() if "=" in line)
    return {k: v for k, v in pairs}


@pytest.fixture(scope="session")
def services() -> Services:
    """Start (or reuse) the real Kafka and Redis; fail loudly when they cannot start."""
    result = subprocess.run(
        [str(SERVICES), "up"], capture_output=True, text=True, timeout=600, env=services_env()
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/services up failed:\n{result.stderr}", pytrace=False)
    env = _services_env()
    return Services(bootstrap=env["KAFKA_BOOTSTRAP"], redis_url=env["REDIS_URL"])


TopicFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def make_topic(services: Services) -> AsyncIterator[TopicFactory]:
    """Create uuid-named topics for one test; they are deleted afterwards."""
    admin = AIOKafkaAdminClient(bootstrap_servers=services.bootstrap)
    await admin.start()
    created: list[str] = []

    async def factory(prefix: str = "t", partitions: int = 1, config: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=config or {})])
        created.append(name)
        return name

    try:
        yield factory
    finally:
        if created:
            # Cleanup must not hide the test's own result.
            with contextlib.suppress(Exception):
                await admin.delete_topics(created)
        await admin.close()


@pytest.fixture
async def redis_client(services: Services) -> AsyncIterator[aioredis.Redis]:
    """A client of the real Redis server."""
    client = aioredis.from_url(services.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def key_prefix() -> Iterator[str]:
    """A fresh Redis key prefix per test, so tests never see each other's keys."""
    yield f"lookout-test-{uuid.uuid4().hex[:10]}"
