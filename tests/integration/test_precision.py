"""``--precision auto`` end to end: the worker serves the engine its decision names, and says so.

Real broker and Redis, ``stream-worker run`` as a child process. The default fp32 and int8
engines are built once into the session's cache (the int8 one, with its agreement measured, takes
about half a minute the first time) and copied into each test's own cache directory, so each
test starts from a cache that holds both engines and decides (or finds a decision) itself.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import onnxruntime
import pytest

from bench.host import free_port
from engine_build.default import ensure_default_engine, ensure_default_int8_engine
from stream_worker import codec
from stream_worker.backends.precision import Choice, decision_key, decision_path, read_cpu, write_decision
from stream_worker.backends.sidecar import read_sidecar, sidecar_path
from stream_worker.pipeline import inference_layout, usable_cores
from tests.conftest import Services
from tests.support.media import street_jpegs
from tests.support.pipeline import produce_frames, read_topic
from tests.support.workers import Harness, Pipeline, WorkerProcess


@pytest.fixture(scope="session")
def default_engines() -> tuple[Path, Path]:
    """The default fp32 and int8 engines in the test session's cache, built on first use."""
    cache = Path(os.environ["LOOKOUT_CACHE_DIR"])
    return ensure_default_engine(cache), ensure_default_int8_engine(cache)


@pytest.fixture
def cache(default_engines: tuple[Path, Path], tmp_path: Path) -> Path:
    """A cache directory of the test's own holding both default engines and no decision."""
    engines = tmp_path / "cache" / "engines"
    engines.mkdir(parents=True)
    for engine in default_engines:
        shutil.copy2(engine, engines / engine.name)
        shutil.copy2(sidecar_path(engine), sidecar_path(engines / engine.name))
    return tmp_path / "cache"


@pytest.fixture
async def harness(services: Services, key_prefix: str, tmp_path: Path) -> AsyncIterator[Harness]:
    """This test's pipeline and worker; the worker is killed and the topics deleted afterwards."""
    h = Harness(services, key_prefix, tmp_path)
    try:
        yield h
    finally:
        await h.close()


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


async def serve_two_frames(
    harness: Harness, cache: Path
) -> tuple[WorkerProcess, Pipeline, list[dict[str, str]], str]:
    """Start a worker with ``--precision auto`` on ``cache``, label two frames; the worker, its
    pipeline, the frames' ``model`` objects and the /metrics page."""
    pipeline = await harness.pipeline(partitions=1)
    port = free_port()
    worker = harness.worker(pipeline)
    worker.start("--precision", "auto", "--metrics-port", str(port), LOOKOUT_CACHE_DIR=str(cache))
    await produce_frames(pipeline.bootstrap, pipeline.frames_topic, [("cam-1", f) for f in street_jpegs(2)])
    try:
        records = await read_topic(pipeline.bootstrap, pipeline.labels_topic, 2, timeout_s=180, settle_s=0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{worker.tail()}") from None
    models = [codec.parse_label_record(r.value)["model"] for r in records]
    return worker, pipeline, models, metrics(port)


def engine_info_line(precision: str, reason: str) -> str:
    return (
        f'lookout_engine_info{{backend="onnxruntime",model="efficientnet-lite0:1.0.0",'
        f'precision="{precision}",reason="{reason}"}} 1.0'
    )


async def test_auto_serves_the_engine_a_cached_decision_names(harness: Harness, cache: Path) -> None:
    fp32 = read_sidecar(cache / "engines" / "efficientnet_lite0-onnxruntime-fp32.onnx")
    int8 = read_sidecar(cache / "engines" / "efficientnet_lite0-onnxruntime-int8.onnx")
    # The key the worker will compute: its threads per session and batch on this machine.
    _, threads = inference_layout(0, 0, "onnxruntime", usable_cores())
    key = decision_key(
        fp32.engine_sha256, int8.engine_sha256, read_cpu(), str(onnxruntime.__version__), threads, 16
    )
    write_decision(decision_path(cache, key), Choice("int8", "int8-pays", "as decided before"), {})

    worker, _, models, page = await serve_two_frames(harness, cache)

    assert {(m["precision"], m["engine_sha256"]) for m in models} == {("int8", int8.engine_sha256)}
    assert engine_info_line("int8", "int8-pays") in page.splitlines()
    assert worker.count_in_log("serving int8: as decided before") == 1
    assert await worker.stop() == 0


async def test_auto_decides_caches_and_serves_its_choice(harness: Harness, cache: Path) -> None:
    worker, _, models, page = await serve_two_frames(harness, cache)

    (decision_file,) = (cache / "engines").glob("precision-*.json")
    decision = json.loads(decision_file.read_text())
    precision, reason = decision["precision"], decision["reason"]
    assert {m["precision"] for m in models} == {precision}
    assert engine_info_line(precision, reason) in page.splitlines()
    # One line says which engine is served and why, as the decision file records it.
    assert worker.count_in_log(f"serving {precision}: {decision['why']}") == 1
    assert worker.count_in_log("serving fp32:") + worker.count_in_log("serving int8:") == 1
    agreement = decision["agreement"]["published_label"]
    assert (precision == "int8") == (agreement >= 0.98 and decision["speedup"] >= 1.3)
    assert await worker.stop() == 0
