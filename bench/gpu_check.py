"""The GPU path, proved in one short run on any machine (five minutes on a GPU with TensorRT).

    python -m bench.gpu_check [--out FILE.json] [--budget-s 300] [--work-dir DIR]
    scripts/gpu-check [the same flags]

Steps, in order. The JSON report is rewritten after each step, and the run stops at the first
missing piece with one line saying what it is (the report's ``missing``):

1. ``gpu``: the NVIDIA driver and a device, asked of ``libcuda`` itself (so a machine without
   CUDA bindings still says which of the two it lacks), then the CUDA binding lookout uses, the
   GPU's name and compute capability;
2. ``cuda_memory``: ``stream_worker.backends.cuda_memory`` against the real driver: pinned and
   device buffers, a copy round trip on a stream, the context pushed and popped on two other
   threads, and free device memory back where it was after open/close cycles;
3. ``tensorrt``: TensorRT (10.x only) and the libraries the remaining steps import;
4. ``build``: fp16 (profile 1/8/32, 1 GiB workspace), then fp32 reusing the timing cache, timed;
5. ``engines``: on one thread, as the worker runs them: batches 1, 5, 8 and 32 (shape, dtype,
   rows summing to 1, batch 1 equal to row 0 of batch 5), top-1 agreement with the CPU fp32
   engine on the development set (at least 99% fp32, 97% fp16) and the largest probability
   difference, open/close twice with device memory back each time, ``infer`` after ``close``
   refused;
6. ``negative``: a sidecar naming another GPU, another TensorRT, a garbage plan: each one line,
   no traceback; a junk timing cache: replaced by a fresh one, with a warning;
7. ``int8`` (when the budget leaves time): build and agreement;
8. ``throughput`` (when the budget leaves time): engine-only images/s by precision and batch
   (``python -m bench``'s GPU section measures the same on real frames; the worker end to end on
   a GPU is measured by neither yet: it needs Kafka and Redis, which this check does not start).

Exit status: 0 when every step that ran passed (``complete`` says whether all of them ran), 1
when a check failed, 2 on a usage error. Nothing here is faked: a step that cannot run says so.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PROFILE = (1, 8, 32)
WORKSPACE_BYTES = 1 << 30
AGREEMENT = {"fp32": 0.99, "fp16": 0.97}
# Batch 1 against row 0 of batch 5: TensorRT may pick other kernels per shape, so equal up to
# the precision's rounding.
SAME_ROW_ATOL = {"fp32": 1e-4, "fp16": 5e-3, "int8": 5e-3}
# Device memory an open/close cycle may leave behind (allocator and lazy-loaded kernel noise);
# the buffers of one backend at max batch 32 are about 20 MiB, so a leak shows.
LEAK_TOLERANCE_BYTES = 8 << 20
# Seconds a step needs left in the budget before it starts (the rest always run).
OPTIONAL_STEPS = {"int8": 120.0, "throughput": 30.0}
CUDA_ERROR_NO_DEVICE = 100


class Missing(Exception):
    """A piece the check needs is not on this machine; the message says which, in one line."""


class Failed(Exception):
    """A check failed; the message says which and by how much, in one line."""


def check(condition: bool, message: str) -> None:
    """Raise ``Failed(message)`` unless ``condition``."""
    if not condition:
        raise Failed(message)


def one_line(exc: BaseException) -> str:
    """An exception as one line: its first line of text, else its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class Run:
    """One run of the check: the report as it grows, and what earlier steps left for later ones."""

    out: Path
    budget_s: float
    work: Path
    started: float = field(default_factory=time.monotonic)
    report: dict[str, Any] = field(default_factory=dict)
    plans: dict[str, Path] = field(default_factory=dict)
    cpu_engine: Path | None = None
    images: Any = None
    image_origin: str = ""

    def remaining_s(self) -> float:
        """Seconds of the budget left."""
        return self.budget_s - (time.monotonic() - self.started)

    def write(self) -> None:
        """Rewrite the report atomically."""
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        partial = self.out.with_name(self.out.name + ".tmp")
        partial.write_text(json.dumps(self.report, indent=2) + "\n")
        partial.replace(self.out)


