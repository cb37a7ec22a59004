"""The default engine's precision: the CPU's flags, the ``auto`` rule, its cache and its fallback.

The timing is injected (a stand-in ``measure``), so no test depends on how fast this machine is;
the engines are tiny real ONNX Runtime engines, the second one standing in for the int8 engine
with the agreement its builder would record.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine_build.cpu import build_cpu_engine
from engine_build.metadata import write_sidecar
from stream_worker.backends.precision import (
    AGREEMENT_BAR,
    SPEEDUP_BAR,
    Choice,
    CpuInfo,
    Timing,
    decide,
    decision_key,
    measure_cpu_time,
    parse_cpuinfo,
    serve_default,
)
from stream_worker.backends.registry import EngineProvider
from stream_worker.backends.sidecar import read_sidecar
from stream_worker.errors import ConfigError, EngineError
from stream_worker.service import check_engine
from stream_worker.settings import load_settings
from tests.unit.engine_fixtures import build_tiny_onnx

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx_vnni amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx_vnni amx_tile amx_int8
"""
EPYC = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma
"""
ICE_LAKE = CpuInfo("Intel(R) Xeon(R) Processor", frozenset({"avx2", "avx512f", "avx512_vnni"}))
AVX2 = CpuInfo("AMD EPYC 7B12", frozenset({"avx2", "fma"}))
SAPPHIRE_RAPIDS = CpuInfo("Intel(R) Xeon(R) Platinum 8480+", frozenset({"avx2", "avx512_vnni", "amx_int8"}))


def never_measured() -> Timing:
    raise AssertionError("measured the speed although the agreement already decided")


# ----------------------------------------------------------------------------- the CPU


def test_cpuinfo_gives_the_model_and_the_int8_instructions_of_the_first_processor() -> None:
    xeon = parse_cpuinfo(XEON)
    assert xeon.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"amx_int8", "avx512_vnni", "avx_vnni", "avx2"} <= xeon.flags
    assert "fpu" not in xeon.flags  # only the flags that bear on inference are kept
    assert xeon.int8_instructions == "AMX"
    epyc = parse_cpuinfo(EPYC)
    assert epyc.describe() == "AMD EPYC 7B12 (AVX2, no VNNI)"
    assert ICE_LAKE.describe() == "Intel(R) Xeon(R) Processor (avx512_vnni)"
    laptop = parse_cpuinfo("model name\t: Intel(R) Core(TM) Ultra 7\nflags\t: avx2 avx_vnni\n")
    assert laptop.int8_instructions == "avx_vnni"


def test_unreadable_cpuinfo_still_names_a_cpu_and_has_no_flags() -> None:
    cpu = parse_cpuinfo("")
    assert cpu.model and cpu.flags == frozenset()
    assert cpu.int8_instructions == "no AVX2"


# ----------------------------------------------------------------------------- the rule


def test_int8_is_served_when_it_is_fast_enough_and_agrees() -> None:
    choice = decide(0.985, lambda: Timing(10.0, 10.0 / 2.05), ICE_LAKE)
    assert (choice.precision, choice.reason) == ("int8", "int8-pays")
    assert choice.line == (
        "serving int8: 2.05x fp32's speed on Intel(R) Xeon(R) Processor (avx512_vnni), "
        "98.5% published-label agreement"
    )


@pytest.mark.parametrize(
    ("speedup", "served"), [(SPEEDUP_BAR, "int8"), (SPEEDUP_BAR - 0.01, "fp32"), (0.93, "fp32")]
)
def test_the_speed_bar_is_inclusive(speedup: float, served: str) -> None:
    choice = decide(AGREEMENT_BAR, lambda: Timing(speedup * 4.0, 4.0), AVX2)
    assert choice.precision == served
    if served == "fp32":
        assert choice.reason == "int8-slower"
        assert f"int8 is {speedup:.2f}x fp32's speed on AMD EPYC 7B12 (AVX2, no VNNI)" in choice.line


def test_int8_that_disagrees_is_not_timed_and_not_served() -> None:
    choice = decide(0.979, never_measured, ICE_LAKE)
    assert (choice.precision, choice.reason) == ("fp32", "int8-disagrees")
    assert "97.9%" in choice.line and "98% bar" in choice.line


def test_int8_without_an_agreement_measurement_is_not_served() -> None:
    choice = decide(None, never_measured, ICE_LAKE)
    assert (choice.precision, choice.reason) == ("fp32", "int8-unavailable")


def test_the_decision_key_changes_with_everything_the_decision_depends_on() -> None:
    base: dict[str, Any] = dict(
        fp32_sha256="a" * 64,
        int8_sha256="b" * 64,
        cpu=ICE_LAKE,
        runtime_version="1.32.0",
        threads=1,
        batch=16,
    )
    changes: list[dict[str, Any]] = [
        {"fp32_sha256": "c" * 64},
        {"int8_sha256": "c" * 64},
        {"cpu": dataclasses.replace(ICE_LAKE, model="Intel(R) Xeon(R) Gold 6338")},
        {"cpu": dataclasses.replace(ICE_LAKE, flags=ICE_LAKE.flags | {"amx_int8"})},
        {"runtime_version": "1.33.0"},
        {"threads": 2},
        {"batch": 8},
    ]
    keys = {decision_key(**base)} | {decision_key(**(base | change)) for change in changes}
    assert len(keys) == 1 + len(changes)
    assert decision_key(**base) == decision_key(**base)


# ----------------------------------------------------------------------------- serving the default engine


@dataclasses.dataclass
class Engines:
    fp32: Path
    int8: Path

    def providers(self, *, int8: EngineProvider | None = None) -> Callable[[str], EngineProvider]:
        chosen: dict[str, EngineProvider] = {
            "fp32": lambda cache: self.fp32,
            "int8": int8 or (lambda cache: self.int8),
        }
        return chosen.__getitem__


def with_agreement(engine: Path, published_label: float | None) -> None:
    """Make ``engine``'s sidecar say it is int8 and carries (or not) a measured agreement."""
    sidecar = read_sidecar(engine)
    build = dict(sidecar.build)
    build.pop("agreement", None)
    if published_label is not None:
        build["agreement"] = {"published_label": published_label, "top1": 0.9, "frames": 401}
    write_sidecar(engine, dataclasses.replace(sidecar, precision="int8", build=build))


