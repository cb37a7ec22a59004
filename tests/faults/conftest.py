"""Fault-injection harness: real frames, workers as subprocesses, private brokers, the verifier.

Every fault test follows one script: produce a seeded mix of real frames from traffic cameras
and camera traps to a multi-partition topic, run ``stream-worker run`` as a child process (so
that SIGKILL, SIGSTOP and SIGTERM are real signals to a real process), inject the fault while
frames flow, wait until every frame has come out (labelled or dead-lettered), stop the workers
cleanly and run :func:`stream_worker.verify.verify` over everything that went in and came out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stream_worker import codec
from stream_worker.frames import SourceKind
from stream_worker.settings import Settings, load_settings
from stream_worker.verify import VerifyReport, dead_letter, verify
from tests.conftest import REPO, SERVICES, Services
from tests.support.media import photo_jpeg, street_jpegs

WORKER_BIN = REPO / ".venv" / "bin" / "stream-worker"
START_MS = 1_790_000_000_000
EVENT_GAP_S = 30
TRAFFIC = tuple(f"cam-{i}" for i in range(6))
WILDLIFE = tuple(f"trap-{i}" for i in range(3))
# Fault tests want rebalances to finish quickly: the broker's minimum session timeout.
SESSION_TIMEOUT_MS = 6000


# --- the feed ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeedFrame:
    """One frame of the seeded feed, with the headers it is produced with."""

    source_id: str
    kind: SourceKind
    frame_id: str
    captured_at_ms: int
    data: bytes


# CI runs the tier at scale 1 (hundreds of frames per test, to fit its time budget);
# LOOKOUT_FAULT_SCALE=4 runs the same faults over thousands of frames.
FAULT_SCALE = float(os.environ.get("LOOKOUT_FAULT_SCALE", "1"))


def scaled(frames: int) -> int:
    """A test's frame count at the configured scale."""
    return max(1, round(frames * FAULT_SCALE))


def mixed_feed(count: int, seed: int) -> list[FeedFrame]:
    """``count`` real frames from 6 street cameras and 3 camera traps, in a seeded order.

    Street cameras show bikes.mp4; camera traps mostly the same street (nothing to count as
    an event) with the cat photo now and then, at uneven intervals around the sequence gap,
    so that camera-trap events open, grow and close.
    """
    rng = random.Random(seed)
    street = street_jpegs(250)
    cat = photo_jpeg("chelsea.png", quality=80)
    clock = dict.fromkeys((*TRAFFIC, *WILDLIFE), START_MS)
    out: list[FeedFrame] = []
    for i in range(count):
        if rng.random() < 0.75:
            source, kind = rng.choice(TRAFFIC), SourceKind.TRAFFIC
            clock[source] += rng.randint(1_000, 9_000)
            data = street[i % len(street)]
        else:
            source, kind = rng.choice(WILDLIFE), SourceKind.WILDLIFE
            clock[source] += rng.choice((2_000, 5_000, 20_000, 45_000, 120_000))
            data = cat if rng.random() < 0.4 else street[i % len(street)]
        out.append(FeedFrame(source, kind, f"{source}/{i}-{seed}", clock[source], data))
    return out


