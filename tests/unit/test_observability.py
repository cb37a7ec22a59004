"""Metrics exposition, health endpoints and JSON logs, without any service."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping

import pytest
from aiokafka.errors import GroupAuthorizationFailedError, GroupCoordinatorNotAvailableError
from prometheus_client import Gauge

from stream_worker.counting import DriftSnapshot
from stream_worker.observability import OVERFLOW_SOURCE, HealthServer, JsonFormatter, Metrics, setup_logging
from stream_worker.pipeline import Batch


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def drift_batch(shares: Mapping[str, Mapping[str, float]]) -> Batch:
    """A batch whose classification left these label shares per source."""
    return Batch(opened_at=0.0, drift={s: DriftSnapshot(10, 0.5, dict(m)) for s, m in shares.items()})


def drift_series(page: str) -> dict[str, set[str]]:
    """Per ``source`` label value on the /metrics page: the drift metrics it has series in."""
    out: dict[str, set[str]] = {}
    for name, source in re.findall(r'^(lookout_drift_\w+)\{[^}]*source="([^"]*)"', page, re.MULTILINE):
        out.setdefault(source, set()).add(name)
    return out


async def test_metrics_and_probes_are_served() -> None:
    metrics = Metrics()
    metrics.frames_in.labels("frames").inc(3)
    metrics.frames_dead.labels("guard", "too_large").inc()
    state = {"ready": False}
    server = HealthServer(metrics, ready=lambda: (state["ready"], "starting"), live=lambda: (True, "ok"))
    port = await server.start("127.0.0.1", 0)
    try:
        status, body = await http_get(port, "/metrics")
        assert status == 200
        assert 'lookout_frames_in_total{topic="frames"} 3.0' in body
        assert 'lookout_frames_dead_lettered_total{reason="too_large",stage="guard"} 1.0' in body
        assert (await http_get(port, "/healthz"))[0] == 200
        assert await http_get(port, "/readyz") == (503, "starting\n")
        state["ready"] = True
        assert (await http_get(port, "/readyz"))[0] == 200
        assert (await http_get(port, "/nope"))[0] == 404
    finally:
        await server.stop()


async def test_metrics_page_says_whether_the_worker_is_ready_at_each_scrape() -> None:
    # Readiness changes with the clock (no poll for 30 s) as well as on events: the gauge is
    # what /readyz answers at the moment of the scrape, so an alert can fire on it.
    metrics = Metrics()
    state = {"ready": False}
    server = HealthServer(metrics, ready=lambda: (state["ready"], "starting"), live=lambda: (True, "ok"))
    port = await server.start("127.0.0.1", 0)
    try:
        assert "\nlookout_ready 0.0\n" in (await http_get(port, "/metrics"))[1]
        state["ready"] = True
        assert "\nlookout_ready 1.0\n" in (await http_get(port, "/metrics"))[1]
        state["ready"] = False
        assert "\nlookout_ready 0.0\n" in (await http_get(port, "/metrics"))[1]
    finally:
        await server.stop()


def test_a_partition_that_left_the_worker_loses_its_lag_series() -> None:
    # Left at its last value, the lag of a partition now owned by another worker would be
    # summed with the new owner's, and keep a lag alert firing.
    metrics = Metrics()
    metrics.consumer_lag({("frames", 0): 5, ("frames", 1): 700}, assigned={("frames", 0), ("frames", 1)})
    page = metrics.render().decode()
    assert 'lookout_consumer_lag{partition="1",topic="frames"} 700.0' in page
    # Partition 1 moved away; partition 0's position could not be read this time.
    metrics.consumer_lag({}, assigned={("frames", 0)})
    page = metrics.render().decode()
    assert 'partition="1"' not in page
    assert 'lookout_consumer_lag{partition="0",topic="frames"} 5.0' in page
    metrics.consumer_lag({("frames", 1): 3}, assigned={("frames", 1)})
    page = metrics.render().decode()
    assert 'partition="0"' not in page
    assert 'lookout_consumer_lag{partition="1",topic="frames"} 3.0' in page


def test_json_logs_are_one_object_per_line_with_extra_fields() -> None:
    record = logging.makeLogRecord(
        {"name": "lookout.worker", "levelname": "WARNING", "msg": "retry %d", "args": (2,), "partition": 3}
    )
    line = JsonFormatter().format(record)
    payload = json.loads(line)
    assert payload["msg"] == "retry 2" and payload["level"] == "WARNING" and payload["partition"] == 3
    assert "\n" not in line


def test_per_source_series_are_capped_and_sources_beyond_the_cap_are_reported_as_other() -> None:
    metrics = Metrics(max_sources=50, source_idle_s=3600, clock_ms=lambda: 0.0)
    for first in range(0, 500, 10):
        metrics.published(drift_batch({f"cam-{i}": {"car": 1.0} for i in range(first, first + 10)}), review=0)
    by_source = drift_series(metrics.render().decode())
    assert len(by_source) == 51
    assert set(by_source) == {f"cam-{i}" for i in range(50)} | {OVERFLOW_SOURCE}
    assert by_source[OVERFLOW_SOURCE] == {"lookout_drift_low_confidence_share", "lookout_drift_label_share"}
    assert metrics.sources_with_series == 50


def test_idle_sources_lose_their_series_and_make_room_for_new_ones() -> None:
    now = [0.0]
    metrics = Metrics(max_sources=2, source_idle_s=60, clock_ms=lambda: now[0])
    metrics.published(
        drift_batch({"cam-a": {"car": 1.0}, "cam-b": {"bus": 1.0}, "cam-c": {"car": 1.0}}), review=0
    )
    assert set(drift_series(metrics.render().decode())) == {"cam-a", "cam-b", OVERFLOW_SOURCE}
    now[0] = 30_000.0
    metrics.published(drift_batch({"cam-a": {"car": 1.0}}), review=0)
    now[0] = 60_000.0  # cam-b, cam-c (in _other) unseen for a minute, cam-a for 30 s
    metrics.published(drift_batch({"cam-d": {"deer": 1.0}}), review=0)
    page = metrics.render().decode()
    assert set(drift_series(page)) == {"cam-a", "cam-d"}
    assert 'label="bus"' not in page


def test_a_label_that_left_the_window_has_no_stale_series() -> None:
    metrics = Metrics()
    metrics.published(drift_batch({"cam-1": {"car": 0.5, "bus": 0.5}}), review=0)
    metrics.published(drift_batch({"cam-1": {"car": 1.0}}), review=0)
    page = metrics.render().decode()
    assert 'lookout_drift_label_share{label="car",source="cam-1"} 1.0' in page
    assert 'label="bus"' not in page


async def test_a_slow_metrics_page_renders_off_the_event_loop() -> None:
    # A registry with 50,000 series takes about as long to render as 10,000 sources' drift
    # series did; a loop heartbeat every 5 ms must keep beating while /metrics is served.
    metrics = Metrics()
    big = Gauge("lookout_test_many", "many series", ["n"], registry=metrics.registry)
    for i in range(50_000):
        big.labels(str(i)).set(i)
    started = time.perf_counter()
    metrics.render()
    render_s = time.perf_counter() - started
    assert render_s > 0.2, f"the registry rendered in {render_s:.3f} s: too fast to show anything"
    server = HealthServer(metrics, ready=lambda: (True, "ready"), live=lambda: (True, "ok"))
    port = await server.start("127.0.0.1", 0)
    beats: list[float] = []

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(0.005)
            beats.append(time.perf_counter())

    beating = asyncio.create_task(heartbeat())
    try:
        await asyncio.sleep(0.05)
        asked = time.perf_counter()
        status, body = await http_get(port, "/metrics")
        answered = time.perf_counter()
    finally:
        beating.cancel()
        await server.stop()
    assert status == 200 and 'lookout_test_many{n="49999"} 49999.0' in body
    # Rendered on the loop, the loop could not beat at all while the page was made (one or two
    # beats at either end); rendered on a thread, it keeps beating (counted, not timed: how
    # regularly it beats depends on the machine's load, whether it beats does not).
    during = sum(asked < t < answered for t in beats)
    assert during >= 10, (
        f"{during} loop beats in {answered - asked:.3f} s of rendering (render {render_s:.3f} s)"
    )


@pytest.fixture
def logging_as_the_cli_sets_it() -> Iterator[Callable[[], str]]:
    """``setup_logging`` as every command calls it; yields what it has written so far."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("aiokafka").level)
    setup_logging("INFO", "text")
    written = io.StringIO()
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(written)
    try:
        yield written.getvalue
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("aiokafka").setLevel(saved[2])
        for name in ("aiokafka", "aiokafka.consumer.group_coordinator"):
            for kafka_filter in logging.getLogger(name).filters[:]:
                logging.getLogger(name).removeFilter(kafka_filter)


