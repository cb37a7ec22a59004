"""Stage timing of a batch and the trace file (stream_worker/stages.py)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from stream_worker.stages import StageClock, TraceWriter


def test_stages_are_named_by_where_they_end_and_sum_to_the_batch_life() -> None:
    clock = StageClock()
    for name, at in [
        ("fetched", 10.0),
        ("opened", 10.5),
        ("closed", 10.52),
        ("taken", 10.6),
        ("decoded", 10.61),
        ("inferred", 10.8),
        ("sinking", 10.81),
        ("sink:labels", 10.9),
        ("sink:counts", 10.95),
        ("commit", 11.0),
    ]:
        clock.stamp(name, at)
    stages = clock.stages()
    assert [name for name, _ in stages] == [
        "backlog",
        "fill",
        "infer_queue",
        "decode_wait",
        "inference",
        "sink_queue",
        "sink:labels",
        "sink:counts",
        "commit",
    ]
    assert dict(stages)["backlog"] == pytest.approx(0.5)
    assert dict(stages)["inference"] == pytest.approx(0.19)
    assert sum(seconds for _, seconds in stages) == pytest.approx(1.0)


def test_the_trace_has_one_line_per_batch_and_the_collectors_pauses(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    trace = TraceWriter(path)
    clock = StageClock(first_kafka_ms=1_000, first_fetched_ms=1_020.0)
    clock.stamp("fetched", 5.0)
    clock.stamp("opened", 5.25)
    trace.batch(clock, frames=3, records=4)
    gc.collect()  # the pause is held until the next line is written
    trace.event("pause", in_flight=64)
    trace.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    batch = lines[0]
    assert batch["batch"] == {"fetched": 0.0, "opened": 250.0}
    assert (batch["frames"], batch["records"]) == (3, 4)
    assert (batch["kafka_ms"], batch["fetched_ms"]) == (1_000, 1_020.0)
    assert any(line.get("event") == "pause" and line["in_flight"] == 64 for line in lines)
    pauses = [line for line in lines if "gc" in line]
    assert pauses and pauses[0]["gc"] == 2 and pauses[0]["ms"] >= 0
    assert trace._on_gc not in gc.callbacks  # closing stops listening to the collector
