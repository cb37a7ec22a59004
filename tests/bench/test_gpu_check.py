"""The GPU check on a machine without an NVIDIA GPU: it runs, exits cleanly, and says so in its JSON.

On a GPU machine the same command is the proof itself (see bench/gpu_check.py); this test only
covers the first answer a machine without a driver gets.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _has_nvidia_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_has_nvidia_driver(), reason="an NVIDIA driver is installed here: run the check itself")
def test_without_a_gpu_the_check_stops_at_the_first_step_and_says_why(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(out.read_text())
    assert report["status"] == "incomplete" and report["complete"] is False
    assert report["missing"].startswith("gpu: no NVIDIA GPU")
    assert list(report["steps"]) == ["gpu"]
    assert report["steps"]["gpu"]["status"] == "missing"
    assert f"stopped: {report['missing']}" in result.stderr
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
