"""What durable counts cost: the counts Lua call under ``appendfsync always`` vs ``everysec``.

``scripts/services`` and ``docker/compose.yaml`` run Redis with ``appendonly yes`` and
``appendfsync always``, so an acknowledged partition-batch (its counts and its offset
watermark) is on disk before the worker commits the offsets. This measures the price: a private
``redis-server`` per mode (its own port and temp dir), the same stream of partition-batches
(16 frames of 4 sources, 2 labels each, two windows, as the worker sends them) through
:class:`~stream_worker.sinks.counts.CountsWriter`, one call at a time as the sink makes them.

    python -m bench.redis_durability [--batches 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from bench.host import cpu_model, free_port, log
from stream_worker.counting import CountedFrame
from stream_worker.sinks.counts import CountsWriter

MODES = ("always", "everysec", "no-aof")


async def _wait_up(client: aioredis.Redis) -> None:
    async with asyncio.timeout(20):
        while True:
            try:
                await client.ping()
                return
            except (ConnectionError, OSError, aioredis.ConnectionError):
                await asyncio.sleep(0.1)


async def measure(mode: str, batches: int, frames_per_batch: int = 16) -> dict[str, float | str]:
    """Milliseconds per counts call (p50, p99) and calls per second for one fsync mode."""
    port = free_port()
    state = Path(tempfile.mkdtemp(prefix=f"lookout-bench-redis-{mode}-"))
    aof = ["--appendonly", "no"] if mode == "no-aof" else ["--appendonly", "yes", "--appendfsync", mode]
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(state), "--save", "", *aof],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        await _wait_up(client)
        writer = CountsWriter(
            client,
            key_prefix="bench",
            ttl_s=3600,
            event_gap_ms=30_000,
            windows=[("1m", 60_000), ("15m", 900_000)],
            group="bench",
        )
        took: list[float] = []
        offset = 0
        t0 = 1_790_000_000_000
        started = time.perf_counter()
        for b in range(batches):
            frames = []
            for i in range(frames_per_batch):
                frames.append(
                    CountedFrame(offset, f"cam-{i % 4}", t0 + offset * 200, ("car", "vehicle"), None)
                )
                offset += 1
            begin = time.perf_counter()
            await writer.apply("frames", b % 4, frames)
            took.append((time.perf_counter() - begin) * 1000)
        elapsed = time.perf_counter() - started
    finally:
        await client.aclose()
        server.terminate()
        server.wait(timeout=20)
        shutil.rmtree(state, ignore_errors=True)
    took.sort()
    return {
        "mode": mode,
        "batches": batches,
        "frames_per_batch": frames_per_batch,
        "ms_p50": round(statistics.median(took), 3),
        "ms_p99": round(took[int(len(took) * 0.99) - 1], 3),
        "calls_per_s": round(batches / elapsed, 1),
    }


async def main_async(batches: int) -> dict[str, object]:
    results = []
    for mode in MODES:
        log(f"redis appendfsync {mode}: {batches} partition-batches")
        results.append(await measure(mode, batches))
    return {
        "what": "counts Lua call per partition-batch, by Redis fsync mode",
        "cpu": cpu_model(),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    report = asyncio.run(main_async(args.batches))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
