"""A/B of worker settings: drain throughput of one worker process per setting, same frames.

    .venv/bin/python -m bench.knobs [--frames 1000] NAME=ENV=VALUE[,ENV=VALUE] ...

e.g. ``default= decode1=LOOKOUT_DECODE_THREADS=1 batch4=LOOKOUT_MAX_BATCH=4``. Prints frames/s
and the worker's CPU-ms per frame for each, run one after another on a fresh topic each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import time
import uuid
from typing import Any

from bench.__main__ import (
    REPO,
    LabelReader,
    _ready,
    _wait_topic,
    cache_dir,
    cpu_seconds,
    create_topics,
    free_port,
    produce,
    start_worker,
)
from bench.frames import frames_file as cached_frames


async def drain_rate(
    bootstrap: str, redis_url: str, frames: int, extra_env: dict[str, str]
) -> dict[str, Any]:
    """Pre-fill a 4-partition topic, start one worker, measure first-to-last label rate."""
    frames_file = cached_frames("720p", 250, cache_dir())
    run = uuid.uuid4().hex[:8]
    topic = f"bench-knob-{run}"
    await create_topics(bootstrap, {topic: 4})
    await produce(frames_file, topic, bootstrap, "knob", count=frames)
    port = free_port()
    worker = start_worker(
        cache_dir() / "engine-fp32.onnx", bootstrap, redis_url, topic, run, port, **extra_env
    )
    labels = LabelReader(bootstrap, f"{topic}.labels")
    try:
        while not _ready(port):
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited with {worker.returncode}")
            await asyncio.sleep(0.3)
        await _wait_topic(bootstrap, f"{topic}.labels")
        await labels.start()
        cpu0, t0 = cpu_seconds(worker.pid), time.monotonic()
        got = await labels.wait_for("knob", frames, timeout_s=60 + frames)
        cpu = cpu_seconds(worker.pid) - cpu0
        first, last = min(r["processed_at"] for r in got), max(r["processed_at"] for r in got)
        return {
            "fps": (len(got) - 1) / max(1e-3, (last - first) / 1000),
            "worker_cpu_ms_per_frame": 1000 * cpu / frames,
            "wall_s": time.monotonic() - t0,
        }
    finally:
        await labels.stop()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.knobs")
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("variants", nargs="+", help="NAME=ENV=VALUE[,ENV=VALUE] or NAME=")
    args = parser.parse_args()
    env_lines = subprocess.run(
        [str(REPO / "scripts" / "services"), "env"], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    env = dict(line.removeprefix("export ").split("=", 1) for line in env_lines)
    results = {}
    for variant in args.variants:
        name, _, spec = variant.partition("=")
        extra = dict(item.split("=", 1) for item in spec.split(",") if item)
        results[name] = {
            "env": extra,
            **asyncio.run(drain_rate(env["KAFKA_BOOTSTRAP"], env["REDIS_URL"], args.frames, extra)),
        }
        print(
            f"{name:<12} {results[name]['fps']:7.1f} frames/s  "
            f"{results[name]['worker_cpu_ms_per_frame']:6.1f} worker CPU-ms/frame  {extra}",
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