def say(message: str) -> None:
    """Progress on stderr."""
    print(f"gpu-check: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ 1. gpu


def nvidia_driver() -> dict[str, Any]:
    """The driver and its devices, asked of ``libcuda.so.1`` directly; ``Missing`` without them."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise Missing("no NVIDIA GPU: the NVIDIA driver (libcuda.so.1) is not installed") from None
    status = libcuda.cuInit(0)
    if status == CUDA_ERROR_NO_DEVICE:
        raise Missing("no NVIDIA GPU: the NVIDIA driver is installed but sees no CUDA device")
    if status != 0:
        raise Missing(f"no usable NVIDIA GPU: cuInit returned CUDA error {status}")
    version, count = ctypes.c_int(0), ctypes.c_int(0)
    libcuda.cuDriverGetVersion(ctypes.byref(version))
    libcuda.cuDeviceGetCount(ctypes.byref(count))
    if count.value < 1:
        raise Missing("no NVIDIA GPU: the NVIDIA driver sees no CUDA device")
    found: dict[str, Any] = {
        "driver_cuda_version": f"{version.value // 1000}.{version.value % 1000 // 10}",
        "devices": count.value,
    }
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found["nvidia_smi"] = subprocess.run(
                query, capture_output=True, text=True, timeout=20, check=True
            ).stdout.strip()
    return found


def _binding_hint(driver_cuda_version: str) -> str:
    """A hint when the installed cuda-python is for a newer CUDA major than the driver runs."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("cuda-bindings")
    except PackageNotFoundError:
        return ""
    if int(installed.split(".")[0]) > int(driver_cuda_version.split(".")[0]):
        return (
            f" (cuda-bindings {installed} is for CUDA {installed.split('.')[0]} drivers, this driver runs "
            f"CUDA {driver_cuda_version}: pip install 'cuda-python>=12.8,<13')"
        )
    return ""


def step_gpu(run: Run) -> dict[str, Any]:
    """The driver, the device and the CUDA binding."""
    from stream_worker.backends.cuda_memory import device_info, select_binding
    from stream_worker.errors import EngineError

    detail = nvidia_driver()
    try:
        select_binding()
        info = device_info(0)
    except EngineError as exc:
        raise Missing(one_line(exc) + _binding_hint(detail["driver_cuda_version"])) from None
    detail.update(
        binding=info.binding,
        gpu=info.name,
        compute_capability=f"{info.compute_capability[0]}.{info.compute_capability[1]}",
        memory_gib=round(info.total_memory_bytes / (1 << 30), 1),
    )
    run.report["machine"]["gpu"] = info.name
    return detail


# ---------------------------------------------------------------------------- 2. cuda_memory


def _round_trip(context: Any, shape: tuple[int, ...], seed: int) -> bool:
    """Pinned -> device -> pinned on a fresh stream, in ``context``; True when the bytes survive.

    Everything is freed while the context is current (the stack unwinds before the pop).
    """
    from stream_worker.backends.cuda_memory import current

    with current(context), contextlib.ExitStack() as frees:
        source = context.pinned(shape)
        frees.callback(source.free)
        back = context.pinned(shape)
        frees.callback(back.free)
        device = context.allocate(source.array.nbytes)
        frees.callback(device.free)
        stream = context.stream()
        frees.callback(stream.destroy)
        frees.callback(stream.synchronize)  # callbacks run last-in first-out: synchronize first
        source.array[...] = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        back.array[...] = 0.0
        stream.upload(device, source.array)
        stream.download(back.array, device)
        stream.synchronize()
        return bool(np.array_equal(source.array, back.array))


def _on_thread(work: Callable[[], bool]) -> bool:
    outcome: list[bool | BaseException] = []

    def target() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # carried back to the checking thread
            outcome.append(exc)

    thread = threading.Thread(target=target, name="gpu-check-worker")
    thread.start()
    thread.join()
    (result,) = outcome
    if isinstance(result, BaseException):
        raise result
    return result


def step_cuda_memory(run: Run) -> dict[str, Any]:
    """The CUDA memory module against the real driver, on three threads, with a leak check."""
    from stream_worker.backends.cuda_memory import current, open_device

    batch_shape = (PROFILE[2], 3, 224, 224)  # the TensorRT backend's input at max batch
    witness = open_device(0)  # holds the context between the cycles, so free memory is comparable
    try:
        with current(witness):
            free_before, total = witness.memory()
        check(_round_trip(witness, batch_shape, 1), "a pinned -> device -> pinned copy changed the bytes")
        check(
            _on_thread(lambda: _round_trip(witness, batch_shape, 2)),
            "the round trip failed with the context pushed on another thread",
        )
        check(
            _on_thread(lambda: _round_trip(witness, batch_shape, 3)),
            "the round trip failed with the context pushed on a third thread",
        )
        cycles = 3
        for seed in range(cycles):
            context = open_device(0)
            try:
                check(
                    _round_trip(context, batch_shape, 10 + seed), "a round trip in a reopened context failed"
                )
            finally:
                context.release()
        with current(witness):
            free_after, _ = witness.memory()
    finally:
        witness.release()
    leaked = free_before - free_after
    check(
        leaked <= LEAK_TOLERANCE_BYTES,
        f"{leaked / (1 << 20):.1f} MiB of device memory gone after {cycles} open/close cycles",
    )
    return {
        "binding": witness.info.binding,
        "buffer_mib": round(int(np.prod(batch_shape)) * 4 / (1 << 20), 1),
        "threads": 3,
        "open_close_cycles": cycles,
        "device_memory_lost_mib": round(leaked / (1 << 20), 2),
        "device_memory_total_gib": round(total / (1 << 30), 1),
    }


# ------------------------------------------------------------------------------- 3. tensorrt


def step_tensorrt(run: Run) -> dict[str, Any]:
    """TensorRT 10, and the libraries the build and the comparison import."""
    from stream_worker.backends.tensorrt import import_tensorrt
    from stream_worker.errors import EngineError

    try:
        trt = import_tensorrt()
    except EngineError as exc:
        raise Missing(one_line(exc)) from None
    absent = []
    for module in ("onnx", "onnxruntime", "cv2"):
        try:
            __import__(module)
        except ImportError:
            absent.append(module)
    if absent:
        raise Missing(f"lookout's own dependencies are not installed ({', '.join(absent)}): pip install -e .")
    import onnxruntime

    run.report["machine"]["tensorrt"] = str(trt.__version__)
    return {"tensorrt": str(trt.__version__), "onnxruntime": str(onnxruntime.__version__)}


# ---------------------------------------------------------------------------------- 4. build


def _build(run: Run, precision: str, cache: Path, **kwargs: Any) -> dict[str, Any]:
    from engine_build.default import default_onnx_path
    from engine_build.tensorrt import build_tensorrt_engine

    plan = run.work / f"lite0-{precision}.plan"
    started = time.monotonic()
    sidecar = build_tensorrt_engine(
        default_onnx_path(),
        plan,
        precision=precision,
        batch_profile=PROFILE,
        timing_cache=cache,
        workspace_bytes=WORKSPACE_BYTES,
        progress=False,
        **kwargs,
    )
    run.plans[precision] = plan
    return {
        "seconds": round(time.monotonic() - started, 1),
        "plan_mib": round(plan.stat().st_size / (1 << 20), 1),
        "timing_cache": sidecar.build.get("timing_cache_use"),
        "flags": sidecar.build.get("flags"),
        "gpu": sidecar.gpu_name,
    }


def step_build(run: Run) -> dict[str, Any]:
    """fp16 first (it writes the timing cache), then fp32 reading it."""
    cache = run.work / "lite0.timing-cache"
    fp16 = _build(run, "fp16", cache)
    check(cache.is_file(), "the fp16 build wrote no timing cache")
    fp32 = _build(run, "fp32", cache)
    check(
        fp32["timing_cache"] == "reused",
        f"the fp32 build did not reuse the timing cache ({fp32['timing_cache']})",
    )
    check(fp32["flags"] == {"tf32": False}, f"the fp32 build's flags are {fp32['flags']}, TF32 must be off")
    return {"profile": list(PROFILE), "workspace_mib": WORKSPACE_BYTES >> 20, "fp16": fp16, "fp32": fp32}


# -------------------------------------------------------------------------------- 5. engines


def _images(run: Run) -> tuple[Any, str]:
    """The dev set (``scripts/devset``), else the photos and street frames the dev extra installs."""
    from engine_build.cpu import repo_devset_dir
    from engine_build.imagefolder import bundled_street_and_photo_sources, folder_sources

    if repo_devset_dir().is_dir():
        return folder_sources(repo_devset_dir()), "dev set"
    sources = bundled_street_and_photo_sources(256)
    if not sources:
        raise Missing("no images to compare engines on: run scripts/devset, or pip install -e '.[dev]'")
    return sources, "bundled street frames and photos"


def _exercise(backend: Any, images: Any, precision: str) -> dict[str, Any]:
    """Batches 1, 5, 8 and 32 through an open backend; what was seen."""
    classes = len(backend.info.class_names)
    rows = {}
    for size in (1, 5, 8, 32):
        probs = backend.infer(np.ascontiguousarray(images[:size]))
        check(probs.shape == (size, classes), f"{precision}: batch {size} gave shape {probs.shape}")
        check(probs.dtype == np.float32, f"{precision}: batch {size} gave {probs.dtype}")
        sums = probs.sum(axis=1)
        check(bool(np.allclose(sums, 1.0, atol=1e-2)), f"{precision}: rows sum to {sums.min()}..{sums.max()}")
        rows[size] = probs
    same_row = float(np.abs(rows[1][0] - rows[5][0]).max())
    check(
        same_row <= SAME_ROW_ATOL[precision],
        f"{precision}: batch 1 differs from row 0 of batch 5 by {same_row:.2e}",
    )
    return {"batch1_vs_batch5_row0_max_diff": same_row}


def step_engines(run: Run) -> dict[str, Any]:
    """Each TensorRT engine on this thread against the CPU fp32 engine, opened and closed twice."""
    from engine_build.cpu import build_cpu_engine
    from engine_build.default import default_onnx_path
    from engine_build.evaluate import compare
    from engine_build.imagefolder import iter_batches
    from stream_worker.backends.cuda_memory import device_free_bytes
    from stream_worker.backends.registry import open_backend
    from stream_worker.errors import EngineError
    from stream_worker.taxonomy import Taxonomy

    sources, run.image_origin = _images(run)
    run.cpu_engine = run.work / "lite0-cpu-fp32.onnx"
    build_cpu_engine(default_onnx_path(), run.cpu_engine, precision="fp32", progress=False)
    cpu = open_backend(run.cpu_engine)
    try:
        spec = cpu.info.spec
        run.images = np.concatenate([b.copy() for _, b in iter_batches(sources[:32], spec, 32)])
        if len(run.images) < PROFILE[2]:  # fewer than 32 images: repeat them to fill a batch
            run.images = np.resize(run.images, (PROFILE[2], *run.images.shape[1:]))
        detail: dict[str, Any] = {"images": len(sources), "image_origin": run.image_origin}
        taxonomy = Taxonomy.for_engine(cpu.info)
        for precision in ("fp32", "fp16"):
            free_at = [device_free_bytes()]
            seen: dict[str, Any] = {}
            for cycle in range(2):
                backend = open_backend(run.plans[precision])
                try:
                    if cycle == 0:
                        seen.update(_exercise(backend, run.images, precision))
                        agreement = compare(cpu, backend, sources, taxonomy)
                        seen.update(
                            top1_agreement=agreement.top1_agreement,
                            label_agreement=agreement.label_agreement,
                            max_prob_diff=agreement.max_abs_diff,
                        )
                    else:
                        backend.infer(np.ascontiguousarray(run.images[:8]))
                finally:
                    backend.close()
                free_at.append(device_free_bytes())
            try:
                backend.infer(np.ascontiguousarray(run.images[:1]))
            except EngineError:
                seen["infer_after_close"] = "refused"
            else:
                raise Failed(f"{precision}: infer after close was not refused")
            # The first cycle may load kernels lazily for good; the second must give back all.
            lost = free_at[1] - free_at[2]
            seen["device_memory_lost_second_cycle_mib"] = round(lost / (1 << 20), 2)
            check(lost <= LEAK_TOLERANCE_BYTES, f"{precision}: open/close lost {lost / (1 << 20):.1f} MiB")
            check(
                seen["top1_agreement"] >= AGREEMENT[precision],
                f"{precision}: top-1 agreement with the CPU fp32 engine {seen['top1_agreement']:.3f} "
                f"< {AGREEMENT[precision]}",
            )
            detail[precision] = seen
    finally:
        cpu.close()
    return detail


# ------------------------------------------------------------------------------- 6. negative


def _refused(action: Callable[[], object], expect: str) -> str:
    """The one-line ``EngineError`` that ``action`` must raise, containing ``expect``."""
    from stream_worker.errors import EngineError

    try:
        action()
    except EngineError as exc:
        message = str(exc)
        check("\n" not in message, f"not one line: {message!r}")
        check(expect in message, f"expected {expect!r} in: {message}")
        return message
    raise Failed(f"accepted, expected an error with {expect!r}")


def _with_sidecar(run: Run, name: str, source: Path, data: bytes | None = None, **changes: Any) -> Path:
    import dataclasses

    from engine_build.metadata import write_sidecar
    from stream_worker.backends.sidecar import read_sidecar, sha256_file

    plan = run.work / name
    if data is None:
        shutil.copyfile(source, plan)
    else:
        plan.write_bytes(data)
    sidecar = dataclasses.replace(read_sidecar(source), engine_sha256=sha256_file(plan), **changes)
    write_sidecar(plan, sidecar)
    return plan


def step_negative(run: Run) -> dict[str, Any]:
    """What a user with the wrong engine or cache sees: one line each."""
    from engine_build.tensorrt import load_timing_cache
    from stream_worker.backends.registry import open_backend, verify_engine
    from stream_worker.backends.tensorrt import import_tensorrt

    good = run.plans["fp16"]
    other_gpu = _with_sidecar(run, "other-gpu.plan", good, gpu_name="NVIDIA Imaginary 9000")
    other_trt = _with_sidecar(run, "other-trt.plan", good, runtime_version="10.0.0.6")
    garbage = _with_sidecar(run, "garbage.plan", good, data=np.random.default_rng(0).bytes(64 << 10))
    detail = {
        "other_gpu": _refused(lambda: verify_engine(other_gpu), "built for GPU NVIDIA Imaginary 9000"),
        "other_tensorrt": _refused(lambda: verify_engine(other_trt), "built with tensorrt 10.0.0.6"),
        "garbage_plan": _refused(lambda: open_backend(garbage), "could not deserialize"),
    }
    cli = subprocess.run(
        [sys.executable, "-m", "engine_build.cli", "info", "--engine", str(other_gpu)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    check(
        cli.returncode == 0 and "stale:" in cli.stdout,
        f"engine-build info: {cli.stdout[-300:]}{cli.stderr[-300:]}",
    )
    check("Traceback" not in cli.stderr, "engine-build info printed a traceback")
    junk = run.work / "junk.timing-cache"
    junk.write_bytes(b"not a timing cache" * 100)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.ERROR)
    config = trt.Builder(logger).create_builder_config()
    _cache, how = load_timing_cache(config, junk)
    check(how == "replaced", f"a junk timing cache was {how}, expected replaced")
    detail["junk_timing_cache"] = how
    # After the garbage plan's failed open, its CUDA context was given back: a good one opens.
    backend = open_backend(good)
    backend.close()
    return detail


# ---------------------------------------------------------------------- 7. int8, 8. throughput


def step_int8(run: Run) -> dict[str, Any]:
    """An int8 engine from the TensorRT Q/DQ recipe, and its agreement (reported, not judged)."""
    from engine_build.evaluate import compare
    from stream_worker.backends.registry import open_backend
    from stream_worker.taxonomy import Taxonomy

    detail = _build(run, "int8", run.work / "lite0.timing-cache", calibration_limit=64)
    if run.cpu_engine is None:
        return detail
    sources, _ = _images(run)
    cpu, backend = open_backend(run.cpu_engine), open_backend(run.plans["int8"])
    try:
        detail.update(_exercise(backend, run.images, "int8"))
        agreement = compare(cpu, backend, sources, Taxonomy.for_engine(cpu.info))
        detail.update(top1_agreement=agreement.top1_agreement, max_prob_diff=agreement.max_abs_diff)
    finally:
        backend.close()
        cpu.close()
    return detail


def step_throughput(run: Run) -> dict[str, Any]:
    """Engine-only images/s by precision and batch (one second a point)."""
    from bench.engines import measure
    from stream_worker.backends.registry import open_backend

    rows = []
    for precision, plan in run.plans.items():
        backend = open_backend(plan)
        try:
            for size in (1, 8, 32):
                batch = np.ascontiguousarray(run.images[:size])
                rows.append({"precision": precision, "batch": size, **measure(backend.infer, batch, 1.0)})
        finally:
            backend.close()
    return {"rows": rows, "end_to_end": "not measured here (needs Kafka and Redis)"}


STEPS: tuple[tuple[str, Callable[[Run], dict[str, Any]]], ...] = (
    ("gpu", step_gpu),
    ("cuda_memory", step_cuda_memory),
    ("tensorrt", step_tensorrt),
    ("build", step_build),
    ("engines", step_engines),
    ("negative", step_negative),
    ("int8", step_int8),
    ("throughput", step_throughput),
)


def default_out() -> Path:
    """``bench/results/<date>-<machine>-gpu.json``."""
    return RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-{platform.node() or 'machine'}-gpu.json"


@contextlib.contextmanager
def work_dir(given: Path | None) -> Iterator[Path]:
    """``given`` (kept), else a temporary folder removed afterwards."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="lookout-gpu-check-") as tmp:
        yield Path(tmp)


def run_check(out: Path, budget_s: float, work: Path) -> int:
    """Run every step that can run; write the report after each; the exit status."""
    run = Run(out=out, budget_s=budget_s, work=work)
    run.report.update(
        check="lookout gpu-check",
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        machine={
            "node": platform.node(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        status="running",
        complete=False,
        missing=None,
        failed=None,
        steps={},
    )
    run.write()
    status = "passed"
    for name, step in STEPS:
        needed = OPTIONAL_STEPS.get(name)
        if needed is not None and run.remaining_s() < needed:
            run.report["steps"][name] = {
                "status": "skipped",
                "reason": f"under {needed:.0f} s of budget left",
            }
            say(f"{name}: skipped (under {needed:.0f} s of budget left)")
            status = "incomplete"
            continue
        started = time.monotonic()
        entry: dict[str, Any] = {}
        try:
            entry = {"status": "passed", **step(run)}
        except Missing as exc:
            entry = {"status": "missing", "reason": str(exc)}
            run.report["missing"] = f"{name}: {exc}"
            status = "incomplete"
        except Failed as exc:
            entry = {"status": "failed", "reason": str(exc)}
            run.report["failed"] = f"{name}: {exc}"
            status = "failed"
        except Exception as exc:  # an error the step did not expect: one line here, all in the JSON
            entry = {"status": "failed", "reason": f"{type(exc).__name__}: {one_line(exc)}"}
            entry["traceback"] = traceback.format_exc()
            run.report["failed"] = f"{name}: {entry['reason']}"
            status = "failed"
        entry["seconds"] = round(time.monotonic() - started, 1)
        run.report["steps"][name] = entry
        run.report["status"] = "running"
        run.write()
        reason = f": {entry['reason']}" if "reason" in entry else ""
        say(f"{name}: {entry['status']} ({entry['seconds']} s){reason}")
        if entry["status"] != "passed":
            break
    run.report["status"] = status
    run.report["complete"] = status == "passed"
    run.write()
    if run.report["missing"]:
        say(f"stopped: {run.report['missing']}")
    say(f"report: {out}")
    return 1 if status == "failed" else 0


def main(argv: list[str] | None = None) -> int:
    """Command line; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON report (bench/results/<date>-<machine>-gpu.json)"
    )
    parser.add_argument("--budget-s", type=float, default=300.0, help="time for the optional steps (300 s)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep engines here (default: a temp dir)")
    args = parser.parse_args(argv)
    with work_dir(args.work_dir) as work:
        return run_check(args.out or default_out(), args.budget_s, work)


if __name__ == "__main__":
    sys.exit(main())
