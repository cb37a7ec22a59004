"""Which precision the default engine is served in: INT8 where it pays on this CPU, else FP32.

With no ``--engine``, ``--precision`` (``LOOKOUT_PRECISION``) picks the default engine:

- ``fp32`` or ``int8``: that one, built on first use, whatever it costs or agrees;
- ``auto`` (the default): INT8 when both bars are met, FP32 otherwise:

  1. **agreement** of INT8's published labels with FP32's, at least :data:`AGREEMENT_BAR`:
     measured by the engine builder on held-out real frames when it built the INT8 engine, and
     kept in that engine's sidecar (``build.agreement``), so it is read here, never re-measured;
  2. **speed**: INT8 must spend at most ``1 /`` :data:`SPEEDUP_BAR` of FP32's CPU time per image
     on this machine, at the worker's batch size and intra-op threads. Measured at start-up
     (:func:`measure_cpu_time`: a few batches of each engine, interleaved, median CPU time),
     because the CPU's flags only say which kernels ONNX Runtime may use: with 8-bit dot products
     (AVX512-VNNI, AVX-VNNI, AMX) INT8 has measured about 2x FP32's speed, on AVX2 alone it has
     measured slower than FP32 (``docs/MODEL_CARD.md``), so on an x86 CPU with AVX2 and neither
     VNNI nor AMX ``auto`` serves FP32 without building or timing INT8. The flags go into the log
     line and the cache key.

The decision is kept in ``<cache_dir>/engines/precision-<key>.json``, the key made of both engines'
sha256, the CPU's model and flags, ONNX Runtime's version, the threads and the batch size, so a
restart on the same machine does not measure again and anything that could change the answer
does. If building or measuring INT8 fails, ``auto`` serves FP32 and says why (a warning); it
never stops the worker.

The rule (:func:`decide`), the CPU flags (:func:`parse_cpuinfo`) and the cache are pure and
tested without timing; the measurement is injected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from stream_worker.backends.registry import EngineProvider, default_engine_provider, verify_engine
from stream_worker.backends.sidecar import Sidecar
from stream_worker.errors import EngineError
from stream_worker.settings import ENGINE_PRECISIONS

log = logging.getLogger("lookout.engine")

SPEEDUP_BAR = 1.3
"""INT8 is served by ``auto`` only at this multiple of FP32's images per CPU-second or more."""
AGREEMENT_BAR = 0.98
"""... and only when it publishes FP32's label on at least this share of the held-out frames."""
CPU_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip
"""The instruction-set flags that bear on CPU inference speed (kept in reports and the cache key)."""
MEASURE_ROUNDS = 5
MEASURE_BATCHES_PER_ROUND = 2

REASONS = {
    "named": "the engine file named by --engine",
    "pinned": "--precision fp32 or int8 pinned the default engine",
    "int8-pays": "auto: int8 meets both bars on this CPU",
    "int8-slower": f"auto: int8 is under {SPEEDUP_BAR}x fp32's speed on this CPU",
    "int8-disagrees": f"auto: int8 publishes fp32's label on under {AGREEMENT_BAR:.0%} of held-out frames",
    "int8-unavailable": "auto: building or measuring the int8 engine failed",
}
"""The ``reason`` label of ``lookout_engine_info``: why the served engine is served."""


