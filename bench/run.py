"""One benchmark run: every section in order, the results assembled, written and plotted.

The sections live in :mod:`bench.ceilings` (decode and inference alone) and :mod:`bench.e2e`
(worker processes on the real broker and Redis); ``python -m bench`` is the command line.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ceilings import (
    decode_ceiling,
    decoded,
    gpu_section,
    inference_ceiling,
    reduced_decode,
    served_layout_inference,
)
from bench.e2e import TOPIC_PARTITIONS, drain_rate, drop_topics, end_to_end, scaling
from bench.engines import measure
from bench.frames import encoded_frames
from bench.host import REPO, cache_dir, cpu_model, log, service_endpoints, spread_pct, start_services
from engine_build.agreement import engine_files_agreement
from engine_build.cpu import QuantOptions, build_cpu_engine
from engine_build.default import default_onnx_path
from stream_worker.backends.base import EngineInfo
from stream_worker.backends.onnxruntime import OnnxRuntimeBackend
from stream_worker.backends.precision import (
    AGREEMENT_BAR,
    SPEEDUP_BAR,
    Timing,
    decide,
    measure_cpu_time,
    read_cpu,
    without_int8_kernels,
)
from stream_worker.backends.registry import verify_engine
from stream_worker.errors import EngineError
from stream_worker.pipeline import inference_layout, usable_cores
from stream_worker.settings import Settings, load_settings

RESULTS = REPO / "bench" / "results"
# The figures a run reports, in the order the summary prints them.
HEADLINE = (
    "e2e_fps",
    "e2e_fps_fp32",
    "e2e_fps_int8",
    "naive_fps",
    "ceiling_fps",
    "ceiling_fps_served_layout",
    "p99_ms_at_50pct",
    "p99_ms_at_80pct",
    "int8_speedup",
    "decode_reduced_speedup",
    "peak_rss_mb",
    "rss_growth_pct",
)


def cpu_engines() -> dict[str, Path]:
    """The fp32 and int8 CPU engines in the cache dir, (re)built when missing or stale."""
    engines = {}
    for precision in ("fp32", "int8"):
        path = cache_dir() / f"engine-{precision}.onnx"
        try:
            recipe = verify_engine(path).build.get("quantization")
            if precision == "int8" and recipe != json.loads(json.dumps(asdict(QuantOptions()))):
                raise EngineError("built with another int8 recipe than today's default")
        except EngineError:  # stale or missing: rebuild
            log(f"building the {precision} CPU engine")
            build_cpu_engine(default_onnx_path(), path, precision=precision, progress=False)
        engines[precision] = path
    return engines


def auto_precision(engines: dict[str, Path], settings: Settings, threads: int) -> dict[str, Any]:
    """What ``--precision auto`` would serve on this machine, by its own rule, with these engines.

    The int8 engine's agreement with fp32 is measured here on the held-out frames (the benchmark's
    engines are built without it), the speed as a worker measures it at start-up: the worker's
    batch size and the served layout's ``threads`` per session, CPU time, interleaved.
    """
    agreement = engine_files_agreement(engines["fp32"], engines["int8"])
    timings: list[Timing] = []

    def measure() -> Timing:
        batch = settings.batch.max_batch
        timings.append(measure_cpu_time(engines["fp32"], engines["int8"], batch=batch, threads=threads))
        return timings[-1]

    cpu = read_cpu()
    choice = without_int8_kernels(cpu) or decide(agreement["published_label"], measure, cpu)
    return {
        "precision": choice.precision,
        "reason": choice.reason,
        "line": choice.line,
        "bars": {"speedup": SPEEDUP_BAR, "published_label_agreement": AGREEMENT_BAR},
        "agreement": agreement,
        "speedup": timings[0].speedup if timings else None,
        "threads": threads,
        "batch": settings.batch.max_batch,
    }


async def run(*, quick: bool, size: str, with_scaling: bool, services_up: bool) -> dict[str, Any]:
    """Run every section and assemble the results.

    ``services_up``: Kafka and Redis already run (otherwise scripts/services starts them).
    """
    if not services_up:
        start_services()
    bootstrap, redis_url = service_endpoints()
    left = await drop_topics(bootstrap, "bench-*")
    if left:
        log(f"deleted {left} topic(s) left by earlier runs that were cut short (bench-*)")
    # The batching the benchmark's workers run with: they inherit this process's environment.
    settings = load_settings()
    batch = settings.batch

    engines = cpu_engines()
    spec = EngineInfo.from_sidecar(engines["fp32"], verify_engine(engines["fp32"])).spec

    log("decode ceiling")
    n_decode = 16 if quick else 64
    decode = {
        frame_size: decode_ceiling(encoded_frames(frame_size, n_decode, cache_dir()), spec, 1 if quick else 3)
        for frame_size in ("1080p", "720p")
    }
    log("inference ceiling")
    inference = inference_ceiling(engines, 1.0 if quick else 4.0, batch.max_batch)
    log("GPU section (TensorRT)")
    gpu = gpu_section(1.0 if quick else 4.0, batch.max_batch)
    if "skipped" in gpu:
        log(f"GPU section skipped: {gpu['skipped']}")
    e = settings.engine
    sessions, threads = inference_layout(
        e.inference_sessions, e.inference_threads, "onnxruntime", usable_cores()
    )
    log("what --precision auto would serve here")
    auto = auto_precision(engines, settings, threads)
    log(auto["line"])
    served = auto["precision"]
    other = "int8" if served == "fp32" else "fp32"
    log(f"inference ceiling in the served layout ({sessions} session(s) x {threads} thread(s))")
    layout = {
        p: served_layout_inference(engines[p], sessions, threads, batch.max_batch, 1.0 if quick else 4.0)
        for p in ("fp32", "int8")
    }
    log(f"e2e: every phase with the {served} engine (--precision auto's choice)")
    e2e = await end_to_end(
        bootstrap, redis_url, engines[served], naive_engine=engines["fp32"], size=size, quick=quick
    )
    log(f"e2e: max sustained throughput with the {other} engine")
    e2e_other = await drain_rate(bootstrap, redis_url, e2e["max"]["frames"], engines[other], size=size)
    log(f"e2e: {other} max sustained {e2e_other['fps']:.1f} frames/s")
    rounds = 1 if quick else 3
    log(f"e2e / ceiling: {rounds} paired round(s) with the {served} engine (a drain between two probes)")
    paired = await paired_rounds(
        bootstrap, redis_url, engines[served], rounds, e2e["max"]["frames"], size, batch.max_batch
    )
    log(
        f"e2e / ceiling, paired: {paired['ratio']:.2f} "
        f"(rounds: {', '.join(format(r['ratio'], '.2f') for r in paired['rounds'])})"
    )
    scale = await scaling(bootstrap, redis_url, engines["fp32"], 600, size) if with_scaling else {}
    e2e_fps = {served: e2e["max"]["e2e_fps"], other: e2e_other["fps"]}

    def row(precision: str, batch_size: int) -> dict[str, Any]:
        return next(r for r in inference if r["precision"] == precision and r["batch"] == batch_size)

    cores = os.cpu_count() or 1
    decode_ms = decode[size]["reduced"]["cpu_ms_per_frame"]
    fp32, int8 = row("fp32", batch.max_batch), row("int8", batch.max_batch)
    # The issue's ceiling: the cores over decode + one session's inference (all cores' threads)
    # per frame; and the stricter one: inference timed in the layout the worker serves.
    ceilings = {
        p: {
            "fps": cores / ((decode_ms + row(p, batch.max_batch)["cpu_ms_per_image"]) / 1000),
            "fps_served_layout": cores / ((decode_ms + layout[p]["cpu_ms_per_image"]) / 1000),
        }
        for p in ("fp32", "int8")
    }
    ceiling = ceilings[served]["fps"]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {
            "cores": cores,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpu": cpu_model(),  # model name and AVX2 / AVX-512 / VNNI / AMX flags
            "note": "broker, Redis, producer and worker share the cores",
        },
        "settings": {
            "engine": f"onnxruntime {served} (served by --precision auto: e2e_fps and every phase); "
            f"{other}: the drain only; the naive consumer: fp32",
            "served_precision": served,
            "layout": {"sessions": sessions, "threads": threads},
            "max_batch": batch.max_batch,
            "max_wait_ms": batch.max_wait_ms,
            "frames_partitions": TOPIC_PARTITIONS,
            "frames": size,
        },
        "served_precision": served,
        "e2e_fps": e2e["max"]["e2e_fps"],
        "e2e_fps_fp32": e2e_fps["fp32"],
        "e2e_fps_int8": e2e_fps["int8"],
        "auto_precision": auto,
        "live_capacity_fps": e2e["live"]["fps"],
        "naive_fps": e2e["naive"]["fps"],
        "ceiling_fps": ceiling,
        "ceiling_fps_served_layout": ceilings[served]["fps_served_layout"],
        "ceilings": ceilings,
        "served_layout_inference": layout,
        "p99_ms_at_50pct": e2e["load50"]["latency_ms"]["p99"],
        "p99_ms_at_80pct": e2e["load80"]["latency_ms"]["p99"],
        "int8_speedup": int8["images_per_s"] / fp32["images_per_s"],
        "decode_reduced_speedup": decode["1080p"]["reduced"]["fps"] / decode["1080p"]["full"]["fps"],
        "peak_rss_mb": e2e["peak_rss_mb"],
        "rss_growth_pct": e2e["soak"]["rss_growth_pct"],
        "ratios": {
            "e2e_vs_naive": e2e["max"]["e2e_fps"] / e2e["naive"]["fps"],
            "e2e_int8_vs_fp32": e2e_fps["int8"] / e2e_fps["fp32"],
            # Each round's drain over the ceiling probed on either side of it, median of the
            # rounds: the machine's speed drifts by 15-30 % over a run here, and the ceiling of
            # the other ratios was taken minutes before the phase it is compared with.
            "e2e_vs_ceiling_paired": paired["ratio"],
            "e2e_vs_ceiling": e2e["max"]["e2e_fps"] / ceiling,
            "e2e_vs_ceiling_served_layout": e2e["max"]["e2e_fps"] / ceilings[served]["fps_served_layout"],
            "e2e_vs_ceiling_by_precision": {p: e2e_fps[p] / ceilings[p]["fps"] for p in ("fp32", "int8")},
        },
        "paired_ceiling_rounds": paired,
        "decode": decode,
        "inference": inference,
        "gpu": gpu,
        "scaling": scale,
        "end_to_end": e2e,
        f"end_to_end_{other}": e2e_other,
    }


PROBE_DECODE_REPEATS = 8
"""Passes over the 64 sample frames per decode probe: about 1.2 s (one pass, 0.15 s, moved by
up to 50 % between two probes a few seconds apart on the EPYC of 2026-12-03)."""


async def paired_rounds(
    bootstrap: str, redis_url: str, engine: Path, rounds: int, frames: int, size: str, batch: int
) -> dict[str, Any]:
    """End to end over the ceiling, each drain between two ceiling probes: the ceiling on the
    issue's basis (cores / (reduced decode + inference at the worker's batch on one session with
    every core's thread), about 3 s), one worker draining a fresh backlog of ``frames`` (about
    30 s with its start), the ceiling again. A round's ceiling is taken from the mean of the
    per-frame costs of the probes on either side of its drain (consecutive rounds share one), so
    a drift of the machine's speed across the drain moves both halves of the ratio alike. The
    median ratio and its spread."""
    cores = os.cpu_count() or 1
    sample = encoded_frames(size, max(64, batch), cache_dir())
    backend = OnnxRuntimeBackend(EngineInfo.from_sidecar(engine, verify_engine(engine)))
    out: list[dict[str, Any]] = []
    try:
        spec = backend.info.spec
        images = decoded(sample[:batch], spec)

        def probe() -> dict[str, float]:
            decode_ms = reduced_decode(sample, spec, PROBE_DECODE_REPEATS)["cpu_ms_per_frame"]
            infer_ms = measure(backend.infer, images, 2.0)["cpu_ms_per_image"]
            return {"decode_cpu_ms": decode_ms, "inference_cpu_ms": infer_ms, "cost_ms": decode_ms + infer_ms}

        before = probe()
        for _ in range(rounds):
            drain = await drain_rate(bootstrap, redis_url, frames, engine, size=size)
            after = probe()
            probes = (before, after)
            ceiling = cores / (statistics.mean(p["cost_ms"] for p in probes) / 1000)
            out.append(
                {
                    "decode_cpu_ms": statistics.mean(p["decode_cpu_ms"] for p in probes),
                    "inference_cpu_ms": statistics.mean(p["inference_cpu_ms"] for p in probes),
                    "probes": {"before": before, "after": after},
                    "ceiling_fps": ceiling,
                    "ceiling_fps_before_after": [cores / (p["cost_ms"] / 1000) for p in probes],
                    "e2e_fps": drain["fps"],
                    "ratio": drain["fps"] / ceiling,
                    "drain": drain,
                }
            )
            before = after
    finally:
        backend.close()
    ratios = [r["ratio"] for r in out]
    return {
        "engine": engine.name,
        "method": "each drain between two ceiling probes; the ceiling from their mean per-frame cost",
        "rounds": out,
        "ratio": statistics.median(ratios),
        "ratio_spread_pct": spread_pct(ratios),
        "e2e_fps": statistics.median(r["e2e_fps"] for r in out),
        "ceiling_fps": statistics.median(r["ceiling_fps"] for r in out),
    }


def save(result: dict[str, Any], out: Path, *, size: str, quick: bool) -> Path:
    """Write ``<date>-<machine>[-1080p][-quick].json`` and the PNG plot beside it; the JSON's path."""
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("" if size == "720p" else f"-{size}") + ("-quick" if quick else "")
    stem = f"{datetime.now(UTC):%Y-%m-%d}-{platform.node() or 'machine'}{suffix}"
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2))
    plot(result, out / f"{stem}.png")
    return path


