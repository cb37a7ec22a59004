"""INT8-vs-FP32 agreement: what counts as the same answer, on which frames, as the sidecar keeps it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import numpy.typing as npt

from engine_build.agreement import (
    Labeller,
    agreement,
    engine_agreement,
    held_out_sources,
    wilson_interval,
)
from engine_build.cpu import build_cpu_engine
from engine_build.default import default_engine_path, default_int8_engine_path, ensure_default_int8_engine
from engine_build.imagefolder import ImageSource, real_frame_sources
from engine_build.metadata import write_sidecar
from stream_worker.backends.base import EngineInfo
from stream_worker.backends.sidecar import read_sidecar
from stream_worker.preprocess import PreprocessSpec
from stream_worker.taxonomy import Taxonomy, load_class_names
from tests.unit.engine_fixtures import build_tiny_onnx

CLASSES = load_class_names()
SPORTS_CAR, TABBY = CLASSES.index("sports car"), CLASSES.index("tabby")
Probs = npt.NDArray[np.float32]


def spread(*tops: tuple[int, float]) -> Probs:
    """One frame's probabilities: ``score`` on each ``(class, score)``, the rest spread evenly."""
    rest = 1.0 - sum(score for _, score in tops)
    p = np.full(len(CLASSES), rest / (len(CLASSES) - len(tops)), np.float32)
    for index, score in tops:
        p[index] = score
    return p


def test_agreement_counts_classes_and_published_labels_separately() -> None:
    labeller = Labeller(Taxonomy.load())
    fp32 = np.stack(
        [spread((SPORTS_CAR, 0.9)), spread((TABBY, 0.9)), spread((TABBY, 0.5), (SPORTS_CAR, 0.45))]
    )
    int8 = fp32.copy()
    int8[1] = spread((TABBY, 0.85))  # same class, same label: agrees
    int8[2] = spread((TABBY, 0.45), (SPORTS_CAR, 0.5))  # the top class flips, and the label with it
    result = agreement(labeller, fp32, int8)
    assert result["n"] == 3
    assert (result["top1"], result["top1_disagreements"]) == (round(2 / 3, 4), 1)
    assert (result["label"], result["label_disagreements"]) == (round(2 / 3, 4), 1)
    assert list(labeller.served(fp32)) == ["car", "cat", "cat"]
    assert agreement(labeller, fp32, fp32)["label"] == 1.0


def test_the_interval_brackets_the_share_and_narrows_with_more_frames() -> None:
    low, high = wilson_interval(394, 401)
    assert low < 394 / 401 < high < 1.0
    wide = wilson_interval(98, 100)
    assert wide[1] - wide[0] > high - low


def test_labels_are_published_as_the_engine_serves_them(tmp_path: Path) -> None:
    engine = tmp_path / "tiny.onnx"
    build_cpu_engine(build_tiny_onnx(tmp_path / "src.onnx"), engine, precision="fp32", progress=False)
    calibration = {"rollup_threshold": 0.6, "rollup_label_thresholds": {"car": 0.05}}
    sidecar = dataclasses.replace(read_sidecar(engine), calibration=calibration)
    served = Labeller.for_engine(EngineInfo.from_sidecar(engine, sidecar))
    assert (served.rollup_threshold, dict(served.rollup_label_thresholds)) == (0.6, {"car": 0.05})
    faint_car = np.stack([spread((SPORTS_CAR, 0.1))])
    # The engine's per-label threshold publishes a car the worker's plain roll-up would not.
    assert served.served(faint_car)[0] == "car"
    assert Labeller(served.taxonomy).served(faint_car)[0] != "car"


def test_engine_agreement_pools_every_set_into_the_figures_a_sidecar_keeps() -> None:
    image = np.zeros((60, 80, 3), np.uint8)
    sets = {
        "street": [ImageSource(f"street#{i}", lambda: image) for i in range(3)],
        "cartoon": [ImageSource(f"cartoon#{i}", lambda: image) for i in range(2)],
    }
    car, cat = spread((SPORTS_CAR, 0.9)), spread((TABBY, 0.9))
    calls = {"int8": 0}

    def fp32(batch: Probs) -> Probs:
        return np.stack([car] * len(batch))

    def int8(batch: Probs) -> Probs:
        calls["int8"] += 1
        out = np.stack([car] * len(batch))
        if calls["int8"] == 2:  # the cartoon batch: one frame of five comes out a cat
            out[0] = cat
        return out

    result = engine_agreement(fp32, int8, Labeller(Taxonomy.load()), PreprocessSpec(), sets)
    assert result["frames"] == 5 and result["sets"] == {"street": 3, "cartoon": 2}
    assert (result["published_label"], result["published_label_disagreements"]) == (0.8, 1)
    assert result["top1"] == 0.8
    low, high = result["published_label_95ci"]
    assert low < 0.8 < high


def test_the_held_out_frames_are_never_calibration_frames() -> None:
    held_out = held_out_sources()
    names = {s.name for sources in held_out.values() for s in sources}
    assert {name: len(sources) for name, sources in held_out.items()} == {
        "street": 200,
        "carphone": 96,
        "cartoon": 105,
    }
    assert not names & {s.name for s in real_frame_sources()}


def test_the_default_int8_engine_carries_its_agreement_and_is_rebuilt_without_it(tmp_path: Path) -> None:
    source = build_tiny_onnx(tmp_path / "tiny.onnx")
    cache = tmp_path / "cache"
    int8 = ensure_default_int8_engine(cache, onnx_path=source)
    assert int8 == default_int8_engine_path(cache)
    sidecar = read_sidecar(int8)
    measured = sidecar.build["agreement"]
    assert sidecar.precision == "int8" and measured["frames"] == 401
    assert 0.0 <= measured["published_label"] <= 1.0 and 0.0 <= measured["top1"] <= 1.0
    assert measured["reference_sha256"] == read_sidecar(default_engine_path(cache)).engine_sha256

    built = int8.stat().st_mtime_ns
    assert ensure_default_int8_engine(cache, onnx_path=source) == int8
    assert int8.stat().st_mtime_ns == built  # cached: not built again

    # An int8 engine from before the measurement existed is stale: rebuilt, and measured.
    write_sidecar(int8, dataclasses.replace(sidecar, build={}))
    ensure_default_int8_engine(cache, onnx_path=source)
    assert read_sidecar(int8).build["agreement"]["frames"] == 401

    # One quantised with another recipe (an older default) is stale too: rebuilt with today's.
    sidecar = read_sidecar(int8)
    older = {**sidecar.build["quantization"], "keep_first_depthwise_fp32": False}
    write_sidecar(int8, dataclasses.replace(sidecar, build={**sidecar.build, "quantization": older}))
    ensure_default_int8_engine(cache, onnx_path=source)
    assert read_sidecar(int8).build["quantization"]["keep_first_depthwise_fp32"] is True