async def produce_feed(
    bootstrap: str, topic: str, feed: Sequence[FeedFrame], *, chunk: int = 50, pause_s: float = 0.0
) -> None:
    """Produce the feed keyed by source (one source, one partition) with an idempotent producer.

    With ``pause_s`` it is produced in chunks, so that it keeps flowing while a fault is injected.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5, max_request_size=30_000_000
    )
    await producer.start()
    try:
        for start in range(0, len(feed), chunk):
            futures = []
            for f in feed[start : start + chunk]:
                headers = codec.frame_headers(f.source_id, f.kind, f.frame_id, f.captured_at_ms, "image/jpeg")
                futures.append(await producer.send(topic, f.data, key=f.source_id.encode(), headers=headers))
            await asyncio.gather(*futures)
            if pause_s:
                await asyncio.sleep(pause_s)
    finally:
        await producer.stop()


# --- the pipeline under test -------------------------------------------------------------------


@dataclass(slots=True)
class Pipeline:
    """One fault test's topics, group, key prefix and the services they live on."""

    bootstrap: str
    redis_url: str
    frames_topic: str
    key_prefix: str
    group: str = field(default_factory=lambda: f"g-{uuid.uuid4().hex[:8]}")

    @property
    def labels_topic(self) -> str:
        """Where the worker writes label records."""
        return f"{self.frames_topic}.labels"

    @property
    def counts_topic(self) -> str:
        """The compacted counts topic."""
        return f"{self.frames_topic}.counts"

    @property
    def dlq_topic(self) -> str:
        """The dead-letter topic (the worker's default name)."""
        return f"{self.frames_topic}.dlq"

    def flags(self) -> list[str]:
        """Command-line flags of ``stream-worker run`` for this pipeline."""
        return [
            "--bootstrap",
            self.bootstrap,
            "--redis-url",
            self.redis_url,
            "--frames-topic",
            self.frames_topic,
            "--labels-topic",
            self.labels_topic,
            "--counts-topic",
            self.counts_topic,
            "--review-topic",
            f"{self.frames_topic}.review",
            "--group",
            self.group,
            "--key-prefix",
            self.key_prefix,
            "--metrics-port",
            "0",
            "--max-wait-ms",
            "20",
            "--drain-deadline-s",
            "20",
            "--event-gap-s",
            str(EVENT_GAP_S),
            "--windows",
            "1m,15m",
        ]

    def settings(self) -> Settings:
        """The same settings for the verifier."""
        flags = {
            "bootstrap": self.bootstrap,
            "redis_url": self.redis_url,
            "frames_topic": self.frames_topic,
            "labels_topic": self.labels_topic,
            "counts_topic": self.counts_topic,
            "key_prefix": self.key_prefix,
            "event_gap_s": str(EVENT_GAP_S),
            "windows": "1m,15m",
        }
        return load_settings(flags=flags, env={})

    async def verify(self) -> VerifyReport:
        """Run the verifier over this pipeline."""
        return await verify(self.settings())


class WorkerProcess:
    """``stream-worker run`` as a child process with its own log file."""

    def __init__(self, pipeline: Pipeline, log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.pipeline = pipeline
        self.log_path = log_path
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, **env: str) -> WorkerProcess:
        """Start the worker; ``env`` adds to (and overrides) the constructor's environment."""
        child_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("LOOKOUT_", "KAFKA_", "REDIS_"))
        }
        child_env.update({"LOOKOUT_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS), "PYTHONUNBUFFERED": "1"})
        child_env.update(self.extra_env)
        child_env.update(env)
        self._log = self.log_path.open("ab")
        self._log.write(f"\n===== start {time.strftime('%H:%M:%S')} env={env}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [str(WORKER_BIN), "run", *self.pipeline.flags()],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=REPO,
        )
        return self

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the child is still running."""
        return self.proc is not None and self.proc.poll() is None

    def send(self, signum: int) -> None:
        """Send a signal to the child."""
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout_s: float) -> int:
        """Wait for the child to exit; its return code (negative: killed by that signal)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {self.pid} still running after {timeout_s} s\n{self.tail()}")
            await asyncio.sleep(0.1)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    async def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM (drain) and wait; the exit code."""
        if self.alive():
            self.send(signal.SIGTERM)
        return await self.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL (cleanup; a no-op when already gone)."""
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, lines: int = 40) -> str:
        """The end of the worker's log, for failure messages."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def count_in_log(self, text: str) -> int:
        """How often ``text`` appears in the log (e.g. 'worker started')."""
        return self.log_path.read_text(errors="replace").count(text) if self.log_path.exists() else 0


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


# --- fixtures ----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class PrivateServices:
    """A broker or Redis of one test's own, driven through scripts/services with env overrides."""

    env: dict[str, str]

    def run(self, *args: str, timeout_s: float = 180) -> None:
        """``scripts/services ARGS`` against this private instance."""
        result = subprocess.run(
            [str(SERVICES), *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if result.returncode != 0:
            raise AssertionError(f"scripts/services {' '.join(args)} failed:\n{result.stderr}")


@pytest.fixture
def private_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, PrivateServices]]:
    """A second Kafka broker with its own ports and state dir (the fault kills it)."""
    port, controller = free_port(), free_port()
    svc = PrivateServices(
        {
            "LOOKOUT_KAFKA_PORT": str(port),
            "LOOKOUT_KAFKA_CONTROLLER_PORT": str(controller),
            "LOOKOUT_STATE_DIR": str(tmp_path_factory.mktemp("kafka-state")),
            "LOOKOUT_KAFKA_HEAP": "512m",
        }
    )
    svc.run("up", "kafka")
    try:
        yield f"127.0.0.1:{port}", svc
    finally:
        svc.run("kill", "kafka")


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, PrivateServices]]:
    """A second Redis with its own port and state dir (the fault stops it)."""
    port = free_port()
    svc = PrivateServices(
        {"LOOKOUT_REDIS_PORT": str(port), "LOOKOUT_STATE_DIR": str(tmp_path_factory.mktemp("redis-state"))}
    )
    svc.run("up", "redis")
    try:
        yield f"redis://127.0.0.1:{port}/0", svc
    finally:
        svc.run("kill", "redis")