@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("precision-engines")
    fp32, int8 = root / "fp32.onnx", root / "int8.onnx"
    build_cpu_engine(
        build_tiny_onnx(root / "a.onnx", seed=0), fp32, precision="fp32", batch_profile=(1, 8, 32)
    )
    build_cpu_engine(
        build_tiny_onnx(root / "b.onnx", seed=1), int8, precision="fp32", batch_profile=(1, 8, 32)
    )
    return fp32, int8


@pytest.fixture
def engines(tiny_engines: tuple[Path, Path], tmp_path: Path) -> Engines:
    """Copies of the tiny engines (a test may rewrite their sidecars), the int8 one agreeing 98.5 %."""
    copies = []
    for path in tiny_engines:
        for name in (path.name, path.name + ".json"):
            (tmp_path / name).write_bytes((path.parent / name).read_bytes())
        copies.append(tmp_path / path.name)
    found = Engines(*copies)
    with_agreement(found.int8, 0.985)
    return found


class Timer:
    """A stand-in measurement: returns the given timing and counts its calls."""

    def __init__(self, fp32_cpu_ms: float, int8_cpu_ms: float) -> None:
        self.timing = Timing(fp32_cpu_ms, int8_cpu_ms)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, fp32: Path, int8: Path, **kwargs: Any) -> Timing:
        self.calls.append({"fp32": fp32, "int8": int8, **kwargs})
        return self.timing


def auto(engines: Engines, cache: Path, measure: Timer, **kwargs: Any) -> Any:
    options: dict[str, Any] = dict(
        threads=1, batch=16, providers=engines.providers(), cpu=ICE_LAKE, runtime_version="1.32.0"
    )
    return serve_default(cache, "auto", measure=measure, **(options | kwargs))


