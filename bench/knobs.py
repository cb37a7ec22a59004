"""A/B of worker settings: drain throughput of one worker process per setting, same frames.

    .venv/bin/python -m bench.knobs [--frames 1000] [--rounds 3] [--out FILE] NAME=ENV=VALUE[,...] ...

e.g. ``default= decode1=LOOKOUT_DECODE_THREADS=1 batch4=LOOKOUT_MAX_BATCH=4``. Prints frames/s
and the worker's CPU-ms per frame for each, run one after another on a fresh topic each; with
``--rounds`` the variants are interleaved round by round (so a drift of the machine's load hits
them alike) and the median and spread of each are reported. ``--out`` writes the JSON, with the
CPU model and flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from bench.e2e import (
    TOPIC_PARTITIONS,
    LabelReader,
    create_topics,
    drain_fps,
    produce,
    start_worker,
    wait_topic,
    worker_ready,
)
from bench.frames import frames_file as cached_frames
from bench.host import cache_dir, cpu_model, cpu_seconds, free_port, service_endpoints
from stream_worker.settings import TopicSettings


async def drain_rate(
    bootstrap: str, redis_url: str, frames: int, extra_env: dict[str, str]
) -> dict[str, Any]:
    """Pre-fill a frames topic (partitioned as in the main benchmark), start one worker, measure
    the first-to-last label rate."""
    frames_file = cached_frames("720p", 250, cache_dir())
    run = uuid.uuid4().hex[:8]
    topic = f"bench-knob-{run}"
    await create_topics(bootstrap, {topic: TOPIC_PARTITIONS})
    await produce(frames_file, topic, bootstrap, "knob", count=frames)
    port = free_port()
    worker = start_worker(
        cache_dir() / "engine-fp32.onnx", bootstrap, redis_url, topic, run, port, **extra_env
    )
    labels_topic = TopicSettings.named_after(topic).labels_topic
    labels = LabelReader(bootstrap, labels_topic)
    try:
        while not worker_ready(port):
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited with {worker.returncode}")
            await asyncio.sleep(0.3)
        await wait_topic(bootstrap, labels_topic)
        await labels.start()
        cpu0, t0 = cpu_seconds(worker.pid), time.monotonic()
        got = await labels.wait_for("knob", frames, timeout_s=60 + frames)
        cpu = cpu_seconds(worker.pid) - cpu0
        return {
            "fps": drain_fps(got),
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
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (median reported)")
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    parser.add_argument("variants", nargs="+", help="NAME=ENV=VALUE[,ENV=VALUE] or NAME=")
    args = parser.parse_args()
    bootstrap, redis_url = service_endpoints()
    variants = {}
    for variant in args.variants:
        name, _, spec = variant.partition("=")
        variants[name] = dict(item.split("=", 1) for item in spec.split(",") if item)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for round_no in range(args.rounds):
        for name, extra in variants.items():
            run = asyncio.run(drain_rate(bootstrap, redis_url, args.frames, extra))
            runs[name].append(run)
            print(
                f"round {round_no + 1} {name:<12} {run['fps']:7.1f} frames/s  "
                f"{run['worker_cpu_ms_per_frame']:6.1f} worker CPU-ms/frame  {extra}",
                flush=True,
            )
    results: dict[str, Any] = {}
    for name, extra in variants.items():
        fps = [r["fps"] for r in runs[name]]
        cpu = [r["worker_cpu_ms_per_frame"] for r in runs[name]]
        results[name] = {
            "env": extra,
            "fps": statistics.median(fps),
            "fps_spread_pct": 100 * (max(fps) - min(fps)) / statistics.median(fps),
            "worker_cpu_ms_per_frame": statistics.median(cpu),
            "runs": runs[name],
        }
        print(
            f"median {name:<12} {results[name]['fps']:7.1f} frames/s "
            f"(spread {results[name]['fps_spread_pct']:.0f} %)  "
            f"{results[name]['worker_cpu_ms_per_frame']:6.1f} worker CPU-ms/frame",
            flush=True,
        )
    document = {"frames": args.frames, "rounds": args.rounds, "cpu": cpu_model(), "variants": results}
    if args.out is not None:
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document))


if __name__ == "__main__":
    main()
