"""Metrics exposition, health endpoints and JSON logs, without any service."""

from __future__ import annotations

import asyncio
import json
import logging

from stream_worker.observability import HealthServer, JsonFormatter, Metrics


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


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


def test_json_logs_are_one_object_per_line_with_extra_fields() -> None:
    record = logging.makeLogRecord(
        {"name": "lookout.worker", "levelname": "WARNING", "msg": "retry %d", "args": (2,), "partition": 3}
    )
    line = JsonFormatter().format(record)
    payload = json.loads(line)
    assert payload["msg"] == "retry 2" and payload["level"] == "WARNING" and payload["partition"] == 3
    assert "\n" not in line
