"""The thumbnail benchmark runs and reports what it says: cost per thumbnail, and many cameras
held to the live view's budget (counts of thumbnails made, never timings, are asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_thumbnail_benchmark_reports_the_cost_and_holds_many_cameras_to_the_budget(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.thumbnails",
            "--cameras",
            "60",
            "--seconds",
            "4",
            "--json",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["cpu"]["model"] and isinstance(report["cpu"]["flags"]["avx2"], bool)
    for size in ("720p", "1080p"):
        assert report["per_thumbnail"][size]["thumbnail_cpu_ms"] > 0
        assert report["per_thumbnail"][size]["half_scale_cpu_ms"] > 0
    (row,) = report["cameras_at_1_fps"]
    # 60 cameras at a frame a second: every one without a budget; 20 a second (and the first
    # second's burst of 20) with it.
    assert row["unbounded"]["thumbnails_per_s"] == 60
    assert 15 <= row["budget"]["thumbnails_per_s"] <= 20 + 20 / 4
    assert [p.name for p in tmp_path.iterdir()] and all(
        p.name.endswith("-thumbnails.json") for p in tmp_path.iterdir()
    )
