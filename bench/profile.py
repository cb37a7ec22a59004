"""Where a worker's CPU goes per frame, beyond decode and inference: py-spy on a real worker.

    .venv/bin/python -m bench.profile [--frames 1500] [--size 720p] [--rate 100] [--out bench/results]

A backlog of frames is produced to a fresh topic, a worker (the default engine, the worker's
default settings) drains it, and py-spy samples every Python thread of the worker while it does
(``--idle`` off: a thread blocked in a system call or waiting for a lock is not counted).
Written beside each other:

* ``<date>-<host>-profile.svg``: the flame graph (all threads; width = samples);
* ``<date>-<host>-profile.json``: samples by category (decode, inference, taxonomy, the event
  loop split by library: aiokafka, codec, sinks, Redis, metrics, asyncio...), the worker's CPU
  time per frame, and the CPU model.

Categories are decided by the innermost project or library frame of each stack (see
``CATEGORIES``); the event loop's own share is what the issue calls the per-frame overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.e2e import fresh_topic, one_worker, produce, wait_topic
from bench.frames import frames_file
from bench.host import cache_dir, cpu_model, cpu_seconds, log, service_endpoints
from bench.run import cpu_engines
from stream_worker.settings import TopicSettings

CATEGORIES: tuple[tuple[str, str], ...] = (
    # (substring of a frame "function (file)", category); the first match from the innermost
    # frame outwards wins.
    ("decode.py", "decode + preprocess"),
    ("preprocess.py", "decode + preprocess"),
    ("backends/onnxruntime.py", "inference (engine)"),
    ("taxonomy.py", "taxonomy"),
    ("sinks/counts.py", "sink: Redis counts"),
    ("sinks/live.py", "sink: live view"),
    ("sinks/topics.py", "sink: topics (JSON, produce)"),
    ("codec.py", "codec (records <-> frames, JSON)"),
    ("record_batches.py", "aiokafka: fetch / record parsing"),
    ("aiokafka/consumer", "aiokafka: fetch / record parsing"),
    ("aiokafka/record", "aiokafka: fetch / record parsing"),
    ("aiokafka/producer", "aiokafka: produce"),
    ("aiokafka/conn.py", "aiokafka: connections"),
    ("aiokafka", "aiokafka: other"),
    ("redis/", "redis client"),
    ("prometheus_client", "metrics"),
    ("observability.py", "metrics"),
    ("counting.py", "counting / drift"),
    ("pipeline.py", "pipeline (batch bookkeeping)"),
    ("batching.py", "pipeline (batch bookkeeping)"),
    ("worker.py", "worker (poll, commit)"),
    ("asyncio/", "asyncio event loop"),
    ("selectors.py", "asyncio event loop"),
    ("concurrent/futures", "thread pools"),
    ("threading.py", "thread pools"),
)


def categorise(stack: str) -> str:
    """The category of one collapsed stack (frames separated by ``;``, outermost first)."""
    for frame in reversed(stack.split(";")):
        for needle, category in CATEGORIES:
            if needle in frame:
                return category
    return "other"


def read_collapsed(path: Path) -> Counter[str]:
    """py-spy's raw format: ``frame;frame;... count`` per line."""
    stacks: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


def flame_svg(stacks: Counter[str], title: str, width: int = 1400, row: int = 17) -> str:
    """A flame graph (root at the bottom) of collapsed stacks, as a self-contained SVG."""
    total = sum(stacks.values()) or 1
    tree: dict[str, Any] = {"n": 0, "kids": {}}
    for stack, count in stacks.items():
        node = tree
        node["n"] += count
        for frame in stack.split(";"):
            node = node["kids"].setdefault(frame, {"n": 0, "kids": {}})
            node["n"] += count
    rects: list[str] = []
    depth_max = 0

    def walk(node: dict[str, Any], name: str, x: float, depth: int) -> None:
        nonlocal depth_max
        w = node["n"] / total * width
        if w < 0.3:
            return
        depth_max = max(depth_max, depth)
        share = 100 * node["n"] / total
        label = html.escape(name)
        hue = 20 + (hash(name.split(" ")[0]) % 40)
        text = html.escape(name if len(name) * 6.5 < w else name[: max(0, int(w / 6.5) - 2)] + "..")
        rects.append(
            f"<g><title>{label} ({node['n']} samples, {share:.1f} %)</title>"
            f'<rect x="{x:.1f}" y="DEPTH{depth}" width="{w:.1f}" height="{row - 1}" '
            f'fill="hsl({hue},85%,60%)"/>'
            + (f'<text x="{x + 2:.1f}" y="TEXT{depth}">{text}</text>' if w > 20 else "")
            + "</g>"
        )
        cx = x
        for kid_name, kid in sorted(node["kids"].items(), key=lambda kv: -kv[1]["n"]):
            walk(kid, kid_name, cx, depth + 1)
            cx += kid["n"] / total * width

    walk(tree, "all threads", 0.0, 0)
    height = (depth_max + 1) * row + 40
    body = "".join(rects)
    for depth in range(depth_max + 1):
        y = height - 10 - (depth + 1) * row
        body = body.replace(f'"DEPTH{depth}"', f'"{y}"').replace(f'"TEXT{depth}"', f'"{y + row - 5}"')
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="monospace" font-size="11">'
        f'<text x="4" y="16" font-size="13">{html.escape(title)}</text>{body}</svg>\n'
    )


