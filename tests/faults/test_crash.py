"""A worker killed at any stage, or told to stop mid-batch, loses and double-counts nothing."""

from __future__ import annotations

import asyncio
import random
import signal
import time

from tests.support.feeds import mixed_feed, produce_feed, scaled
from tests.support.outputs import OutputWatcher, assert_exact, record_result
from tests.support.workers import Harness

# (stage, n): the worker SIGKILLs itself the n-th time it reaches the stage. Together they hit
# every gap in the sink: mid-inference, labels out but not counted, counted but not on the
# counts topic / not committed, and just before the commit.
KILL_PLAN = ("inference:3", "labels:2", "counts:4", "commit:2", "labels:5", "counts:1")


async def test_sigkill_at_every_stage_and_restart_loses_nothing_and_counts_exactly(harness: Harness) -> None:
    pipeline = await harness.pipeline(partitions=4)
    feed = mixed_feed(scaled(500), seed=11)
    feeding = asyncio.create_task(produce_feed(pipeline.bootstrap, pipeline.frames_topic, feed, pause_s=0.5))
    worker = harness.worker(pipeline)
    rng = random.Random(11)
    async with OutputWatcher(pipeline, [f.frame_id for f in feed]) as out:
        for stage in KILL_PLAN:
            worker.start(LOOKOUT_FAULT_KILL_AT=stage)
            code = await worker.wait(120)
            assert code == -signal.SIGKILL, f"{stage}: exit {code}\n{worker.tail()}"
            await out.poll()
        # One plain SIGKILL from outside, at a random point while frames flow.
        worker.start()
        await out.wait_for(out.progress + rng.randint(20, 80), 120, workers=[worker])
        worker.send(signal.SIGKILL)
        killed_at = time.monotonic()
        assert await worker.wait(30) == -signal.SIGKILL
        before = out.progress
        worker.start()
        await out.wait_for(before + 1, 120, workers=[worker])
        recovery_s = time.monotonic() - killed_at
        await feeding
        await out.wait_all(300, workers=[worker])
        assert await worker.stop() == 0, worker.tail()
    assert worker.count_in_log("fault injection: SIGKILL at") == len(KILL_PLAN)
    report = await pipeline.verify()
    assert_exact(report, duplicates_allowed=True)
    record_result(
        "sigkill",
        report,
        kills=len(KILL_PLAN) + 1,
        recovery_s=round(recovery_s, 1),
    )


async def test_sigterm_mid_batch_drains_exits_cleanly_and_nothing_is_replayed(harness: Harness) -> None:
    pipeline = await harness.pipeline(partitions=4)
    feed = mixed_feed(scaled(400), seed=12)
    await produce_feed(pipeline.bootstrap, pipeline.frames_topic, feed)
    # A slow engine keeps a batch in inference when the signal comes.
    worker = harness.worker(pipeline).start(LOOKOUT_FAULT_INFER_DELAY_MS="300")
    async with OutputWatcher(pipeline, [f.frame_id for f in feed]) as out:
        await out.wait_for(100, 180, workers=[worker])
        worker.send(signal.SIGTERM)
        signalled = time.monotonic()
        assert await worker.wait(40) == 0, worker.tail()
        drain_s = time.monotonic() - signalled
        await out.poll()
        stopped_at = out.progress
        assert stopped_at < len(feed), "the feed should still be flowing when the worker is stopped"
        worker.start()
        await out.wait_all(240, workers=[worker])
        assert await worker.stop() == 0, worker.tail()
    assert "signal 15: draining" in worker.tail(400)
    report = await pipeline.verify()
    assert_exact(report, duplicates_allowed=False)
    record_result("sigterm", report, drain_s=round(drain_s, 1), out_at_sigterm=stopped_at)
