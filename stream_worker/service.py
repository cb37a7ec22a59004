"""The shell around the worker: preflight checks, topics, engine, metrics server, counts queries.

Every check here turns a user mistake into one actionable line before any frame is consumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors

from stream_worker.backends.base import Backend, open_backend
from stream_worker.errors import ConfigError, LookoutError
from stream_worker.kafka import check_kafka, ensure_topics, partitions_of, speaks_tls
from stream_worker.observability import HealthServer, Metrics
from stream_worker.settings import Settings, redact_url
from stream_worker.sinks.counts import RedisCounts, make_redis
from stream_worker.taxonomy import Taxonomy
from stream_worker.worker import Worker

log = logging.getLogger("lookout.service")


async def check_redis(settings: Settings) -> None:
    """One-line error when Redis cannot be reached, refuses us, or forbids lookout's key prefix."""
    r = settings.redis
    where = f"Redis at {redact_url(r.redis_url).split('://', 1)[-1]}"
    client = make_redis(r)
    try:
        await client.ping()
        # An ACL user limited to other keys would pass PING and fail on the first batch; a read
        # under the prefix (GET of a key lookout never writes) asks the ACL now.
        await client.get(f"{r.key_prefix}:preflight")
    except redis_errors.AuthenticationError as exc:
        if not r.redis_password_file:
            raise ConfigError(
                f"{where} requires a login ({exc}): set REDIS_USERNAME and REDIS_PASSWORD_FILE "
                "(--redis-username, --redis-password-file)"
            ) from exc
        raise ConfigError(
            f"{where} refused user {r.redis_username or 'default'!r} ({exc}): check REDIS_USERNAME and "
            f"the password in {r.redis_password_file}"
        ) from exc
    except redis_errors.NoPermissionError as exc:
        raise ConfigError(
            f"{where}: user {r.redis_username or 'default'!r} may not use keys under '{r.key_prefix}:' "
            f"({exc}): set --key-prefix / LOOKOUT_KEY_PREFIX to the prefix its ACL allows, or widen the ACL"
        ) from exc
    except redis_errors.RedisError as exc:
        raise await _redis_connection_problem(settings, where, exc) from exc
    finally:
        await client.aclose()


async def _redis_connection_problem(settings: Settings, where: str, exc: BaseException) -> ConfigError:
    """Name the TLS mistake behind a failed Redis connection, or say it is unreachable."""
    r = settings.redis
    text = " ".join(str(exc).split())
    if "CERTIFICATE_VERIFY_FAILED" in text:
        reason = text.split("certificate verify failed:", 1)[-1].split("(_ssl", 1)[0].strip(" .")
        return ConfigError(
            f"{where}: the server's TLS certificate is not trusted ({reason}): set --redis-ca-file / "
            f"REDIS_CA_FILE to the CA that signed it (now {r.redis_ca_file or 'the system CAs'})"
        )
    if r.redis_url.startswith("redis://") and "refused" not in text.lower():
        host, port = _url_address(r.redis_url)
        if port and await speaks_tls(host, port, 5.0):
            return ConfigError(
                f"{where} expects TLS but --redis-url is redis://: use rediss:// and set --redis-ca-file"
            )
    return ConfigError(
        f"cannot reach {where} ({exc.__class__.__name__}): "
        "start it (scripts/services up) or fix --redis-url / REDIS_URL"
    )


def _url_address(url: str) -> tuple[str, int]:
    """Host and port of a redis:// URL (0 when the URL names no port)."""
    hostport = url.split("://", 1)[-1].rpartition("@")[2].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    return (host.strip("[]"), int(port)) if port.isdigit() else (hostport, 0)


async def check_frames_topics(settings: Settings) -> None:
    """One line when a named frames topic does not exist (a pattern may match topics made later)."""
    if settings.topics.frames_pattern:
        return
    for topic in settings.topics.frames_topic:
        if not await partitions_of(settings.kafka, topic):
            raise ConfigError(
                f"frames topic {topic!r} does not exist on {settings.kafka.bootstrap}: create it "
                "(one partition per worker you may run) or fix --frames-topic / LOOKOUT_FRAMES_TOPIC"
            )


