"""Workers as child processes on pipelines of their own, for the fault tier.

``stream-worker run`` runs as a real child process (so that SIGKILL, SIGSTOP and SIGTERM are
real signals to a real process) on a pipeline of its own: a uuid-named frames topic, the output
topics named after it, a consumer group and a Redis key prefix. :class:`Harness` makes a test's
pipelines and workers and cleans them all up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stream_worker.settings import Settings, TopicSettings, load_settings
from stream_worker.verify import VerifyReport, verify
from tests.conftest import REPO, Services

WORKER_BIN = REPO / ".venv" / "bin" / "stream-worker"
EVENT_GAP_S = 30
# Fault tests want rebalances to finish quickly: the broker's minimum session timeout.
SESSION_TIMEOUT_MS = 6000


@dataclass(slots=True)
class Pipeline:
    """One fault test's topics, group, key prefix and the services they live on."""

    bootstrap: str
    redis_url: str
    frames_topic: str
    key_prefix: str
    group: str = field(default_factory=lambda: f"g-{uuid.uuid4().hex[:8]}")

    @property
    def topics(self) -> TopicSettings:
        """Its topics: the output topics are named after the frames topic."""
        return TopicSettings.named_after(self.frames_topic, group=self.group)

    @property
    def labels_topic(self) -> str:
        """Where the worker writes label records."""
        return self.topics.labels_topic

    @property
    def counts_topic(self) -> str:
        """The compacted counts topic."""
        return self.topics.counts_topic

    @property
    def dlq_topic(self) -> str:
        """The dead-letter topic (the worker's default name)."""
        return self.topics.dlq_topic.format(topic=self.frames_topic)

    def flags(self) -> list[str]:
        """Command-line flags of ``stream-worker run`` for this pipeline."""
        topics = self.topics
        return [
            "--bootstrap",
            self.bootstrap,
            "--redis-url",
            self.redis_url,
            "--frames-topic",
            self.frames_topic,
            "--labels-topic",
            topics.labels_topic,
            "--counts-topic",
            topics.counts_topic,
            "--review-topic",
            topics.review_topic,
            "--events-topic",
            topics.events_topic,
            "--group",
            topics.group,
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

    def start(self, *flags: str, **env: str) -> WorkerProcess:
        """Start the worker; ``flags`` follow (and override) the pipeline's, ``env`` adds to (and
        overrides) the constructor's environment."""
        keep = {"LOOKOUT_CACHE_DIR", "LOOKOUT_PRECISION"}  # the test session's cache and fp32 (conftest)
        child_env = {
            k: v
            for k, v in os.environ.items()
            if k in keep or not k.startswith(("LOOKOUT_", "KAFKA_", "REDIS_"))
        }
        child_env.update({"LOOKOUT_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS), "PYTHONUNBUFFERED": "1"})
        child_env.update(self.extra_env)
        child_env.update(env)
        self._log = self.log_path.open("ab")
        self._log.write(f"\n===== start {time.strftime('%H:%M:%S')} env={env}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [str(WORKER_BIN), "run", *self.pipeline.flags(), *flags],
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
        names = [t for t in (pipeline.frames_topic, *pipeline.topics.output_topics()) if t in existing]
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
