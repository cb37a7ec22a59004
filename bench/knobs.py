"""A/B of worker settings: drain throughput of one worker process per setting, same frames.

    .venv/bin/python -m bench.knobs [--frames 1000] [--rounds 3] [--engine fp32|int8] [--out FILE]
        [--sources 4] [--rate FRAMES_PER_S [--seconds 40]]
        NAME=ENV=VALUE[,...] ...

e.g. ``default= decode1=LOOKOUT_DECODE_THREADS=1 batch4=LOOKOUT_MAX_BATCH=4``. Prints frames/s
and the worker's CPU-ms per frame for each, run one after another on a fresh topic each; with
``--rounds`` the variants are interleaved round by round (so a drift of the machine's load hits
them alike) and the median and spread of each are reported, with the worker's CPU per frame split
by thread (event loop, decode, inference). A variant ``old=PYTHONPATH=DIR`` runs the worker from
another checkout (``git worktree add DIR COMMIT``): the measured effect of a code change.
``--out`` writes the JSON, with the CPU model and flags. With ``--rate R`` each variant is
measured for latency instead: a fresh worker, frames offered live at R frames/s for
``--seconds`` by the producer process (on the same cores), p50/p95/p99 captured-at to label.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.e2e import drain_rate, latency_at
from bench.host import cache_dir, cpu_model, service_endpoints, spread_pct


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.knobs")
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (median reported)")
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    parser.add_argument("--engine", choices=("fp32", "int8"), default="fp32", help="the CPU engine drained")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="latency instead of drain rate: frames/s offered live"
    )
    parser.add_argument("--seconds", type=float, default=40.0, help="with --rate: seconds per run")
    parser.add_argument("--sources", type=int, default=4, help="cameras the frames come from, taking turns")
    parser.add_argument("variants", nargs="+", help="NAME=ENV=VALUE[,ENV=VALUE] or NAME=")
    args = parser.parse_args()
    bootstrap, redis_url = service_endpoints()
    variants = {}
    for variant in args.variants:
        name, _, spec = variant.partition("=")
        variants[name] = dict(item.split("=", 1) for item in spec.split(",") if item)
    if args.rate > 0:
        latency(args, bootstrap, redis_url, variants)
        return
    engine = cache_dir() / f"engine-{args.engine}.onnx"
    runs = interleaved(
        variants,
        args.rounds,
        lambda extra: asyncio.run(
            drain_rate(bootstrap, redis_url, args.frames, engine, extra_env=extra, sources=args.sources)
        ),
        lambda run: (
            f"{run['fps']:7.1f} frames/s  {run['worker_cpu_ms_per_frame']:6.1f} worker CPU-ms/frame "
            f"({split(run['worker_cpu_ms_per_frame_by_thread'])}; {split(run['services_cpu_ms_per_frame'])})"
        ),
    )
    results: dict[str, Any] = {}
    for name, extra in variants.items():
        fps = [r["fps"] for r in runs[name]]
        cpu = [r["worker_cpu_ms_per_frame"] for r in runs[name]]
        results[name] = {
            "env": extra,
            "fps": statistics.median(fps),
            "fps_spread_pct": spread_pct(fps),
            "worker_cpu_ms_per_frame": statistics.median(cpu),
            "worker_cpu_ms_per_frame_by_thread": {
                k: statistics.median(r["worker_cpu_ms_per_frame_by_thread"][k] for r in runs[name])
                for k in runs[name][0]["worker_cpu_ms_per_frame_by_thread"]
            },
            "services_cpu_ms_per_frame": {
                k: statistics.median(r["services_cpu_ms_per_frame"][k] for r in runs[name])
                for k in runs[name][0]["services_cpu_ms_per_frame"]
            },
            "runs": runs[name],
        }
        print(
            f"median {name:<12} {results[name]['fps']:7.1f} frames/s "
            f"(spread {results[name]['fps_spread_pct']:.0f} %)  "
            f"{results[name]['worker_cpu_ms_per_frame']:6.1f} worker CPU-ms/frame "
            f"({split(results[name]['worker_cpu_ms_per_frame_by_thread'])}; "
            f"{split(results[name]['services_cpu_ms_per_frame'])})",
            flush=True,
        )
    write(args, {"frames": args.frames, "variants": results})


def latency(
    args: argparse.Namespace, bootstrap: str, redis_url: str, variants: dict[str, dict[str, str]]
) -> None:
    """``--rate``: captured-at to label latency of each variant at a fixed offered rate, the
    producer running on the same cores; rounds interleaved, median p99 and its spread."""
    engine = cache_dir() / f"engine-{args.engine}.onnx"

    def line(run: dict[str, Any]) -> str:
        ms = run["latency_ms"]
        return (
            f"p50 {ms['p50']:6.0f}  p95 {ms['p95']:6.0f}  p99 {ms['p99']:6.0f} ms  "
            f"({run['sent']:.0f} frames at {args.rate:.0f}/s)"
        )

    runs = interleaved(
        variants,
        args.rounds,
        lambda extra: asyncio.run(
            latency_at(
                bootstrap, redis_url, args.rate, args.seconds, engine, extra_env=extra, sources=args.sources
            )
        ),
        line,
    )
    results: dict[str, Any] = {}
    for name, extra in variants.items():
        p99 = [r["latency_ms"]["p99"] for r in runs[name]]
        results[name] = {
            "env": extra,
            "p99_ms": statistics.median(p99),
            "p99_spread_pct": spread_pct(p99),
            "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in runs[name]),
            "runs": runs[name],
        }
        print(
            f"median {name:<12} p99 {results[name]['p99_ms']:6.0f} ms (spread "
            f"{results[name]['p99_spread_pct']:.0f} %), p50 {results[name]['p50_ms']:.0f} ms",
            flush=True,
        )
    write(args, {"rate": args.rate, "seconds": args.seconds, "variants": results})


def interleaved(
    variants: dict[str, dict[str, str]],
    rounds: int,
    measure: Callable[[dict[str, str]], dict[str, Any]],
    line: Callable[[dict[str, Any]], str],
) -> dict[str, list[dict[str, Any]]]:
    """Each variant measured once per round, rounds one after another (a drift of the machine's
    speed hits every variant alike); one printed line per run."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for round_no in range(rounds):
        for name, extra in variants.items():
            run = measure(extra)
            runs[name].append(run)
            print(f"round {round_no + 1} {name:<12} {line(run)}  {extra}", flush=True)
    return runs


def write(args: argparse.Namespace, fields: dict[str, Any]) -> None:
    """The results document (engine, rounds, CPU model and flags, ``fields``): printed, and
    written to ``--out`` when given."""
    document = {
        "engine": args.engine,
        "rounds": args.rounds,
        "sources": args.sources,
        "cpu": cpu_model(),
        **fields,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document))


def split(by_thread: dict[str, float]) -> str:
    """``event loop 2.1, decode 3.0, ...`` (CPU-ms per frame)."""
    return ", ".join(f"{name} {ms:.1f}" for name, ms in by_thread.items())


if __name__ == "__main__":
    main()