def summary(result: dict[str, Any]) -> str:
    """The headline figures and ratios as a small table."""
    lines = [f"  {key:<24} {result[key]:10.2f}" for key in HEADLINE]
    lines.append(f"  {'e2e / naive':<24} {result['ratios']['e2e_vs_naive']:10.2f}")
    lines.append(f"  {'e2e int8 / fp32':<24} {result['ratios']['e2e_int8_vs_fp32']:10.2f}")
    lines.append(f"  {'e2e / CPU ceiling':<24} {result['ratios']['e2e_vs_ceiling']:10.2f}")
    paired = result["paired_ceiling_rounds"]
    lines.append(
        f"  {'e2e / ceiling, paired':<24} {paired['ratio']:10.2f}  (median of {len(paired['rounds'])}, "
        f"spread {paired['ratio_spread_pct']:.0f} %)"
    )
    strict = result["ratios"]["e2e_vs_ceiling_served_layout"]
    lines.append(f"  {'e2e / served-layout ceil.':<24} {strict:10.2f}")
    lines.append(f"  {'served precision':<24} {result['served_precision']:>10}")
    lines.append(f"  {'--precision auto':<24} {result['auto_precision']['line']}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Throughput and latency against offered load, and RSS over the soak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e = result["end_to_end"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    served = result["served_precision"]
    names = ["naive (fp32)", "e2e fp32", "e2e int8", f"CPU ceiling ({served})"]
    values = [result["naive_fps"], result["e2e_fps_fp32"], result["e2e_fps_int8"], result["ceiling_fps"]]
    ax.bar(names, values, color=["#999999", "#2b7bb9", "#5aa05a", "#c7e0f4"])
    ax.set_ylabel("frames/s")
    machine = ", 2-core machine" if os.cpu_count() == 2 else ""
    ax.set_title(f"Throughput ({result['settings']['frames']} frames{machine})")
    loads = [50, 80]
    ax = axes[1]
    for key, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-")):
        ax.plot(loads, [e2e[f"load{x}"]["latency_ms"][key] for x in loads], style, label=key)
    ax.set_xlabel("offered load, % of live capacity")
    ax.set_ylabel("captured-at to label, ms")
    ax.set_title("End-to-end latency vs load")
    ax.legend()
    ax = axes[2]
    samples = e2e["soak"]["samples"]
    ax.plot([s[0] for s in samples], [s[1] for s in samples])
    ax.set_xlabel("soak time, s")
    ax.set_ylabel("worker RSS, MiB")
    ax.set_ylim(0, max(s[1] for s in samples) * 1.15)  # from zero: growth is read against the whole
    ax.set_title("Memory at 80% load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
