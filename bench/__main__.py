"""lookout's benchmark, in one run on one machine: ceilings, end to end, naive baseline, memory.

    .venv/bin/python -m bench [--quick] [--no-services] [--scaling] [--size 720p|1080p]

1. decode ceiling: full-size vs reduced-scale (DCT) JPEG decode + preprocessing, 1080p and 720p;
2. inference ceiling: each CPU engine (fp32, int8) at batch 1, 8, 32 and the worker's default,
   one session on every core (the issue's basis), and in the layout the worker serves (sessions x
   threads, all busy at once: the stricter basis);
3. which precision ``--precision auto`` serves here; every end-to-end phase runs that engine;
4. end to end: frames produced by a separate process to the real broker, labelled, published and
   counted by a worker process: maximum sustained throughput, then latency (captured-at to label
   record) at 50% and 80% of the capacity measured with the producer running (3 runs of 40 s
   each), and where the CPU went (worker by thread, broker, Redis); the maximum throughput again
   with the other precision;
5. the naive consumer (one message at a time, fp32, unchanged) against the same broker and frames;
6. ratios (each against the ceiling of its own precision), and end to end over the ceiling in
   3 paired rounds (the ceiling measured, then a backlog drained, back to back; the median and
   its spread: the machine's speed drifts between phases); 7. the worker's peak RSS and its
   growth over a soak at 80% load.

Writes bench/results/<date>-<machine>[-1080p][-quick].json and a PNG plot beside it, and prints a table.
``--quick`` (CI's smoke test) uses fewer frames and shorter phases; it fails only on errors,
never on slow numbers. The runner is :mod:`bench.run`; this module is its command line.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bench.frames import SIZES
from bench.run import RESULTS, run, save, summary


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke test: small and short (< 3 min)")
    parser.add_argument("--no-services", action="store_true", help="Kafka and Redis are already up")
    parser.add_argument("--scaling", action="store_true", help="also measure one worker process against two")
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="720p", help="frame size of the end-to-end and scaling runs"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    started = time.monotonic()
    result = asyncio.run(
        run(quick=args.quick, size=args.size, with_scaling=args.scaling, services_up=args.no_services)
    )
    result["bench_seconds"] = time.monotonic() - started
    path = save(result, args.out, size=args.size, quick=args.quick)
    print(f"results: {path}")
    print(summary(result))


if __name__ == "__main__":
    main()