async def create_topic(bootstrap: str, prefix: str, partitions: int) -> str:
    """A uuid-named topic on ``bootstrap``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        await admin.create_topics([NewTopic(name, partitions, 1)])
        return name
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, pipeline: Pipeline) -> None:
    """Remove a pipeline's topics (best effort: cleanup must not hide the test's result)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    with contextlib.suppress(Exception):
        await admin.start()
        existing = set(await admin.list_topics())
        names = [
            t
            for t in (
                pipeline.frames_topic,
                pipeline.labels_topic,
                pipeline.counts_topic,
                pipeline.dlq_topic,
                f"{pipeline.frames_topic}.review",
            )
            if t in existing
        ]
        if names:
            await admin.delete_topics(names)
    with contextlib.suppress(Exception):
        await admin.close()


class Harness:
    """Makes one test's pipelines and workers and cleans them all up."""

    def __init__(self, services: Services, key_prefix: str, log_dir: Path) -> None:
        self.services = services
        self.key_prefix = key_prefix
        self.log_dir = log_dir
        self.workers: list[WorkerProcess] = []
        self.pipelines: list[Pipeline] = []

    async def pipeline(
        self, *, partitions: int = 4, bootstrap: str | None = None, redis_url: str | None = None
    ) -> Pipeline:
        """A fresh frames topic (uuid name), group and key prefix."""
        server = bootstrap or self.services.bootstrap
        topic = await create_topic(server, "faults", partitions)
        pipeline = Pipeline(server, redis_url or self.services.redis_url, topic, self.key_prefix)
        self.pipelines.append(pipeline)
        return pipeline

    def worker(self, pipeline: Pipeline, name: str = "worker", **env: str) -> WorkerProcess:
        """A worker process (not started yet) logging to ``<tmp>/<name>.log``."""
        w = WorkerProcess(pipeline, self.log_dir / f"{name}.log", env)
        self.workers.append(w)
        return w

    async def close(self) -> None:
        """Kill what still runs, delete the topics."""
        for w in self.workers:
            w.kill()
        for p in self.pipelines:
            await delete_topics(p.bootstrap, p)


@pytest.fixture
async def harness(services: Services, key_prefix: str, tmp_path: Path) -> AsyncIterator[Harness]:
    """One test's pipelines and workers; every worker left running is killed afterwards."""
    h = Harness(services, key_prefix, tmp_path)
    try:
        yield h
    finally:
        await h.close()


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
