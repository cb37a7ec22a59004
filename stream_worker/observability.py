"""Prometheus metrics, /healthz and /readyz, and structured logging.

The HTTP server is a few lines of asyncio on the worker's own loop, so a blocked loop shows up
as a failing liveness probe, which is exactly what an operator wants to know.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from stream_worker.pipeline import Batch

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Every metric the worker exports; one instance per worker, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
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
        self.paused = Gauge(
            "lookout_partitions_paused", "1 while partitions are paused for back-pressure", registry=r
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
        self.counts_skipped = Counter(
            "lookout_counts_replayed_frames",
            "Frames the Redis watermark recognised as already counted",
            registry=r,
        )

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
        for source, snapshot in batch.drift.items():
            self.low_confidence_share.labels(source).set(snapshot.low_confidence_share)
            for label, share in snapshot.label_share.items():
                self.label_share.labels(source, label).set(share)

    def delivered(self, batch: Batch, *, sink_seconds: float, now_ms: int) -> None:
        """Every sink has the batch and its offsets are committed."""
        self.sink_seconds.observe(sink_seconds)
        for p in batch.predictions:
            self.e2e_seconds.observe(max(0.0, (now_ms - p.frame.captured_at_ms) / 1000))

    def backpressure(self, *, in_flight: int, in_flight_bytes: int, paused: bool | None = None) -> None:
        """Frames and bytes in flight, and whether the partitions are paused (when the caller knows)."""
        self.in_flight.set(in_flight)
        self.in_flight_bytes.set(in_flight_bytes)
        if paused is not None:
            self.paused.set(int(paused))

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


class HealthServer:
    """Serves /metrics, /healthz and /readyz on the worker's event loop."""

    def __init__(
        self, metrics: Metrics, ready: Callable[[], tuple[bool, str]], live: Callable[[], tuple[bool, str]]
    ):
        self._metrics = metrics
        self._ready = ready
        self._live = live
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Start listening; returns the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._handle, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else "/"
            if path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, self._metrics.render()
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
