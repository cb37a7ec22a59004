"""Which resize mode the shipped model should serve: every mode on the development set.

    scripts/devset                                   # data/devset and its manifest
    .venv/bin/python -m bench.preprocess_modes [--engine ENGINE] [--data data/devset]

Runs ``engine_build.evaluate.evaluate_engine`` (what ``engine-build evaluate --preprocess SPEC``
runs) once per mode and prints a Markdown table and the paired comparison with today's mode.
Results: ``bench/results/<date>-preprocess-modes.json``.

The rule, fixed before the first measurement:

1. The score is the **published-label accuracy** on the whole set (right = the label the worker
   publishes at its roll-up threshold is the true leaf or one of its parents; ``unknown/``
   images are right when nothing is published).
2. A mode beats the incumbent (``crop:0.875``) when the 95 % interval of the paired group
   bootstrap of the accuracy difference (whole scenes resampled, the same scenes for both modes)
   lies above zero. The best such mode wins.
3. Otherwise the difference is within noise, and the tie rule picks: fewest wrong labels, then
   the higher accuracy, then the incumbent.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.host import cpu_model
from engine_build.evaluate import EvaluationReport, evaluate_engine, override_preprocessing, wilson_interval
from stream_worker.backends.registry import open_backend
from stream_worker.taxonomy import Taxonomy

MODES = ("crop:0.875", "crop:1", "letterbox", "stretch")
INCUMBENT = "crop:0.875"
RESULTS = Path(__file__).resolve().parent / "results"


def paired_group_difference(
    a: list[float], b: list[float], groups: list[str], *, rounds: int = 4000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``b - a`` and its 95 % percentile interval when whole groups are resampled."""
    names = sorted(set(groups))
    member = np.array([names.index(g) for g in groups])
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    sums = np.bincount(member, weights=diff, minlength=len(names))
    counts = np.bincount(member, minlength=len(names)).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(names), size=(rounds, len(names)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(diff.mean()), float(low), float(high)


def choose(reports: dict[str, EvaluationReport]) -> tuple[str, dict[str, Any]]:
    """Apply the rule in this module's docstring; return the winner and the paired comparisons."""
    base = reports[INCUMBENT].published
    assert base is not None
    groups = [row["group"] for row in base.images]
    right = {
        mode: [float(row["outcome"] in ("leaf", "ancestor")) for row in r.published.images]  # type: ignore[union-attr]
        for mode, r in reports.items()
    }
    paired = {
        mode: dict(
            zip(
                ("difference", "low", "high"),
                paired_group_difference(right[INCUMBENT], right[mode], groups),
                strict=True,
            )
        )
        for mode in reports
        if mode != INCUMBENT
    }
    better = [mode for mode, p in paired.items() if p["low"] > 0]
    if better:
        return max(better, key=lambda m: paired[m]["difference"]), paired

    def tie_key(mode: str) -> tuple[int, float, int]:
        c = reports[mode].published.overall  # type: ignore[union-attr]
        return (c.wrong, -c.right / c.n, 0 if mode == INCUMBENT else 1)

    return min(reports, key=tie_key), paired


def main(argv: list[str] | None = None) -> int:
    """Command line: measure every mode, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, default=None, help="engine (default: build fp32 from models/)")
    parser.add_argument("--data", type=Path, default=Path("data/devset"))
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: bench/results/...)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lookout-modes-") as tmp:
        engine = args.engine
        if engine is None:
            from engine_build.cpu import build_cpu_engine
            from engine_build.default import default_onnx_path

            engine = Path(tmp) / "fp32.onnx"
            build_cpu_engine(default_onnx_path(), engine, precision="fp32")
        backend = open_backend(engine)
        try:
            taxonomy = Taxonomy.for_engine(backend.info)
            reports = {
                mode: evaluate_engine(
                    backend, args.data, taxonomy, spec=override_preprocessing(backend.info.spec, mode)
                )
                for mode in MODES
            }
        finally:
            backend.close()
    winner, paired = choose(reports)

    print(
        "| mode | best leaf (leaf images) | macro F1 | published right | 95 % images | 95 % scenes | "
        "leaf / parent | unknown | wrong | difference vs crop:0.875, 95 % scenes |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode, r in reports.items():
        c = r.published.overall  # type: ignore[union-attr]
        low, high = wilson_interval(c.right, c.n)
        g_low, g_high = r.published.accuracy_group95  # type: ignore[union-attr]
        right_leaf = round(r.accuracy * r.n)
        d = paired.get(mode)
        diff = f"{d['difference']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})" if d else "-"
        print(
            f"| {mode} | {right_leaf}/{r.n} ({r.accuracy:.3f}) | {r.macro_f1:.3f} | {c.right}/{c.n} "
            f"({c.right / c.n:.3f}) | {low:.3f}-{high:.3f} | {g_low:.3f}-{g_high:.3f} "
            f"| {c.leaf} / {c.ancestor} | {c.unknown} | {c.wrong} | {diff} |"
        )
    print()
    labels = list(reports[INCUMBENT].published.per_label)  # type: ignore[union-attr]
    print("| label | " + " | ".join(MODES) + " |")
    print("| --- |" + " --- |" * len(MODES))
    for label in labels:
        cells = []
        for mode in MODES:
            c = reports[mode].published.per_label[label]  # type: ignore[union-attr]
            cells.append(f"{c.right}/{c.n} right, {c.wrong} wrong")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print(f"winner by the stated rule: {winner}")

    out = args.out or RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-preprocess-modes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "host": {
                    "cpu": cpu_model(),
                    "python": platform.python_version(),
                    "onnxruntime": ort.__version__,
                },
                "data": str(args.data),
                "rule": __doc__.split("The rule, fixed before the first measurement:", 1)[1].strip(),
                "winner": winner,
                "paired_vs_incumbent": paired,
                "modes": {mode: r.to_dict() for mode, r in reports.items()},
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