@dataclass(frozen=True, slots=True)
class CpuInfo:
    """The CPU's model name and the flags of :data:`CPU_FLAGS` it has."""

    model: str
    flags: frozenset[str]

    @property
    def int8_instructions(self) -> str:
        """The best 8-bit dot-product instructions it has, in words (``AVX2, no VNNI``)."""
        for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "avx512_vnni"), ("avx_vnni", "avx_vnni")):
            if flag in self.flags:
                return name
        return "AVX2, no VNNI" if "avx2" in self.flags else "no AVX2"

    @property
    def lacks_int8_dot_products(self) -> bool:
        """An x86 CPU with AVX2 but no VNNI or AMX, where ONNX Runtime's int8 has measured slower.

        On the AVX2-only EPYC every int8 recipe ran at 0.53-0.93x fp32 (``docs/MODEL_CARD.md``), so
        ``auto`` neither builds nor times one there. A CPU without AVX2 flags (another
        architecture, say an ARM core with its own dot-product instructions) is measured.
        """
        return "avx2" in self.flags and not self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"}

    def describe(self) -> str:
        """``Intel Xeon ... (avx512_vnni)``: what the start-up line says of the CPU."""
        return f"{self.model} ({self.int8_instructions})"


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and relevant flags, from the text of ``/proc/cpuinfo``."""
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split()) & frozenset(CPU_FLAGS)
        if model and flags:
            break
    return CpuInfo(model or platform.processor() or platform.machine() or "unknown CPU", flags)


def read_cpu(path: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """This machine's :class:`CpuInfo` (no flags where ``/proc/cpuinfo`` cannot be read)."""
    try:
        return parse_cpuinfo(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return parse_cpuinfo("")


@dataclass(frozen=True, slots=True)
class Timing:
    """CPU-milliseconds per image of each engine, the median of interleaved rounds."""

    fp32_cpu_ms: float
    int8_cpu_ms: float

    @property
    def speedup(self) -> float:
        """How many times FP32's CPU time INT8 saves: 2.0 = INT8 takes half."""
        return self.fp32_cpu_ms / self.int8_cpu_ms if self.int8_cpu_ms > 0 else float("inf")


@dataclass(frozen=True, slots=True)
class Choice:
    """Which precision is served, the short reason (:data:`REASONS`) and the words for it."""

    precision: str
    reason: str
    why: str

    @property
    def line(self) -> str:
        """The one start-up log line: ``serving int8: 2.05x fp32's speed on ...``."""
        return f"serving {self.precision}: {self.why}"


def agreement_of(sidecar: Sidecar) -> float | None:
    """The published-label agreement with FP32 an INT8 engine's sidecar keeps, if it keeps one."""
    measured = sidecar.build.get("agreement")
    value = measured.get("published_label") if isinstance(measured, Mapping) else None
    return float(value) if isinstance(value, int | float) else None


def _frames_of(sidecar: Sidecar) -> str:
    measured = sidecar.build.get("agreement")
    frames = measured.get("frames") if isinstance(measured, Mapping) else None
    return f" on {frames} held-out frames" if frames else ""


def without_int8_kernels(cpu: CpuInfo) -> Choice | None:
    """FP32, without building or timing INT8, on a CPU where INT8 has never paid; else ``None``."""
    if not cpu.lacks_int8_dot_products:
        return None
    why = (
        f"{cpu.describe()} has no 8-bit dot-product instructions (VNNI, AMX), where int8 runs "
        "no faster than fp32; --precision int8 serves it anyway"
    )
    return Choice("fp32", "int8-slower", why)


def decide(agreement: float | None, measure: Callable[[], Timing], cpu: CpuInfo) -> Choice:
    """The ``auto`` rule: INT8 iff ``agreement >= AGREEMENT_BAR`` and its speed-up ``>= SPEEDUP_BAR``.

    ``measure`` is called only when the agreement passes: no start-up time is spent timing an
    engine that could not be served anyway.
    """
    if agreement is None:
        return Choice("fp32", "int8-unavailable", "the int8 engine carries no agreement measurement")
    if agreement < AGREEMENT_BAR:
        return Choice(
            "fp32",
            "int8-disagrees",
            f"int8 publishes fp32's label on {agreement:.1%} of held-out frames, under the "
            f"{AGREEMENT_BAR:.0%} bar",
        )
    timing = measure()
    speed = f"{timing.speedup:.2f}x fp32's speed on {cpu.describe()}"
    if timing.speedup < SPEEDUP_BAR:
        return Choice("fp32", "int8-slower", f"int8 is {speed}, under the {SPEEDUP_BAR}x bar")
    return Choice("int8", "int8-pays", f"{speed}, {agreement:.1%} published-label agreement")


def decision_key(
    fp32_sha256: str, int8_sha256: str, cpu: CpuInfo, runtime_version: str, threads: int, batch: int
) -> str:
    """What the decision depends on, hashed: any change to it measures again."""
    # The bars too: a release that moves one must not keep serving decisions made under the old.
    facts = [fp32_sha256, int8_sha256, cpu.model, sorted(cpu.flags), runtime_version, threads, batch]
    facts += [SPEEDUP_BAR, AGREEMENT_BAR]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def decision_path(cache_dir: Path, key: str) -> Path:
    """Where the decision with ``key`` is cached: ``<cache_dir>/engines/precision-<key>.json``."""
    return cache_dir / "engines" / f"precision-{key}.json"


def read_decision(path: Path) -> Choice | None:
    """The cached decision at ``path``; None when there is none or it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        choice = Choice(str(data["precision"]), str(data["reason"]), str(data["why"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return choice if choice.precision in ("fp32", "int8") and choice.reason in REASONS else None


def write_decision(path: Path, choice: Choice, facts: Mapping[str, Any]) -> None:
    """Cache ``choice`` at ``path`` atomically, with the facts it was made on (for a reader)."""
    document = {**asdict(choice), **facts, "decided_at": datetime.now(UTC).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    partial.replace(path)


def measure_cpu_time(
    fp32: Path,
    int8: Path,
    *,
    batch: int,
    threads: int,
    rounds: int = MEASURE_ROUNDS,
    batches_per_round: int = MEASURE_BATCHES_PER_ROUND,
) -> Timing:
    """CPU-ms per image of each engine at ``batch`` images and ``threads`` intra-op threads.

    Both engines are opened as the worker opens them and run round by round on the same batch
    (after one warm-up run each: the first allocates the arena and packs the weights). CPU time
    (``time.process_time``, every ONNX Runtime thread) moves less than wall time when other
    processes share the cores, and interleaving puts both engines under the same load; the median
    round of each is kept.
    """
    from stream_worker.backends.base import EngineInfo
    from stream_worker.backends.onnxruntime import OnnxRuntimeBackend

    backends = {
        name: OnnxRuntimeBackend(EngineInfo.from_sidecar(path, verify_engine(path)), threads=threads)
        for name, path in (("fp32", fp32), ("int8", int8))
    }
    try:
        info = backends["fp32"].info
        size = max(1, min(batch, info.max_batch, backends["int8"].info.max_batch))
        # Preprocessed frames are roughly unit normal; speed does not depend on what they show.
        images = np.random.default_rng(0).standard_normal((size, *info.input_shape)).astype(np.float32)
        for backend in backends.values():
            backend.infer(images)
        cpu_ms: dict[str, list[float]] = {name: [] for name in backends}
        for _ in range(rounds):
            for name, backend in backends.items():
                started = time.process_time()
                for _ in range(batches_per_round):
                    backend.infer(images)
                cpu_ms[name].append(1000 * (time.process_time() - started) / (size * batches_per_round))
    finally:
        for backend in backends.values():
            backend.close()
    return Timing(statistics.median(cpu_ms["fp32"]), statistics.median(cpu_ms["int8"]))


Measure = Callable[..., Timing]
Providers = Callable[[str], EngineProvider]


@dataclass(frozen=True, slots=True)
class Served:
    """The default engine to serve and why (``decision``: the cached decision file it came from)."""

    path: Path
    choice: Choice
    decision: Path | None = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def serve_default(
    cache_dir: Path,
    precision: str,
    *,
    threads: int,
    batch: int,
    providers: Providers = default_engine_provider,
    measure: Measure = measure_cpu_time,
    cpu: CpuInfo | None = None,
    runtime_version: str | None = None,
) -> Served:
    """The default engine in ``precision`` (``auto``: :func:`decide`, cached), logged in one line.

    The engines come from the ``lookout.engines`` providers (built on first use). ``threads`` and
    ``batch`` are the worker's intra-op threads per session and batch size.
    """
    if precision not in ENGINE_PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}: {', '.join(ENGINE_PRECISIONS)}")
    if precision == "fp32":
        served = Served(providers("fp32")(cache_dir), Choice("fp32", "pinned", "pinned by --precision fp32"))
    elif precision == "int8":
        path = providers("int8")(cache_dir)
        sidecar = verify_engine(path)
        agreement = agreement_of(sidecar)
        measured = (
            f"{agreement:.1%} published-label agreement with fp32{_frames_of(sidecar)}"
            if agreement is not None
            else "its agreement with fp32 was not measured"
        )
        served = Served(path, Choice("int8", "pinned", f"pinned by --precision int8; {measured}"))
    else:
        served = _auto(cache_dir, threads, batch, providers, measure, cpu, runtime_version)
    if served.choice.reason == "int8-unavailable":
        log.warning("%s", served.choice.line)
    elif served.decision is not None:
        log.info("%s (decided at an earlier start: %s)", served.choice.line, served.decision)
    else:
        log.info("%s", served.choice.line)
    return served


def _auto(
    cache_dir: Path,
    threads: int,
    batch: int,
    providers: Providers,
    measure: Measure,
    cpu: CpuInfo | None,
    runtime_version: str | None,
) -> Served:
    fp32 = providers("fp32")(cache_dir)  # the fallback itself: its failure stops the worker
    cpu = cpu or read_cpu()
    unpaid = without_int8_kernels(cpu)
    if unpaid is not None:
        return Served(fp32, unpaid)
    try:
        int8 = providers("int8")(cache_dir)
        fp32_sidecar, int8_sidecar = verify_engine(fp32), verify_engine(int8)
        if runtime_version is None:
            import onnxruntime

            runtime_version = str(onnxruntime.__version__)
        batch = max(1, min(batch, fp32_sidecar.max_batch, int8_sidecar.max_batch))
        key = decision_key(
            fp32_sidecar.engine_sha256, int8_sidecar.engine_sha256, cpu, runtime_version, threads, batch
        )
        path = decision_path(cache_dir, key)
        cached = read_decision(path)
        if cached is not None:
            return Served(int8 if cached.precision == "int8" else fp32, cached, path)
        timings: list[Timing] = []

        def timed() -> Timing:
            timings.append(measure(fp32, int8, batch=batch, threads=threads))
            return timings[-1]

        choice = decide(agreement_of(int8_sidecar), timed, cpu)
        facts: dict[str, Any] = {
            "agreement": int8_sidecar.build.get("agreement"),
            "cpu": {"model": cpu.model, "flags": sorted(cpu.flags)},
            "onnxruntime": runtime_version,
            "threads": threads,
            "batch": batch,
            "engines": {"fp32": str(fp32), "int8": str(int8)},
        }
        if timings:
            facts["cpu_ms_per_image"] = {"fp32": timings[0].fp32_cpu_ms, "int8": timings[0].int8_cpu_ms}
            facts["speedup"] = timings[0].speedup
        write_decision(path, choice, facts)
        return Served(int8 if choice.precision == "int8" else fp32, choice)
    except Exception as exc:  # auto never stops the worker over int8: fp32 is served instead
        why = f"int8 is unavailable ({_first_line(exc)}); pin --precision fp32 to skip it"
        return Served(fp32, Choice("fp32", "int8-unavailable", why))
