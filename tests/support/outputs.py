"""What came out of a fault test's pipeline, and the verdict on it.

:class:`OutputWatcher` follows the labels and dead-letter topics until every frame has come out;
:func:`assert_exact` judges the verifier's report; :func:`record_result` writes the line that
docs/RELIABILITY.md is made from.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer

from stream_worker import codec
from stream_worker.verify import VerifyReport, dead_letter
from tests.support.workers import Pipeline, WorkerProcess


class OutputWatcher:
    """Follows the labels and dead-letter topics and tells when every frame has come out."""

    def __init__(self, pipeline: Pipeline, expected: Sequence[str]) -> None:
        self.pipeline = pipeline
        self.expected = set(expected)
        self.seen: set[str] = set()
        self.records = 0
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> OutputWatcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def _ensure(self) -> AIOKafkaConsumer | None:
        if self._consumer is not None:
            return self._consumer
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.pipeline.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        topics = await consumer.topics()
        wanted = [t for t in (self.pipeline.labels_topic, self.pipeline.dlq_topic) if t in topics]
        if self.pipeline.labels_topic not in wanted:  # the worker has not created it yet
            await consumer.stop()
            return None
        consumer.subscribe(wanted)
        self._consumer = consumer
        return consumer

    async def poll(self) -> None:
        """Read what has arrived since the last call."""
        consumer = await self._ensure()
        if consumer is None:
            return
        batch = await consumer.getmany(timeout_ms=300)
        for records in batch.values():
            for r in records:
                self.records += 1
                if r.topic == self.pipeline.dlq_topic:
                    self.seen.add(dead_letter(r).frame_id)
                else:
                    self.seen.add(codec.parse_label_record(r.value)["frame_id"])

    @property
    def done(self) -> bool:
        """Every expected frame has been labelled or dead-lettered."""
        return self.expected <= self.seen

    @property
    def progress(self) -> int:
        """Expected frames out so far."""
        return len(self.expected & self.seen)

    async def wait_for(self, count: int, timeout_s: float, *, workers: Sequence[WorkerProcess] = ()) -> float:
        """Until ``count`` expected frames are out; seconds it took. Fails when a worker died."""
        started = time.monotonic()
        while self.progress < count:
            if time.monotonic() - started > timeout_s:
                raise AssertionError(
                    f"only {self.progress} of {count} frames out after {timeout_s} s\n"
                    + "\n".join(w.tail() for w in workers)
                )
            for w in workers:
                if w.proc is not None and not w.alive():
                    raise AssertionError(f"worker exited with {w.proc.returncode}\n{w.tail()}")
            await self.poll()
        return time.monotonic() - started

    async def wait_all(self, timeout_s: float, *, workers: Sequence[WorkerProcess] = ()) -> float:
        """Until every expected frame is out; seconds it took."""
        return await self.wait_for(len(self.expected), timeout_s, workers=workers)


def assert_exact(report: VerifyReport, *, duplicates_allowed: bool) -> None:
    """0 missing, counts exact; duplicate label records only where allowed, and then identical."""
    text = report.format()
    assert not report.missing, text
    assert not report.unexpected, text
    assert report.counts_exact, text
    if duplicates_allowed:
        assert all(d.identical for d in report.duplicates), text
    else:
        assert not report.duplicates, text


def record_result(test: str, report: VerifyReport, **measured: float | int | str) -> None:
    """One line per fault test for docs/RELIABILITY.md (printed; appended to $LOOKOUT_FAULT_RESULTS)."""
    line = json.dumps(
        {
            "test": test,
            "frames": report.frames_in,
            "labelled": report.labelled,
            "missing": len(report.missing),
            "duplicate_frames": len(report.duplicates),
            "duplicate_records": sum(d.copies - 1 for d in report.duplicates),
            "counts_exact": report.counts_exact,
            **measured,
        }
    )
    print(f"FAULT-RESULT {line}")
    target = os.environ.get("LOOKOUT_FAULT_RESULTS")
    if target:
        with open(target, "a") as f:
            f.write(line + "\n")