def test_auto_measures_once_then_serves_the_cached_decision(
    engines: Engines, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    fast = Timer(10.0, 5.0)
    served = auto(engines, cache, fast)
    assert served.path == engines.int8 and served.choice.reason == "int8-pays"
    assert fast.calls == [{"fp32": engines.fp32, "int8": engines.int8, "batch": 16, "threads": 1}]
    (decision,) = (cache / "engines").glob("precision-*.json")
    cached = json.loads(decision.read_text())
    assert cached["precision"] == "int8" and cached["speedup"] == 2.0 and cached["threads"] == 1
    assert cached["cpu"]["model"] == ICE_LAKE.model

    # A restart on the same machine: the decision file answers, nothing is measured.
    again = Timer(10.0, 50.0)
    with caplog.at_level(logging.INFO, logger="lookout.engine"):
        assert auto(engines, cache, again).choice == served.choice
    assert again.calls == []
    assert caplog.messages == [f"{served.choice.line} (decided at an earlier start: {decision})"]


def test_a_change_of_threads_cpu_or_engine_measures_again(engines: Engines, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    auto(engines, cache, Timer(10.0, 5.0))
    slow = Timer(10.0, 9.0)
    assert auto(engines, cache, slow, threads=2).choice.reason == "int8-slower"
    assert auto(engines, cache, slow, cpu=SAPPHIRE_RAPIDS).path == engines.fp32
    assert len(slow.calls) == 2
    # A rebuilt int8 engine (another file, another sha256) is a new question too.
    engines.int8.write_bytes(engines.fp32.read_bytes())
    sidecar = read_sidecar(engines.fp32)
    write_sidecar(engines.int8, dataclasses.replace(sidecar, build={"agreement": {"published_label": 0.99}}))
    assert auto(engines, cache, slow).choice.reason == "int8-slower"
    assert len(slow.calls) == 3
    assert len(list((cache / "engines").glob("precision-*.json"))) == 4


def test_a_damaged_decision_file_is_measured_again(engines: Engines, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    auto(engines, cache, Timer(10.0, 5.0))
    (decision,) = (cache / "engines").glob("precision-*.json")
    decision.write_text("{not json")
    timer = Timer(10.0, 5.0)
    assert auto(engines, cache, timer).path == engines.int8
    assert len(timer.calls) == 1


def test_auto_serves_fp32_when_int8_disagrees_without_timing_it(engines: Engines, tmp_path: Path) -> None:
    with_agreement(engines.int8, 0.96)
    timer = Timer(10.0, 2.0)
    served = auto(engines, tmp_path, timer)
    assert served.path == engines.fp32 and served.choice.reason == "int8-disagrees"
    assert timer.calls == []


def test_auto_falls_back_to_fp32_with_one_warning_when_int8_cannot_be_built(
    engines: Engines, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(cache: Path) -> Path:
        raise EngineError("calibration failed:\nint8 needs calibration images")

    timer = Timer(10.0, 5.0)
    with caplog.at_level(logging.INFO, logger="lookout.engine"):
        served = auto(engines, tmp_path, timer, providers=engines.providers(int8=broken))
    assert served.path == engines.fp32 and served.choice.reason == "int8-unavailable"
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "serving fp32: int8 is unavailable (EngineError: calibration failed:); "
        "pin --precision fp32 to skip it"
    )
    assert not list(tmp_path.glob("engines/precision-*.json"))  # a failure is tried again next start


def test_auto_falls_back_to_fp32_when_timing_fails(engines: Engines, tmp_path: Path) -> None:
    def crashing(fp32: Path, int8: Path, **kwargs: Any) -> Timing:
        raise RuntimeError("ONNX Runtime could not load the int8 engine")

    served = serve_default(
        tmp_path, "auto", threads=1, batch=16, providers=engines.providers(), measure=crashing, cpu=ICE_LAKE
    )
    assert served.path == engines.fp32 and served.choice.reason == "int8-unavailable"
    assert "RuntimeError: ONNX Runtime could not load the int8 engine" in served.choice.why


def test_a_pinned_precision_is_served_without_measuring(
    engines: Engines, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def unbuildable(cache: Path) -> Path:
        raise AssertionError("built int8 although fp32 was pinned")

    timer = Timer(10.0, 50.0)
    fp32 = serve_default(
        tmp_path, "fp32", threads=1, batch=16, providers=engines.providers(int8=unbuildable), measure=timer
    )
    assert fp32.path == engines.fp32 and fp32.choice == Choice("fp32", "pinned", "pinned by --precision fp32")
    with caplog.at_level(logging.INFO, logger="lookout.engine"):
        int8 = serve_default(
            tmp_path, "int8", threads=1, batch=16, providers=engines.providers(), measure=timer
        )
    assert int8.path == engines.int8 and int8.choice.reason == "pinned"
    assert caplog.messages == [
        "serving int8: pinned by --precision int8; 98.5% published-label agreement with fp32 "
        "on 401 held-out frames"
    ]
    assert timer.calls == []


def test_the_measurement_times_both_engines_at_the_batch_given(tiny_engines: tuple[Path, Path]) -> None:
    timing = measure_cpu_time(*tiny_engines, batch=4, threads=1, rounds=2, batches_per_round=1)
    assert timing.fp32_cpu_ms > 0 and timing.int8_cpu_ms > 0 and timing.speedup > 0


# ----------------------------------------------------------------------------- the setting


def test_a_bad_precision_is_one_line_naming_the_choices() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={"LOOKOUT_PRECISION": "int4"})
    assert str(excinfo.value) == "LOOKOUT_PRECISION must be one of auto, fp32, int8, not 'int4'"


def test_a_pinned_precision_must_match_the_named_engine_file(engines: Engines) -> None:
    agrees = load_settings(flags={"engine": str(engines.int8), "precision": "int8"}, env={})
    assert check_engine(agrees) == engines.int8
    assert check_engine(load_settings(flags={"engine": str(engines.fp32)}, env={})) == engines.fp32
    contradicts = load_settings(flags={"engine": str(engines.fp32), "precision": "int8"}, env={})
    with pytest.raises(ConfigError) as excinfo:
        check_engine(contradicts)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"--precision is int8, but the engine file {engines.fp32} is fp32")
    assert "drop --precision (the file decides)" in message


def test_a_cpu_without_vnni_or_amx_serves_fp32_without_building_or_timing_int8(
    engines: Engines, tmp_path: Path
) -> None:
    built: list[Path] = []

    def build_int8(cache: Path) -> Path:
        built.append(cache)
        return engines.int8

    timer = Timer(10.0, 5.0)  # int8 would "pay" if it were timed
    served = auto(engines, tmp_path, timer, cpu=AVX2, providers=engines.providers(int8=build_int8))
    assert (served.path, served.choice.reason) == (engines.fp32, "int8-slower")
    assert "AMD EPYC 7B12" in served.choice.line and "VNNI" in served.choice.line
    assert built == [] and timer.calls == []
