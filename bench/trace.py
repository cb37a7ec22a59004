"""Take a worker's latency apart: read a ``LOOKOUT_TRACE_FILE`` and say where the time went.

    .venv/bin/python -m bench.trace TRACE.jsonl [--since MONOTONIC] [--until MONOTONIC] [--json]

Per stage (``stream_worker/stages.py``): p50 / p95 / p99 / max in ms over every batch, and the
share of each stage in the slowest 5 % of batches against all batches, which is what a tail is
made of. Also: the first record's time from its Kafka timestamp to its fetch, garbage-collector
pauses (how many, how long, how many fell inside a slow batch) and partition pauses.
``--since``/``--until`` keep the batches of one phase (``time.monotonic()`` of this machine, the
clock the worker stamps with).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from stream_worker.stages import StageClock

SLOW_SHARE = 0.05


def read(path: Path, since: float = 0.0, until: float = float("inf")) -> dict[str, list[dict[str, Any]]]:
    """The trace's lines by kind (``batch``, ``gc``, ``event``) between ``since`` and ``until``."""
    kinds: dict[str, list[dict[str, Any]]] = {"batch": [], "gc": [], "event": []}
    for text in path.read_text().splitlines():
        line = json.loads(text)
        if not since <= line["at"] <= until:
            continue
        kind = next(k for k in kinds if k in line)
        kinds[kind].append(line)
    return kinds


def _stages(batch: dict[str, Any]) -> dict[str, float]:
    clock = StageClock([(name, ms / 1000) for name, ms in batch["batch"].items()])
    out: dict[str, float] = {}
    for stage, seconds in clock.stages():
        out[stage] = out.get(stage, 0.0) + seconds * 1000
    if batch.get("kafka_ms") is not None and batch.get("fetched_ms") is not None:
        out = {"kafka_to_fetch": max(0.0, batch["fetched_ms"] - batch["kafka_ms"]), **out}
    return out


def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(a, 50)), 1),
        "p95": round(float(np.percentile(a, 95)), 1),
        "p99": round(float(np.percentile(a, 99)), 1),
        "max": round(float(a.max()), 1),
        "mean": round(float(a.mean()), 1),
    }


def summarise(kinds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per-stage percentiles, the make-up of the slowest batches, GC and partition pauses."""
    batches = kinds["batch"]
    if not batches:
        return {"batches": 0}
    per = [_stages(b) for b in batches]
    names = list(dict.fromkeys(name for stages in per for name in stages))
    total = [sum(stages.values()) for stages in per]
    order = np.argsort(total)
    slow = order[-max(1, int(len(order) * SLOW_SHARE)) :]
    windows = [(b["at"], b["at"] + max(b["batch"].values()) / 1000) for b in (batches[i] for i in slow)]
    gc_pauses = kinds["gc"]
    in_slow = [g for g in gc_pauses if any(lo <= g["at"] <= hi for lo, hi in windows)]
    pauses = [e for e in kinds["event"] if e["event"] == "pause"]
    return {
        "batches": len(batches),
        "frames": sum(b["frames"] for b in batches),
        "mean_batch": round(float(np.mean([b["frames"] for b in batches])), 2),
        "life_ms": _pct(total),
        "stages_ms": {name: _pct([stages.get(name, 0.0) for stages in per]) for name in names},
        "slowest_batches": {
            "share": SLOW_SHARE,
            "count": len(slow),
            "life_ms_mean": round(float(np.mean([total[i] for i in slow])), 1),
            "stage_ms_mean": {
                name: round(float(np.mean([per[i].get(name, 0.0) for i in slow])), 1) for name in names
            },
            "all_batches_stage_ms_mean": {
                name: round(float(np.mean([stages.get(name, 0.0) for stages in per])), 1) for name in names
            },
        },
        "gc": {
            "pauses": len(gc_pauses),
            "total_ms": round(sum(g["ms"] for g in gc_pauses), 1),
            "max_ms": round(max((g["ms"] for g in gc_pauses), default=0.0), 1),
            "by_generation": {
                str(gen): sum(1 for g in gc_pauses if g["gc"] == gen)
                for gen in sorted({g["gc"] for g in gc_pauses})
            },
            "inside_slowest_batches": len(in_slow),
            "inside_slowest_batches_ms": round(sum(g["ms"] for g in in_slow), 1),
        },
        "partition_pauses": len(pauses),
    }


def render(summary: dict[str, Any]) -> str:
    """A plain-text table of :func:`summarise`."""
    if not summary["batches"]:
        return "no batches in the trace"
    lines = [
        f"{summary['batches']} batches, {summary['frames']} frames (mean batch {summary['mean_batch']})",
        f"{'stage':<16} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}   slowest 5 % mean / all mean (ms)",
    ]
    slow = summary["slowest_batches"]
    for name, p in summary["stages_ms"].items():
        lines.append(
            f"{name:<16} {p['p50']:>8.1f} {p['p95']:>8.1f} {p['p99']:>8.1f} {p['max']:>8.1f}   "
            f"{slow['stage_ms_mean'][name]:>8.1f} / {slow['all_batches_stage_ms_mean'][name]:.1f}"
        )
    life = summary["life_ms"]
    lines.append(
        f"{'batch life':<16} {life['p50']:>8.1f} {life['p95']:>8.1f} {life['p99']:>8.1f} {life['max']:>8.1f}"
    )
    g = summary["gc"]
    lines.append(
        f"gc: {g['pauses']} pauses {g['by_generation']}, {g['total_ms']} ms in all, "
        f"longest {g['max_ms']} ms, "
        f"{g['inside_slowest_batches']} ({g['inside_slowest_batches_ms']} ms) inside the slowest batches"
    )
    lines.append(f"partition pauses (back-pressure): {summary['partition_pauses']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--since", type=float, default=0.0, help="monotonic seconds")
    parser.add_argument("--until", type=float, default=float("inf"), help="monotonic seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    summary = summarise(read(args.trace, args.since, args.until))
    print(json.dumps(summary, indent=2) if args.json else render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
