"""Memory and /metrics cost of many distinct source ids, through the worker's per-source state.

    .venv/bin/python -m bench.sources [--sources 200000] [--max-tracked-sources N]
        [--max-metric-sources N] [--json]

Feeds N distinct source ids, 16 to a batch with one frame each, through the structures the
worker keeps per source: the drift tracker (as ``Pipeline`` drives it), the metrics (the drift
gauges, as ``Metrics.published`` sets them) and the live-view sink (its thumbnail clock, with a
Redis stand-in that accepts every command). Reports the process's RSS before and after, the
size of the ``/metrics`` page and the time to render it, and the CPU it ran on. No Kafka, no
Redis, no engine: only the per-source state is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from bench.host import cpu_model, rss_mb
from stream_worker.counting import DriftTracker
from stream_worker.frames import ClassScore, Frame, FrameLabels, LabelScore, Prediction, SourceKind
from stream_worker.observability import Metrics
from stream_worker.pipeline import Batch
from stream_worker.settings import Settings, load_settings
from stream_worker.sinks.live import LiveViewSink

BATCH = 16
LABELS = ("car", "bus", "bicycle", "person", "unknown")
MODEL = {
    "name": "bench",
    "version": "1",
    "backend": "none",
    "precision": "fp32",
    "engine_sha256": "0" * 64,
    "onnx_sha256": "1" * 64,
    "taxonomy_version": "t1",
}


class NullPipeline:
    """A Redis pipeline that accepts every command and answers nothing (the live sink's writes)."""

    async def __aenter__(self) -> NullPipeline:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None

    async def execute(self) -> list[Any]:
        return []


class NullRedis:
    """Stands in for the live sink's Redis client."""

    def pipeline(self, transaction: bool = False) -> NullPipeline:
        return NullPipeline()


def predictions(first: int, count: int) -> list[Prediction]:
    """One frame each of sources ``cam-<first>`` .. ``cam-<first + count - 1>``."""
    out = []
    for i in range(first, first + count):
        label = LABELS[i % len(LABELS)]
        frame = Frame("frames", 0, i, f"cam-{i:07d}", SourceKind.TRAFFIC, f"f-{i}", i, "image/jpeg", b"\0\0")
        score = 0.2 + (i % 7) / 10
        labels = FrameLabels((LabelScore(label, score, (label,)),), (ClassScore(0, label, score),), score)
        out.append(Prediction(frame, labels, i, 1.0))
    return out


async def feed(settings: Settings, sources: int) -> tuple[DriftTracker, Metrics]:
    """Feed ``sources`` distinct source ids through the per-source state, a batch at a time."""
    c = settings.counts
    tracker = DriftTracker(c.drift_window_frames, c.review_threshold, limits=c.source_limits)
    metrics = Metrics.from_settings(settings)
    with ThreadPoolExecutor(1) as pool:
        live = LiveViewSink(NullRedis(), settings, model=lambda: MODEL, executor=pool)  # type: ignore[arg-type]
        for first in range(0, sources, BATCH):
            batch = Batch(opened_at=0.0)
            batch.predictions = predictions(first, min(BATCH, sources - first))
            now_ms = time.monotonic() * 1000
            for p in batch.predictions:
                top = p.result.labels[0]
                tracker.observe(p.frame.source_id, top.label, p.result.best_score, now_ms=now_ms)
            for p in batch.predictions:
                batch.drift[p.frame.source_id] = tracker.snapshot(p.frame.source_id)
            tracker.forget(now_ms)
            metrics.published(batch, review=0)
            await live.write(batch)
    return tracker, metrics


def measure(settings: Settings, sources: int) -> dict[str, Any]:
    """RSS before and after feeding, and the /metrics page it leaves."""
    gc.collect()
    before = rss_mb(os.getpid())
    started = time.perf_counter()
    tracker, metrics = asyncio.run(feed(settings, sources))
    fed_s = time.perf_counter() - started
    gc.collect()
    after = rss_mb(os.getpid())
    started = time.perf_counter()
    page = metrics.render()
    render_s = time.perf_counter() - started
    text = page.decode()
    return {
        "sources": sources,
        "max_tracked_sources": settings.counts.max_tracked_sources,
        "max_metric_sources": settings.ops.max_metric_sources,
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "rss_growth_mb": round(after - before, 1),
        "feed_s": round(fed_s, 2),
        "metrics_bytes": len(page),
        "metrics_render_s": round(render_s, 4),
        "drift_series": sum(line.startswith("lookout_drift_") for line in text.splitlines()),
        "drift_sources_held": len(tracker),
        "cpu": cpu_model(),
        "python": sys.version.split()[0],
    }


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.sources", description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=200_000, help="distinct source ids to feed")
    parser.add_argument("--max-tracked-sources", type=int, default=None, help="default: the worker's")
    parser.add_argument("--max-metric-sources", type=int, default=None, help="default: the worker's")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    flags = {"max_tracked_sources": args.max_tracked_sources, "max_metric_sources": args.max_metric_sources}
    result = measure(load_settings(flags=flags, env={}), args.sources)
    if args.json:
        print(json.dumps(result))
        return
    cpu = result["cpu"]
    flags_on = ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in cpu["flags"].items())
    print(f"CPU: {cpu['model']} ({cpu['cpus']} CPUs; {flags_on}); Python {result['python']}")
    print(
        f"{result['sources']:,} distinct sources (caps: {result['max_tracked_sources']:,} tracked, "
        f"{result['max_metric_sources']:,} with metric series), fed in {result['feed_s']} s"
    )
    print(
        f"RSS {result['rss_before_mb']} MiB -> {result['rss_after_mb']} MiB "
        f"(+{result['rss_growth_mb']} MiB); drift tracker holds {result['drift_sources_held']:,} sources"
    )
    print(
        f"/metrics: {result['metrics_bytes'] / 1e6:.2f} MB, {result['drift_series']:,} drift series, "
        f"rendered in {result['metrics_render_s'] * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