async def profile(
    frames: int,
    size: str,
    seconds: float,
    out: Path,
    *,
    precision: str = "fp32",
    keep_raw: bool = False,
    sources: int = 4,
) -> dict[str, Any]:
    """Drain a backlog of ``frames`` under py-spy with the ``precision`` CPU engine; write the
    flame graph and the categories (and py-spy's raw stacks with ``keep_raw``)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("bench.profile: py-spy is not installed: .venv/bin/pip install py-spy")
    bootstrap, redis_url = service_endpoints()
    engine = cpu_engines()[precision]
    async with fresh_topic(bootstrap, "profile") as (run, topic):
        await produce(
            frames_file(size, 250, cache_dir()), topic, bootstrap, "prof", count=frames, sources=sources
        )
        raw = out / f"profile-{run}.txt"
        async with one_worker(engine, bootstrap, redis_url, topic, run, None) as (worker, labels):
            await wait_topic(bootstrap, TopicSettings.named_after(topic).labels_topic)
            await labels.start()
            cpu0, t0 = cpu_seconds(worker.pid), time.monotonic()
            spy = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(worker.pid),
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--duration",
                    str(int(seconds)),
                    "--output",
                    str(raw),
                    "--threads",
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            got = await labels.wait_for("prof", frames, timeout_s=120 + frames)
            cpu1, wall = cpu_seconds(worker.pid), time.monotonic() - t0
            spy.wait(timeout=seconds + 30)
    stacks = read_collapsed(raw)
    by_category: Counter[str] = Counter()
    innermost: dict[str, Counter[str]] = {}
    for stack, count in stacks.items():
        category = categorise(stack)
        by_category[category] += count
        innermost.setdefault(category, Counter())[stack.rsplit(";", 1)[-1]] += count
    total = sum(by_category.values()) or 1
    cpu_ms_per_frame = 1000 * (cpu1 - cpu0) / len(got)
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    stem = f"{date}-{platform.node() or 'machine'}-profile"
    title = (
        f"lookout worker, {frames} {size} frames drained, py-spy {int(seconds)} s at 200 Hz, "
        f"{cpu_model().get('model', '?')}"
    )
    (out / f"{stem}.svg").write_text(flame_svg(stacks, title))
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "frames": len(got),
        "sources": sources,
        "size": size,
        "wall_s": wall,
        "engine": precision,
        "worker_cpu_ms_per_frame": cpu_ms_per_frame,
        "samples": total,
        "share_by_category": {k: round(v / total, 4) for k, v in by_category.most_common()},
        # What each category's samples were doing: its innermost frames, most sampled first.
        "innermost_frames": {
            k: {frame: round(n / total, 4) for frame, n in innermost[k].most_common(5)}
            for k, _ in by_category.most_common(6)
        },
        "note": "py-spy samples Python threads only; ONNX Runtime's own worker threads are native "
        "and show as the inference thread's time inside session.run",
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    if not keep_raw:
        raw.unlink(missing_ok=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--size", default="720p", choices=("720p", "1080p"))
    parser.add_argument("--seconds", type=float, default=20.0, help="how long py-spy samples")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--engine", choices=("fp32", "int8"), default="fp32", help="the CPU engine drained")
    parser.add_argument("--keep-raw", action="store_true", help="keep py-spy's raw stacks beside the JSON")
    parser.add_argument("--sources", type=int, default=4, help="cameras the frames come from, taking turns")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(
        profile(
            args.frames,
            args.size,
            args.seconds,
            args.out,
            precision=args.engine,
            keep_raw=args.keep_raw,
            sources=args.sources,
        )
    )
    log(f"profile: {result['worker_cpu_ms_per_frame']:.1f} CPU-ms per frame")
    for category, share in result["share_by_category"].items():
        print(f"{category:<40} {100 * share:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