def test_a_fresh_brokers_coordinator_start_up_is_not_logged_as_an_error(
    logging_as_the_cli_sets_it: Callable[[], str],
) -> None:
    # What aiokafka logs, word for word, at every first start against a fresh broker (the
    # consumer-offsets topic does not exist yet): it retries, and the worker then starts.
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    coordinator.error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
    coordinator.warning("Marking the coordinator dead (node %s)for group %s.", 1, "lookout")
    logged = logging_as_the_cli_sets_it()
    assert "GroupCoordinatorNotAvailableError" in logged and "Marking the coordinator dead" in logged
    assert "ERROR" not in logged and "WARNING" not in logged, logged


def test_real_kafka_client_errors_stay_errors(logging_as_the_cli_sets_it: Callable[[], str]) -> None:
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    coordinator.error("Group Coordinator Request failed: %s", GroupAuthorizationFailedError())
    logging.getLogger("aiokafka").error("Unable connect to node with id %s: %s", 1, "refused")
    logged = logging_as_the_cli_sets_it()
    assert logged.count(" ERROR aiokafka") == 2, logged


def test_a_bootstrap_failure_lookout_reports_itself_is_not_logged_twice(
    logging_as_the_cli_sets_it: Callable[[], str],
) -> None:
    # The start() that logs it raises, and lookout says "cannot reach Kafka at ..." in one line.
    logging.getLogger("aiokafka").error('Unable connect to "%s:%s": %s', "127.0.0.1", 1, "refused")
    assert logging_as_the_cli_sets_it() == ""
