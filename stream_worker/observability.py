"""Prometheus metrics, /healthz and /readyz, and structured logging.

The HTTP server is a few lines of asyncio on the worker's own loop, so a blocked loop shows up
as a failing liveness probe, which is exactly what an operator wants to know. Rendering
``/metrics`` is CPU work proportional to the number of series, so it runs on a thread of its
own, never on the loop that polls Kafka and sends the group heartbeats.

Every metric, its labels and what to watch are in docs/METRICS.md (a unit test keeps that table
and this registry equal).

Per-source series (the drift gauges) are capped: the first ``max_sources`` sources get their
own ``source`` label; a source beyond the cap is reported as :data:`OVERFLOW_SOURCE` (the
latest such source's values) until a source idle for ``source_idle_s`` is forgotten, its
series removed, and its place given to the next new source.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from stream_worker.sources import RecentSources, SourceLimits
from stream_worker.threads import named_pool

if TYPE_CHECKING:
    from stream_worker.backends.base import EngineInfo
    from stream_worker.pipeline import Batch
    from stream_worker.settings import Settings
    from stream_worker.stages import StageClock

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
OVERFLOW_SOURCE = "_other"
"""The ``source`` label of sources beyond the cap (a source id never starts with ``_``)."""


def _monotonic_ms() -> float:
    return time.monotonic() * 1000


class Metrics:
    """Every metric the worker exports; one instance per worker, on its own registry."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        max_sources: int = 1_000,
        source_idle_s: float = 86_400.0,
        clock_ms: Callable[[], float] = _monotonic_ms,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        # Per source with its own series: the labels of its label-share series (to remove them).
        self._sources: RecentSources[set[str]] = RecentSources(
            SourceLimits(max_sources, source_idle_s * 1000)
        )
        self._overflow_labels: set[str] = set()
        self._overflow_seen_ms: float | None = None
        self._clock_ms = clock_ms
        # Partitions with a lag series, so that those no longer assigned can be removed.
        self._lag_partitions: set[tuple[str, int]] = set()
        r = self.registry
        self.frames_in = Counter("lookout_frames_in", "Frames consumed", ["topic"], registry=r)
        self.frames_out = Counter(
            "lookout_frames_labelled", "Frames labelled and published", ["topic"], registry=r
        )
        self.frames_dead = Counter(
            "lookout_frames_dead_lettered",
            "Frames sent to the dead-letter topic",
            ["stage", "reason"],
            registry=r,
        )
        self.frames_review = Counter("lookout_frames_review", "Frames sampled for review", registry=r)
        self.batch_size = Histogram(
            "lookout_batch_size", "Frames per inference batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.decode_seconds = Histogram(
            "lookout_decode_seconds",
            "Decode + preprocess time of a batch",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "lookout_inference_seconds", "Inference time of a batch", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.sink_seconds = Histogram(
            "lookout_sink_seconds",
            "Publish + count + commit time of a batch",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.e2e_seconds = Histogram(
            "lookout_end_to_end_seconds",
            "captured-at to label published",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge(
            "lookout_frames_in_flight", "Frames consumed but not yet committed", registry=r
        )
        self.in_flight_bytes = Gauge(
            "lookout_frame_bytes_in_flight", "Bytes of the frames consumed but not yet committed", registry=r
        )
        self.lag = Gauge(
            "lookout_consumer_lag",
            "Records behind the partition's high watermark",
            ["topic", "partition"],
            registry=r,
        )
        self.pauses = Counter(
            "lookout_partition_pauses",
            "Times the worker paused its partitions for back-pressure",
            registry=r,
        )
        self.stage_seconds = Histogram(
            "lookout_stage_seconds",
            "Time a batch spent in each stage of the worker (see stream_worker/stages.py)",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.paused = Gauge(
            "lookout_partitions_paused", "1 while partitions are paused for back-pressure", registry=r
        )
        self.ready = Gauge(
            "lookout_ready",
            "1 while /readyz would answer 200, sampled at each scrape of /metrics",
            registry=r,
        )
        self.retries = Counter("lookout_sink_retries", "Retries of a failed sink write", ["sink"], registry=r)
        self.low_confidence_share = Gauge(
            "lookout_drift_low_confidence_share",
            "Share of low-confidence frames in the sliding window",
            ["source"],
            registry=r,
        )
        self.label_share = Gauge(
            "lookout_drift_label_share",
            "Share of each label in the sliding window",
            ["source", "label"],
            registry=r,
        )
        self.engine_info = Gauge(
            "lookout_engine_info",
            "1 for the engine being served: its backend, precision, model and why it was chosen",
            ["backend", "precision", "model", "reason"],
            registry=r,
        )
        self.counts_skipped = Counter(
            "lookout_counts_replayed_frames",
            "Frames the Redis watermark recognised as already counted",
            registry=r,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Metrics:
        """The worker's metrics: per-source series capped by ``--max-metric-sources``."""
        return cls(max_sources=settings.ops.max_metric_sources, source_idle_s=settings.counts.source_idle_s)

    def serving(self, info: EngineInfo) -> None:
        """The engine is open: ``lookout_engine_info`` says which, and why (its ``reason``)."""
        self.engine_info.clear()
        model = f"{info.model_name}:{info.model_version}" if info.model_version else info.model_name
        self.engine_info.labels(info.backend, info.precision, model, info.reason or "unknown").set(1)

    # One call per event of a batch's life: the pipeline, the sinks and the worker report
    # through these, never frame by frame.

    def consumed(self, topic: str, records: int) -> None:
        """Records fetched from a frames topic."""
        self.frames_in.labels(topic).inc(records)

    def decoded(self, seconds: float) -> None:
        """A batch's decodes finished (waited for from the batch's close)."""
        self.decode_seconds.observe(seconds)

    def classified(self, seconds: float, frames: int) -> None:
        """One inference call (engine and taxonomy) over ``frames`` decoded frames."""
        self.inference_seconds.observe(seconds)
        self.batch_size.observe(frames)

    def published(self, batch: Batch, *, review: int) -> None:
        """A batch's labels, review samples and dead letters are on their topics."""
        by_topic: dict[str, int] = {}
        for p in batch.predictions:
            by_topic[p.frame.topic] = by_topic.get(p.frame.topic, 0) + 1
        for topic, n in by_topic.items():
            self.frames_out.labels(topic).inc(n)
        for d in batch.dead:
            self.frames_dead.labels(d.error.stage, d.error.reason).inc()
        if review:
            self.frames_review.inc(review)
        if batch.drift:
            self._drift(batch)

    def _drift(self, batch: Batch) -> None:
        """Remove the series of sources idle for ``source_idle_s`` (making room), then set the
        drift gauges of the batch's sources.

        A label that left a source's window is removed rather than left at its last share.
        """
        now_ms = self._clock_ms()
        forgotten = self._sources.forget(now_ms)
        idle_ms = self._sources.limits.idle_ms
        if self._overflow_seen_ms is not None and now_ms - self._overflow_seen_ms >= idle_ms:
            forgotten.append((OVERFLOW_SOURCE, self._overflow_labels))
            self._overflow_seen_ms, self._overflow_labels = None, set()
        for source, labels in forgotten:
            self.low_confidence_share.remove(source)
            for label in labels:
                self.label_share.remove(source, label)
        for source, snapshot in batch.drift.items():
            shown = self._sources.admit(source, now_ms, set)
            if shown is None:
                self._overflow_seen_ms = now_ms
            name = source if shown is not None else OVERFLOW_SOURCE
            labels = shown if shown is not None else self._overflow_labels
            self.low_confidence_share.labels(name).set(snapshot.low_confidence_share)
            for label, share in snapshot.label_share.items():
                self.label_share.labels(name, label).set(share)
            for label in labels - snapshot.label_share.keys():
                self.label_share.remove(name, label)
            labels.clear()
            labels.update(snapshot.label_share)

    @property
    def sources_with_series(self) -> int:
        """How many sources have series of their own (at most ``max_sources``)."""
        return len(self._sources)

    def delivered(self, batch: Batch, *, sink_seconds: float, now_ms: int) -> None:
        """Every sink has the batch and its offsets are committed."""
        self.sink_seconds.observe(sink_seconds)
        for p in batch.predictions:
            self.e2e_seconds.observe(max(0.0, (now_ms - p.frame.captured_at_ms) / 1000))

    def staged(self, clock: StageClock) -> None:
        """A committed batch's time in each stage of the worker."""
        for stage, seconds in clock.stages():
            self.stage_seconds.labels(stage).observe(seconds)

    def backpressure(self, *, in_flight: int, in_flight_bytes: int, paused: bool | None = None) -> None:
        """Frames and bytes in flight, and whether the partitions are paused (when the caller knows)."""
        self.in_flight.set(in_flight)
        self.in_flight_bytes.set(in_flight_bytes)
        if paused is not None:
            self.paused.set(int(paused))

    def consumer_lag(
        self, lags: Mapping[tuple[str, int], int], *, assigned: Collection[tuple[str, int]]
    ) -> None:
        """Set each (topic, partition)'s lag; remove the series of partitions no longer ``assigned``.

        A partition that moved to another worker would otherwise keep its last lag here for
        as long as this worker lives, and a sum over workers would count it twice.
        """
        for topic, partition in self._lag_partitions - set(assigned):
            self.lag.remove(topic, str(partition))
        self._lag_partitions.intersection_update(assigned)
        for (topic, partition), lag in lags.items():
            self.lag.labels(topic, str(partition)).set(lag)
            self._lag_partitions.add((topic, partition))

    def readiness(self, ready: bool) -> None:
        """What /readyz would answer now (sampled when /metrics is scraped, so alerts can see it)."""
        self.ready.set(int(ready))

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


class HealthServer:
    """Serves /metrics, /healthz and /readyz on the worker's event loop.

    The probes answer on the loop (a blocked loop must fail them); ``/metrics`` is rendered on
    one thread of its own, so a scrape never stalls polling and heartbeats, and concurrent
    scrapes queue there instead of taking more cores.
    """

    def __init__(
        self, metrics: Metrics, ready: Callable[[], tuple[bool, str]], live: Callable[[], tuple[bool, str]]
    ):
        self._metrics = metrics
        self._ready = ready
        self._live = live
        self._server: asyncio.Server | None = None
        self._render_pool = named_pool(1, "lk-metrics")

    async def start(self, host: str, port: int) -> int:
        """Start listening; returns the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._handle, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._render_pool.shutdown(wait=False, cancel_futures=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else "/"
            if path == "/metrics":
                # Readiness is sampled here, on the loop like /readyz itself: it changes with the
                # clock (no poll for 30 s), not only on events the worker could report.
                self._metrics.readiness(self._ready()[0])
                loop = asyncio.get_running_loop()
                body = await loop.run_in_executor(self._render_pool, self._metrics.render)
                status, ctype = 200, CONTENT_TYPE_LATEST
            elif path in ("/healthz", "/readyz"):
                ok, why = (self._live if path == "/healthz" else self._ready)()
                status, ctype, body = (200 if ok else 503), "text/plain", (why + "\n").encode()
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any ``extra=`` fields kept."""

    RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as JSON."""
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self.RESERVED:
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


# aiokafka messages shown below the level aiokafka logs them at: (logger, message template) ->
# the level. Each either ends in an exception lookout reports itself in one line, or is a retry
# that a healthy start-up goes through; everything else aiokafka logs keeps its level.
_KAFKA_CLIENT_DEMOTED: dict[tuple[str, str], int] = {
    # A client's bootstrap: when no server answers, start() raises and lookout says "cannot
    # reach Kafka at ..." (when one of several does not answer, another one did).
    ("aiokafka", 'Unable connect to "%s:%s": %s'): logging.DEBUG,
    ("aiokafka", 'Unable to request metadata from "%s:%s": %s'): logging.DEBUG,
    # Coordinator discovery, which aiokafka retries: a fresh broker answers "not available" at
    # every first start, until it has created __consumer_offsets; a moved coordinator is found again.
    (
        "aiokafka.consumer.group_coordinator",
        "Marking the coordinator dead (node %s)for group %s.",
    ): logging.INFO,
}
_COORDINATOR_LOOKUP = ("aiokafka.consumer.group_coordinator", "Group Coordinator Request failed: %s")
# COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR: retried until found.
_RETRIED_COORDINATOR_ERRORS = frozenset({14, 15, 16})


class KafkaClientNoise(logging.Filter):
    """Shows aiokafka's known start-up retries and bootstrap failures below ERROR (see above).

    Installed on the aiokafka loggers that emit them, so it applies whatever handler prints the
    records; a demoted record is printed only when the configured level lets it through.
    """

    def __init__(self, level: int) -> None:
        super().__init__()
        self._level = level

    def filter(self, record: logging.LogRecord) -> bool:
        """Lower the record's level when it is a known transient message; keep it if still shown."""
        key = (record.name, str(record.msg))
        demoted = _KAFKA_CLIENT_DEMOTED.get(key)
        if key == _COORDINATOR_LOOKUP and record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            if getattr(args[0], "errno", None) in _RETRIED_COORDINATOR_ERRORS:
                demoted = logging.INFO
        if demoted is None or demoted >= record.levelno:
            return True
        record.levelno, record.levelname = demoted, logging.getLevelName(demoted)
        return demoted >= self._level


def setup_logging(level: str, fmt: str) -> None:
    """Configure the root logger once: text for humans, json for log pipelines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka logs every retry at WARNING/ERROR; the worker reports those itself, once.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    for name in {logger for logger, _ in (*_KAFKA_CLIENT_DEMOTED, _COORDINATOR_LOOKUP)}:
        kafka_logger = logging.getLogger(name)
        for old in [f for f in kafka_logger.filters if isinstance(f, KafkaClientNoise)]:
            kafka_logger.removeFilter(old)
        kafka_logger.addFilter(KafkaClientNoise(root.level))
