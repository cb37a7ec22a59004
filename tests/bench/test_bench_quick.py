"""CI's smoke run of the benchmark: it must run end to end and report every figure.

Slow numbers never fail it (they are measured in bench/, not asserted); errors do.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from tests.conftest import REPO, Services

KEYS = (
    "e2e_fps",
    "e2e_fps_fp32",
    "e2e_fps_int8",
    "live_capacity_fps",
    "naive_fps",
    "ceiling_fps",
    "ceiling_fps_served_layout",
    "p99_ms_at_50pct",
    "int8_speedup",
    "decode_reduced_speedup",
    "peak_rss_mb",
    "rss_growth_pct",
)


def test_quick_benchmark_reports_every_figure(services: Services, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-services", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [report] = tmp_path.glob("*.json")
    data = json.loads(report.read_text())
    for key in KEYS:
        assert isinstance(data[key], float) and math.isfinite(data[key]), key
    assert data["e2e_fps"] > 0 and data["naive_fps"] > 0
    assert data["end_to_end"]["max"]["frames"] == 300  # every produced frame was labelled
    auto = data["auto_precision"]  # what --precision auto would serve here, and why
    assert auto["precision"] in ("fp32", "int8") and auto["line"].startswith(f"serving {auto['precision']}: ")
    # Every phase runs the precision auto serves; the other one is drained too; the naive
    # consumer stays on fp32 so that its ratio compares with earlier runs.
    served = data["served_precision"]
    other = "int8" if served == "fp32" else "fp32"
    assert served == auto["precision"]
    assert data["e2e_fps"] == data[f"e2e_fps_{served}"]
    drained = data[f"end_to_end_{other}"]
    assert drained["frames"] == 300 and drained["engine"] == f"engine-{other}.onnx"
    assert data["end_to_end"]["naive"]["engine"] == "engine-fp32.onnx"
    assert data["ratios"]["e2e_vs_ceiling"] == data["e2e_fps"] / data["ceilings"][served]["fps"]
    # The paired ratio: each round's drain (every frame labelled) over the ceiling probed on
    # either side of it, from the mean of the two probes' per-frame costs.
    paired = data["paired_ceiling_rounds"]
    assert paired["engine"] == f"engine-{served}.onnx" and len(paired["rounds"]) == 1
    [one] = paired["rounds"]
    assert one["drain"]["frames"] == 300 and one["ratio"] == one["e2e_fps"] / one["ceiling_fps"]
    low, high = sorted(one["ceiling_fps_before_after"])
    assert low <= one["ceiling_fps"] <= high
    assert data["ratios"]["e2e_vs_ceiling_paired"] == one["ratio"]
    assert auto["agreement"]["frames"] == 401
    # The latency phase is taken apart by stage from the worker's own trace.
    stages = data["end_to_end"]["load50"]["runs"][0]["stages"]
    assert stages["frames"] > 0 and {"inference", "decode_wait", "sink:labels"} <= stages["stages_ms"].keys()
    assert list(tmp_path.glob("*.png")), "the plot is written beside the JSON"
    # The run's topics are gone: a full run writes about 6.5 GB of frames, and a few runs a day
    # kept for the broker's retention filled the disk and killed it (2026-12-03).
    assert not [t for t in asyncio.run(topic_names(services.bootstrap)) if t.startswith("bench-")]


async def topic_names(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()
