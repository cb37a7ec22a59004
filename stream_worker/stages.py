"""Where a batch's time goes: one monotonic stamp at each boundary of its life in the worker.

A batch is stamped when its first record was fetched, when that record got into a batch, when
the batch closed, when the infer stage took it, when its decodes were done, when inference and
taxonomy were done, when the sink stage took it, after each sink and after the commit. The
differences are the stages:

=================  ===========================================================================
``backlog``        first record fetched -> in a batch (waiting for a free batch buffer)
``fill``           batch opened -> closed (``max_batch`` frames or ``max_wait_ms``)
``infer_queue``    closed -> taken by the infer stage (the previous batch still in inference)
``decode_wait``    taken -> its decodes done (decoding runs from the moment a frame is added)
``inference``      decodes done -> engine and taxonomy done (includes waiting for the engine's
                   thread)
``sink_queue``     inference done -> taken by the sink stage (the previous batch still in sinks)
``sink:<name>``    each sink's write, retries included
``commit``         the offset commit
=================  ===========================================================================

Every batch's stages go to the ``lookout_stage_seconds`` histogram. With ``LOOKOUT_TRACE_FILE``
set, each batch is also written as one JSON line (its stamps, frame count, and the Kafka
timestamp and fetch time of its first record), with garbage-collector pauses and partition
pause/resume as lines of their own, so a latency tail can be taken apart after a run
(``python -m bench.trace FILE``).
"""

from __future__ import annotations

import collections
import gc
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass(slots=True)
class StageClock:
    """One batch's stamps (``time.monotonic()`` seconds), in the order they were taken."""

    stamps: list[tuple[str, float]] = field(default_factory=list)
    first_kafka_ms: int | None = None
    """The broker or producer timestamp (wall ms) of the batch's first record."""
    first_fetched_ms: float | None = None
    """Wall time (ms) at which the batch's first record came back from the broker."""

    def stamp(self, name: str, at: float | None = None) -> None:
        """Mark ``name`` now (or at monotonic ``at``)."""
        self.stamps.append((name, time.monotonic() if at is None else at))

    def stages(self) -> list[tuple[str, float]]:
        """``(stage, seconds)`` between consecutive stamps, named as in the module's table."""
        out: list[tuple[str, float]] = []
        for (_, before), (name, after) in zip(self.stamps, self.stamps[1:], strict=False):
            out.append((_STAGE_ENDING_AT.get(name, name), max(0.0, after - before)))
        return out


_STAGE_ENDING_AT = {
    "opened": "backlog",
    "closed": "fill",
    "taken": "infer_queue",
    "decoded": "decode_wait",
    "inferred": "inference",
    "sinking": "sink_queue",
}
"""The stage that ends at each fixed stamp; a stamp not listed names its own stage."""


class TraceWriter:
    """Writes one JSON line per batch, per GC pause and per pause/resume; thread-safe appends.

    The file is line-buffered through a regular buffered writer: a line costs a ``write`` into
    the buffer, not a system call, so tracing every batch stays off the latency it measures.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = path.open("a", buffering=1 << 16)
        self._lock = threading.Lock()
        self._gc_started: float | None = None
        # Filled by the collector's callback, which may run inside write() on any thread: it
        # only appends here (no lock), and the next write() turns the entries into lines.
        self._gc_pauses: collections.deque[dict[str, Any]] = collections.deque()
        gc.callbacks.append(self._on_gc)

    def write(self, line: dict[str, Any]) -> None:
        """Append one JSON object as a line (and any GC pauses seen since the last one)."""
        texts = [json.dumps(line, separators=(",", ":"))]
        while self._gc_pauses:
            texts.append(json.dumps(self._gc_pauses.popleft(), separators=(",", ":")))
        with self._lock:
            if self._file is not None:
                self._file.write("\n".join(texts) + "\n")

    def batch(self, clock: StageClock, *, frames: int, records: int, delivered_with: int = 1) -> None:
        """A finished batch: its stamps relative to its first one, where its first record came from,
        and how many batches (itself included) went to the sinks together."""
        if not clock.stamps:
            return
        origin = clock.stamps[0][1]
        self.write(
            {
                "batch": {name: round((at - origin) * 1000, 3) for name, at in clock.stamps},
                "at": round(origin, 6),
                "frames": frames,
                "records": records,
                "delivered_with": delivered_with,
                "kafka_ms": clock.first_kafka_ms,
                "fetched_ms": clock.first_fetched_ms,
            }
        )

    def event(self, kind: str, **fields: Any) -> None:
        """A worker event (``pause``, ``resume``) at the current monotonic time."""
        self.write({"event": kind, "at": round(time.monotonic(), 6), **fields})

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.monotonic()
        elif self._gc_started is not None:
            started, self._gc_started = self._gc_started, None
            self._gc_pauses.append(
                {
                    "gc": info.get("generation"),
                    "at": round(started, 6),
                    "ms": round((time.monotonic() - started) * 1000, 3),
                    "collected": info.get("collected"),
                }
            )

    def close(self) -> None:
        """Stop listening to the collector and flush the file."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._gc_pauses:
            self.event("gc_flush")
        with self._lock:
            file, self._file = self._file, None
        if file is not None:
            file.close()


__all__ = ["StageClock", "TraceWriter"]