async def prepare_topics(settings: Settings) -> None:
    """Create missing output topics: labels, compacted counts, dead letters, review."""
    t = settings.topics
    partitions = 1
    for topic in t.frames_topic:
        partitions = max(partitions, await partitions_of(settings.kafka, topic))
    keyed_like_frames: dict[str, tuple[int, dict[str, str]]] = {
        t.labels_topic: (partitions, {}),
        t.counts_topic: (partitions, {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}),
    }
    wanted = {name: keyed_like_frames.get(name, (1, {})) for name in t.output_topics()}
    created = await ensure_topics(settings.kafka, wanted, replication=t.topic_replication)
    if created:
        log.info("created topics %s", ", ".join(created))


def check_engine(settings: Settings) -> Path | None:
    """The configured engine file (None: the default CPU engine); one line when it does not exist."""
    e = settings.engine
    engine = Path(e.engine) if e.engine else None
    if engine is not None and not engine.exists():
        raise ConfigError(
            f"engine {engine} does not exist: build it with `engine-build build ... --out {engine}` "
            "or leave --engine empty for the default CPU engine"
        )
    return engine


def backend_factory(settings: Settings) -> Backend:
    """Open the configured engine (default: the CPU engine, built on first use)."""
    e = settings.engine
    engine = check_engine(settings)
    return open_backend(engine, threads=e.inference_threads or None, cache_dir=Path(e.cache_dir))


async def run_worker(settings: Settings, stop: asyncio.Event, *, create_topics: bool = True) -> int:
    """Preflight, then run one worker until ``stop``; returns the exit code.

    A stop during the preflight (a slow or unanswering broker) ends it at once: nothing has been
    consumed yet, so that is a clean stop, not a failure.
    """
    check_engine(settings)
    if not await _unless_stopped(stop, _preflight(settings, create_topics=create_topics)):
        log.info("stopped during start-up")
        return 0
    metrics = Metrics()
    worker = Worker(
        settings,
        backend_factory=lambda: backend_factory(settings),
        taxonomy=Taxonomy.load(),
        metrics=metrics,
        create_topics=create_topics,
    )
    server = HealthServer(metrics, ready=worker.ready, live=worker.live)
    if settings.ops.metrics_port:
        try:
            port = await server.start(settings.ops.metrics_host, settings.ops.metrics_port)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {settings.ops.metrics_host}:{settings.ops.metrics_port} "
                f"({exc.strerror}): set --metrics-port to a free port, or 0 to turn it off"
            ) from exc
        log.info("metrics on http://%s:%d/metrics", settings.ops.metrics_host, port)
    try:
        await worker.run(stop)
    finally:
        await server.stop()
    log.info("worker stopped")
    return 0


async def _preflight(settings: Settings, *, create_topics: bool) -> None:
    await check_kafka(settings.kafka)
    await check_redis(settings)
    await check_frames_topics(settings)
    if create_topics:
        await prepare_topics(settings)


async def _unless_stopped(stop: asyncio.Event, step: Awaitable[None]) -> bool:
    """Run ``step`` unless ``stop`` is set first (then cancel it); whether it finished."""
    task = asyncio.ensure_future(step)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    task.result()
    return True


async def read_counts(settings: Settings, source_id: str, window: str) -> dict[str, Any]:
    """The counts of one source as plain data (the ``counts --json`` format)."""
    client = make_redis(settings.redis)
    try:
        counts = RedisCounts(
            client, key_prefix=settings.redis.key_prefix, ttl_s=settings.redis.counts_ttl_s, event_gap_ms=0
        )
        try:
            windows = await counts.read(source_id, window)
        except LookoutError as exc:
            raise ConfigError(
                f"cannot read counts: {exc}; is Redis up (scripts/services up) and --redis-url right?"
            ) from exc
    finally:
        await client.aclose()
    total: dict[str, int] = {}
    events_total: dict[str, int] = {}
    for w in windows:
        for label, n in w.labels.items():
            total[label] = total.get(label, 0) + n
        for label, n in w.events.items():
            events_total[label] = events_total.get(label, 0) + n
    return {
        "source_id": source_id,
        "window": window,
        "windows": [
            {"start": w.start_ms, "frames": w.frames, "counts": w.labels, "events": w.events} for w in windows
        ],
        "total": total,
        "events_total": events_total,
        "frames_total": sum(w.frames for w in windows),
    }
