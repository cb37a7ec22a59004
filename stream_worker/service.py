"""The shell around the worker: preflight checks, topics, engine, metrics server, counts queries.

Every check here turns a user mistake into one actionable line before any frame is consumed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from pathlib import Path
from typing import Any

from stream_worker.aio import unless_set
from stream_worker.backends.base import Backend
from stream_worker.backends.precision import serve_default
from stream_worker.backends.registry import default_engine_provider, open_backend
from stream_worker.backends.sidecar import read_sidecar
from stream_worker.errors import ConfigError, EngineError, LookoutError, ServiceUnavailable
from stream_worker.hints import start_hint
from stream_worker.kafka import check_kafka, ensure_topics, partitions_of
from stream_worker.observability import HealthServer, Metrics
from stream_worker.pipeline import inference_layout, usable_cores
from stream_worker.record_batches import tolerate_unreadable_header_names
from stream_worker.redis_client import check_redis, make_redis
from stream_worker.settings import Settings, frame_topic_config
from stream_worker.sinks.counts import CountsReader
from stream_worker.worker import Worker

log = logging.getLogger("lookout.service")


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
        t.events_topic: (partitions, {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}),
    }
    # Dead letters and review samples carry whole frames: a stock broker's 1 MiB would refuse them.
    carrying_frames = (1, frame_topic_config(settings))
    wanted = {name: keyed_like_frames.get(name, carrying_frames) for name in t.output_topics()}
    created = await ensure_topics(settings.kafka, wanted, replication=t.topic_replication)
    if created:
        log.info("created topics %s", ", ".join(created))


def check_engine(settings: Settings) -> Path | None:
    """The configured engine file (None: the default CPU engine); one line when it does not exist.

    With no engine named, one line too when no provider of the default engine is installed
    (for ``--precision int8``, of the int8 one). With one named, ``--precision fp32`` or ``int8``
    may only repeat what the engine file is: it picks the default engine and converts nothing.
    """
    e = settings.engine
    engine = Path(e.engine) if e.engine else None
    if engine is None:
        default_engine_provider("int8" if e.precision == "int8" else "fp32")
    elif not engine.exists():
        raise ConfigError(
            f"engine {engine} does not exist: build it with `engine-build build ... --out {engine}` "
            "or leave --engine empty for the default CPU engine"
        )
    elif e.precision != "auto":
        try:
            built = read_sidecar(engine).precision
        except EngineError:
            return engine  # opening it says what is wrong with it
        if built != e.precision:
            where = settings.where("engine", "precision")
            raise ConfigError(
                f"{where} is {e.precision}, but the engine file {engine} is {built}: {where} chooses "
                f"the default engine and converts no file; drop {where} (the file decides), or name "
                f"a {e.precision} engine (`engine-build build --precision {e.precision} ...`)"
            )
    return engine


class EngineOpener:
    """Opens the worker's engine sessions, one per call, all on the one engine.

    The engine is resolved on the first call (on an inference thread): the named file, or the
    default engine in ``--precision``, for ``auto`` chosen by ``stream_worker.backends.precision``
    (which may build the int8 engine and time both, then logs which is served and why). Later
    sessions open the same file without deciding again.
    """

    def __init__(self, settings: Settings) -> None:
        """Prepare to open the engine ``settings`` name."""
        self._settings = settings
        e = settings.engine
        # Threads per session as the pipeline lays the sessions out (an ONNX Runtime setting; a
        # TensorRT engine ignores it and gets one session).
        _, self._threads = inference_layout(
            e.inference_sessions, e.inference_threads, "onnxruntime", usable_cores()
        )
        self._lock = threading.Lock()
        self._engine: tuple[Path, str] | None = None

    def _resolve(self) -> tuple[Path, str]:
        settings = self._settings
        engine = check_engine(settings)
        if engine is not None:
            return engine, "named"
        served = serve_default(
            Path(settings.engine.cache_dir),
            settings.engine.precision,
            threads=self._threads,
            batch=settings.batch.max_batch,
        )
        return served.path, served.choice.reason

    def __call__(self) -> Backend:
        """Open one more session of the engine."""
        with self._lock:
            if self._engine is None:
                self._engine = self._resolve()
            path, reason = self._engine
        return open_backend(
            path, threads=self._threads, cache_dir=Path(self._settings.engine.cache_dir), reason=reason
        )


def backend_factory(settings: Settings) -> Backend:
    """Open the configured engine (default: the CPU engine, built on first use) in one session."""
    return EngineOpener(settings)()


async def run_worker(settings: Settings, stop: asyncio.Event, *, create_topics: bool = True) -> int:
    """Preflight, then run one worker until ``stop``; returns the exit code.

    A stop during the preflight (a slow or unanswering broker) ends it at once: nothing has been
    consumed yet, so that is a clean stop, not a failure.
    """
    check_engine(settings)
    tolerate_unreadable_header_names()  # one line now if aiokafka's internals moved under it
    if not await unless_set(stop, _preflight(settings, create_topics=create_topics)):
        log.info("stopped during start-up")
        return 0
    metrics = Metrics.from_settings(settings)
    worker = Worker(
        settings,
        backend_factory=EngineOpener(settings),
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
    freeze = asyncio.create_task(freeze_when_started(worker.started))
    try:
        await worker.run(stop)
    finally:
        freeze.cancel()
        await server.stop()
    log.info("worker stopped")
    return 0


async def freeze_when_started(started: asyncio.Event) -> None:
    """Once the worker has started, take what start-up built out of the garbage collector's sight.

    Modules, the engine's sessions and the settings live as long as the process; every full
    collection used to walk them all again, and stopped the event loop for 25-46 ms at a time
    under load (the bench's trace, AMD EPYC, 2026-12-03). Frozen (``gc.freeze``), a full
    collection walks only what frames allocate: 2-9 ms in the same test. One collection first,
    so that start-up's garbage is freed rather than kept; it runs once, right after start-up.
    A start-up object that becomes part of an unreachable cycle later is never freed: a bounded,
    one-off cost (the 5-minute soak's RSS grew 0.04 %). ``stream-worker demo`` runs the worker in
    its own process, so its objects are frozen too.
    """
    await started.wait()
    gc.collect()
    gc.freeze()


async def _preflight(settings: Settings, *, create_topics: bool) -> None:
    await check_kafka(settings.kafka)
    await check_redis(settings)
    await check_frames_topics(settings)
    if create_topics:
        await prepare_topics(settings)


async def read_counts(settings: Settings, source_id: str, window: str) -> dict[str, Any]:
    """The counts of one source as plain data (the ``counts --json`` format)."""
    client = make_redis(settings.redis)
    try:
        counts = CountsReader(client, key_prefix=settings.redis.key_prefix)
        try:
            windows = await counts.read(source_id, window)
        except ServiceUnavailable as exc:
            raise ConfigError(
                f"cannot read counts ({str(exc).rstrip('.')}): "
                + start_hint("Redis", "--redis-url / REDIS_URL")
            ) from exc
        except LookoutError as exc:
            raise ConfigError(f"cannot read counts: {exc}") from exc
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
