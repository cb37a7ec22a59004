"""The ``stream-worker`` console entry point: a SIGTERM from the first moment is a clean stop.

Supervisors (Kubernetes, systemd, the fault tests) may stop a worker at any moment of its life,
including while Python is still importing numpy, OpenCV and the Kafka client. With the default
disposition that SIGTERM kills the process (exit -15), which a supervisor reads as a crash. This
module imports nothing heavy, installs the handler, and only then imports the command line.
Until the event loop takes the signal over (``cli._with_signals``) a SIGTERM raises
``SystemExit(0)``: nothing has been consumed yet, so stopping at once is the clean stop.
"""

from __future__ import annotations

import signal
from types import FrameType


def stop_before_loop(signum: int, frame: FrameType | None) -> None:
    """SIGTERM before the event loop runs (or after it ended): exit 0, nothing is in flight."""
    raise SystemExit(0)


def main() -> None:
    """Install the early SIGTERM handler, then run the ``stream-worker`` command line."""
    signal.signal(signal.SIGTERM, stop_before_loop)
    from stream_worker.cli import main as cli_main

    cli_main()
