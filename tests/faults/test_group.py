"""Consumer-group faults: rebalances, a stalled member, an engine slower than the poll interval."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.support.feeds import FAULT_SCALE, mixed_feed, produce_feed, scaled
from tests.support.outputs import OutputWatcher, assert_exact, record_result
from tests.support.workers import SESSION_TIMEOUT_MS, Harness, WorkerProcess

REBALANCE_CYCLES = 3


@pytest.mark.timeout(180 * FAULT_SCALE)
async def test_rebalance_one_of_two_workers_stopped_and_started_repeatedly(harness: Harness) -> None:
    pipeline = await harness.pipeline(partitions=4)
    feed = mixed_feed(scaled(700), seed=15)
    feeding = asyncio.create_task(produce_feed(pipeline.bootstrap, pipeline.frames_topic, feed, pause_s=0.5))
    steady = harness.worker(pipeline, "steady").start()
    flapping = harness.worker(pipeline, "flapping").start()
    stop_times = []
    # Each step's own limit is well inside the test's: a stuck step fails with the workers' logs
    # (a pytest timeout would end the test without them).
    step_s = 45 * FAULT_SCALE
    async with OutputWatcher(pipeline, [f.frame_id for f in feed]) as out:
        for cycle in range(REBALANCE_CYCLES):
            # Stop it only once it runs (a SIGTERM during start-up just ends the process).
            await wait_for_log(flapping, "worker started", cycle + 1, step_s)
            # Capped at the feed: a fast pair of workers may be done with it before the last cycle,
            # and waiting for frames that do not exist timed the whole test out.
            await out.wait_for(min(out.progress + 60, len(feed)), step_s, workers=[steady, flapping])
            flapping.send(signal.SIGTERM)
            signalled = time.monotonic()
            assert await flapping.wait(step_s) == 0, flapping.tail()
            stop_times.append(time.monotonic() - signalled)
            await out.wait_for(min(out.progress + 20, len(feed)), step_s, workers=[steady])
            flapping.start()
        await feeding
        await out.wait_all(2 * step_s, workers=[steady, flapping])
        # The last start must be running before the stop this test judges (a SIGTERM during
        # start-up is also exit 0, but then this would not test a running member leaving).
        await wait_for_log(flapping, "worker started", REBALANCE_CYCLES + 1, step_s)
        assert await flapping.stop() == 0, flapping.tail()
        assert await steady.stop() == 0, steady.tail()
    assert steady.count_in_log("worker started") == 1
    report = await pipeline.verify()
    # Partitions handed over cleanly (drained and committed on revoke): no label repeats.
    assert_exact(report, duplicates_allowed=False)
    record_result(
        "rebalance",
        report,
        cycles=REBALANCE_CYCLES,
        max_stop_s=round(max(stop_times), 1),
    )


async def wait_for_log(worker: WorkerProcess, text: str, times: int, timeout_s: float) -> None:
    """Until ``text`` has appeared ``times`` times in the worker's log."""
    deadline = time.monotonic() + timeout_s
    while worker.count_in_log(text) < times:
        assert time.monotonic() < deadline and worker.alive(), worker.tail()
        await asyncio.sleep(0.2)


@pytest.mark.timeout(180 * FAULT_SCALE)
async def test_a_stalled_worker_is_replaced_and_its_late_writes_do_not_double_count(
    harness: Harness,
) -> None:
    pipeline = await harness.pipeline(partitions=4)
    feed = mixed_feed(scaled(600), seed=16)
    await produce_feed(pipeline.bootstrap, pipeline.frames_topic, feed)
    # Slow enough batches that the stalled worker holds some in flight when it is stopped.
    stalled = harness.worker(pipeline, "stalled").start(LOOKOUT_FAULT_INFER_DELAY_MS="200")
    healthy = harness.worker(pipeline, "healthy").start()
    async with OutputWatcher(pipeline, [f.frame_id for f in feed]) as out:
        await out.wait_for(120, 180, workers=[stalled, healthy])
        stalled.send(signal.SIGSTOP)
        stopped_at = time.monotonic()
        # Past the session timeout the group drops it and the healthy worker takes its partitions.
        await asyncio.sleep(SESSION_TIMEOUT_MS / 1000 + 4)
        before = out.progress
        await out.wait_for(before + 60, 180, workers=[healthy])
        taken_over_s = time.monotonic() - stopped_at
        stalled.send(signal.SIGCONT)  # its in-flight batch now writes late
        await out.wait_all(300, workers=[healthy])
        assert await healthy.stop() == 0, healthy.tail()
        code = await stalled.stop()
    assert code == 0, stalled.tail()
    report = await pipeline.verify()
    assert_exact(report, duplicates_allowed=True)
    record_result("stalled-sigstop", report, stalled_s=round(taken_over_s, 1))


@pytest.mark.timeout(120 * FAULT_SCALE)
async def test_inference_slower_than_the_poll_interval_neither_crash_loops_nor_loses(
    harness: Harness,
) -> None:
    pipeline = await harness.pipeline(partitions=2)
    feed = mixed_feed(scaled(200), seed=17)
    await produce_feed(pipeline.bootstrap, pipeline.frames_topic, feed)
    worker = harness.worker(pipeline).start(
        LOOKOUT_FAULT_INFER_DELAY_MS="1500", LOOKOUT_MAX_POLL_INTERVAL_MS="1000"
    )
    async with OutputWatcher(pipeline, [f.frame_id for f in feed]) as out:
        took_s = await out.wait_all(300, workers=[worker])
        assert await worker.stop() == 0, worker.tail()
    log = worker.tail(2000)
    assert worker.count_in_log("worker started") == 1
    assert "commit refused" not in log and "Heartbeat" not in log, log
    report = await pipeline.verify()
    assert_exact(report, duplicates_allowed=False)
    record_result("slow-inference-1500ms", report, took_s=round(took_s, 1))
