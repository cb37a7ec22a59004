"""The machine the benchmark runs on: its services, processes, ports and cache folder.

Everything the benchmark reads of the host (``/proc``, ``scripts/services``, a free port) is
here, once. The test harnesses import :func:`free_port` from this module: ``bench`` imports
nothing from ``tests``, so the one copy lives on this side.
"""

from __future__ import annotations

import functools
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

from stream_worker.backends.precision import CPU_FLAGS, read_cpu
from stream_worker.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
SERVICES = REPO / "scripts" / "services"


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


@functools.cache
def cache_dir() -> Path:
    """Where engines and encoded frames are kept between runs: ``bench/`` in the worker's cache dir."""
    return Path(load_settings().engine.cache_dir) / "bench"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_services() -> None:
    """Start (or reuse) Kafka and Redis through ``scripts/services``."""
    subprocess.run([str(SERVICES), "up"], check=True)


def service_endpoints() -> tuple[str, str]:
    """The Kafka bootstrap and Redis URL that ``scripts/services`` reports."""
    lines = subprocess.run(
        [str(SERVICES), "env"], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    env = dict(line.removeprefix("export ").split("=", 1) for line in lines)
    return env["KAFKA_BOOTSTRAP"], env["REDIS_URL"]


def service_pids() -> dict[str, int]:
    """Pids of the broker and Redis started by scripts/services (for the CPU split)."""
    state = Path(os.environ.get("LOOKOUT_STATE_DIR", REPO / ".state"))
    pids = {}
    for name, pidfile in (
        ("broker", state / "kafka" / "kafka.pid"),
        ("redis", state / "redis" / "redis.pid"),
    ):
        try:
            pid = int(pidfile.read_text())
        except (OSError, ValueError):
            continue
        if Path(f"/proc/{pid}").exists():  # a stale pidfile names no process
            pids[name] = pid
    return pids


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its finished children are not counted)."""
    return _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    """:func:`cpu_seconds` of each named process."""
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def host_ticks() -> list[int]:
    """The machine's CPU time by kind since boot (``/proc/stat``'s first line: user, nice, system,
    idle, iowait, irq, softirq, steal), in clock ticks; see :func:`host_load`."""
    return [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def host_load(before: list[int], after: list[int]) -> dict[str, float]:
    """How busy every core was between two :func:`host_ticks` readings, in % of their time:
    ``busy`` (everything but idle and iowait, steal included) and ``steal`` (taken by the
    hypervisor for other guests). A latency run at "80 %" of a capacity measured minutes
    earlier can be nearer 95 % busy on a VM whose speed drifts; this says which it was."""
    delta = [a - b for a, b in zip(after, before, strict=True)]
    total = sum(delta) or 1
    idle = delta[3] + delta[4]
    return {"busy_pct": 100 * (total - idle) / total, "steal_pct": 100 * delta[7] / total}


def spread_pct(values: list[float]) -> float:
    """(max - min) / median of repeated measurements, in %."""
    return 100 * (max(values) - min(values)) / statistics.median(values)


def _stat_cpu_seconds(stat: Path) -> float:
    """utime + stime from a ``/proc`` ``stat`` file (a process's or one of its threads')."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a worker's live threads by stage, from the kernel names its pools give them
    (``stream_worker.threads``): ``event loop`` (the main thread: Kafka, sinks, asyncio),
    ``decode``, ``inference`` (with the taxonomy), ``other``."""
    out = {"event loop": 0.0, "decode": 0.0, "inference": 0.0, "other": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            seconds = _stat_cpu_seconds(task / "stat")
        except OSError:  # the thread ended meanwhile
            continue
        if task.name == str(pid):
            group = "event loop"
        elif comm.startswith("lk-decode"):
            group = "decode"
        elif comm.startswith("lk-infer"):
            group = "inference"
        else:
            group = "other"
        out[group] += seconds
    return out


def split_ms_per_frame(before: dict[str, float], after: dict[str, float], frames: int) -> dict[str, float]:
    """CPU-ms per frame of each group between two :func:`thread_cpu` readings."""
    return {group: 1000 * (after[group] - before[group]) / frames for group in after}


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of a process from /proc, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_model() -> dict[str, object]:
    """The CPU's model name, core count, which of :data:`CPU_FLAGS` it has and its best int8 instructions."""
    cpu = read_cpu()
    return {
        "model": cpu.model,
        "cpus": os.cpu_count(),
        "flags": {f: f in cpu.flags for f in CPU_FLAGS},
        "int8_instructions": cpu.int8_instructions,
    }
