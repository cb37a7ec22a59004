"""The README's first command ends in `stream-worker demo`: it must run and count every frame it sends."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, Services


def test_demo_replays_footage_and_counts_every_frame_it_sent(services: Services) -> None:
    cli = Path(sys.executable).parent / "stream-worker"
    result = subprocess.run(
        [
            str(cli),
            "demo",
            "--seconds",
            "12",
            "--cameras",
            "2",
            "--fps",
            "3",
            "--metrics-port",
            "0",
            "--port",
            "0",
            "--bootstrap",
            services.bootstrap,
            "--redis-url",
            services.redis_url,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"demo: live dashboard on http://127\.0\.0\.1:\d+/", result.stderr), result.stderr[
        -2000:
    ]
    match = re.search(r"final counts \(frames sent per camera: (\{.*\})\):\n(.*)", result.stdout, re.S)
    assert match, result.stdout[-2000:]
    sent = ast.literal_eval(match.group(1))
    assert len(sent) == 2 and all(n > 10 for n in sent.values())
    rows = {line.split()[0]: line.split() for line in match.group(2).strip().splitlines()[1:]}
    for camera, n in sent.items():
        assert int(rows[camera][1]) == n, f"{camera}: {rows[camera][1]} frames counted, {n} sent"
