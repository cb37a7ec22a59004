"""Calibration: ECE, the temperature fit, serving at a temperature, thresholds from the engine, and
``engine-build calibrate`` written into a model and read back by serving."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from engine_build.calibrate import (
    CurvePoint,
    DevItem,
    calibrate_model,
    choose_rollup,
    fit_calibration,
    fit_label_temperature,
    group_folds,
    group_of,
)
from engine_build.cli import main as engine_build_main
from engine_build.cpu import build_cpu_engine
from engine_build.evaluate import evaluate_engine, reliability
from engine_build.imagefolder import sample_photo
from stream_worker.backends.registry import open_backend
from stream_worker.calibration import Calibration, temperature_scale
from stream_worker.errors import ConfigError, EngineError
from stream_worker.frames import SourceKind
from stream_worker.observability import Metrics
from stream_worker.pipeline import Batch, Pipeline
from stream_worker.settings import Settings, load_settings, with_engine_calibration
from stream_worker.taxonomy import Taxonomy
from tests.unit.engine_fixtures import COMMITTED_ONNX
from tests.unit.test_pipeline import CLASSES, SPORTS_CAR, TABBY, StandInEngine, frame_record

needs_model = pytest.mark.skipif(not COMMITTED_ONNX.is_file(), reason=f"{COMMITTED_ONNX} not exported yet")


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# -- expected calibration error -----------------------------------------------------------------


def test_ece_matches_a_hand_computed_case() -> None:
    # 15 bins of width 1/15. 0.10 and 0.12 share bin (1/15, 2/15]: mean confidence 0.11, one of two
    # right. 0.9 is alone in (13/15, 14/15] and right; 0.95 alone in the last bin and wrong.
    result = reliability([0.10, 0.12, 0.90, 0.95], [True, False, True, False])
    expected = (2 * abs(0.5 - 0.11) + abs(1 - 0.90) + abs(0 - 0.95)) / 4
    assert result.ece == pytest.approx(expected)
    assert [b.count for b in result.bins] == [0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert result.bins[1].confidence == pytest.approx(0.11) and result.bins[1].accuracy == 0.5
    assert json.loads(json.dumps(result.to_dict()))["bins"][14]["upper"] == 1.0


def test_ece_is_zero_when_confidence_equals_accuracy_and_a_zero_confidence_is_binned() -> None:
    assert reliability([0.0, 0.0, 1.0], [False, False, True]).ece == 0.0


# -- the temperature fit ------------------------------------------------------------------------


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_the_label_temperature_is_recovered_on_synthetic_logits(true_temperature: float) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (4000, 12))
    # Truth drawn from softmax(logits); the engine reports softmax(logits * T): miscalibrated by T.
    cls = np.array([rng.choice(12, p=p) for p in softmax(logits)])
    engine_probs = softmax(logits * true_temperature).astype(np.float32)
    # Labels as the taxonomy makes them: classes 0-2 are one label, 3-5 another, 6-11 unmapped.
    label_of = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    right = label_of[None, :] == label_of[cls][:, None]
    assert fit_label_temperature(engine_probs, right) == pytest.approx(true_temperature, rel=0.1)
    one_hot = np.eye(12, dtype=bool)[cls]
    assert fit_label_temperature(engine_probs, one_hot) == pytest.approx(true_temperature, rel=0.1)


def test_groups_are_never_split_across_folds() -> None:
    assert group_of(Path("bikes_062.png")) == "bikes"
    assert group_of(Path("carphone_pristine_000.png")) == "carphone_pristine"
    assert group_of(Path("chelsea.png")) == "chelsea"
    groups = ["a", "a", "b", "c", "c", "c", "d"]
    folds = group_folds(groups)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(groups)))
    for held in folds:
        assert {groups[i] for i in held}.isdisjoint({groups[i] for i in set(range(7)) - set(held.tolist())})
    with pytest.raises(ConfigError, match="at least 2 groups"):
        group_folds(["a", "a"])


def test_the_rollup_rule_takes_the_lowest_threshold_reaching_the_target() -> None:
    points = [
        CurvePoint(0.1, 0.80, 0.9, 0.7, 9),
        CurvePoint(0.2, 0.96, 0.6, 0.6, 6),
        CurvePoint(0.3, 1.00, 0.3, 0.3, 3),
        CurvePoint(0.4, 0.00, 0.0, 0.0, 0),
    ]
    assert choose_rollup(points, 0.95) == (0.2, True)
    assert choose_rollup(points, 1.0) == (0.3, True)
    assert choose_rollup(points[:1], 0.95) == (0.1, False)  # none reaches it: the most precise


# -- serving at a temperature ---------------------------------------------------------------------


def test_temperature_scaling_equals_dividing_the_logits() -> None:
    logits = np.random.default_rng(0).normal(0, 4, (5, 1000))
    probs = softmax(logits).astype(np.float32)
    for temperature in (0.3, 1.7):
        scaled = temperature_scale(probs, temperature)
        np.testing.assert_allclose(scaled, softmax(logits / temperature), rtol=1e-3, atol=1e-7)
        np.testing.assert_allclose(scaled.sum(axis=1), 1.0, rtol=1e-5)
        assert (scaled.argmax(axis=1) == probs.argmax(axis=1)).all()
    assert (temperature_scale(probs, 0.3).max(axis=1) > probs.max(axis=1)).all()  # sharper
    assert (temperature_scale(probs, 1.7).max(axis=1) < probs.max(axis=1)).all()  # softer
    assert temperature_scale(probs, 1.0) is probs  # uncalibrated engines pay nothing
    assert np.isfinite(temperature_scale(probs, 0.01)).all()  # no all-zero row at a tiny T


def test_a_bad_calibration_document_is_one_line() -> None:
    with pytest.raises(EngineError, match="serving_temperature must be above 0"):
        Calibration.from_document({"serving_temperature": 0})
    with pytest.raises(EngineError, match=r"review_threshold must lie in \[0, 1\]"):
        Calibration.from_document({"review_threshold": 1.5})
    with pytest.raises(EngineError, match="unknown calibration key"):
        Calibration.from_document({"temperature": 2.0})


# -- thresholds: the engine's unless the user set one ---------------------------------------------


FITTED = Calibration(serving_temperature=0.5, rollup_threshold=0.2, review_threshold=0.1)


def test_the_engines_thresholds_replace_defaults_only() -> None:
    settings, taken = with_engine_calibration(load_settings(env={}), FITTED, "model.onnx")
    assert (settings.labels.rollup_threshold, settings.counts.review_threshold) == (0.2, 0.1)
    assert taken == ("rollup_threshold", "review_threshold")
    assert settings.origin("labels", "rollup_threshold").kind == "engine"

    mine = load_settings(flags={"rollup_threshold": 0.7}, env={"LOOKOUT_REVIEW_THRESHOLD": "0.25"})
    settings, taken = with_engine_calibration(mine, FITTED, "model.onnx")
    assert (settings.labels.rollup_threshold, settings.counts.review_threshold) == (0.7, 0.25)
    assert taken == ()


UNMAPPED = np.flatnonzero(Taxonomy.load().label_classes("unknown"))


class SpreadEngine(StandInEngine):
    """Every row: sports car 0.35, tabby 0.20, 0.45 spread over the classes no label maps."""

    def __init__(self, calibration: Calibration) -> None:
        super().__init__([SPORTS_CAR])
        self.info = dataclasses.replace(self.info, calibration=calibration)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        probs = np.zeros((len(batch), len(CLASSES)), np.float32)
        probs[:, UNMAPPED] = 0.45 / len(UNMAPPED)
        probs[:, SPORTS_CAR], probs[:, TABBY] = 0.35, 0.20
        return probs


async def published(settings: Settings, calibration: Calibration) -> tuple[str, float, Settings]:
    pipeline = Pipeline(settings, lambda: SpreadEngine(calibration), metrics=Metrics())
    await pipeline.open()
    batch = Batch(opened_at=0.0)
    pipeline.add(batch, frame_record(0, "cam-1", kind=SourceKind.TRAFFIC))
    await pipeline.classify(batch)
    await pipeline.close()
    label = batch.predictions[0].result.labels[0]
    return label.label, label.score, pipeline.settings


async def test_the_pipeline_serves_at_the_engines_temperature_and_thresholds() -> None:
    # Raw: car scores 0.35, under the default 0.4, and no parent passes: unknown.
    assert (await published(Settings(), Calibration()))[0] == "unknown"
    # At T = 0.5 the scores sharpen (0.35^2 / sum of squares = 0.75): car.
    label, score, settings = await published(load_settings(env={}), FITTED)
    squares = 0.35**2 + 0.20**2 + 0.45**2 / len(UNMAPPED)
    assert label == "car" and score == pytest.approx(0.35**2 / squares, rel=1e-4)
    assert settings.counts.review_threshold == 0.1  # the sinks get the engine's review threshold
    # A roll-up threshold the user set wins over the engine's: 0.75 < 0.8, so unknown again.
    label, _, settings = await published(load_settings(flags={"rollup_threshold": 0.8}, env={}), FITTED)
    assert label == "unknown" and settings.labels.rollup_threshold == 0.8


async def test_per_label_rollup_thresholds_from_the_engine() -> None:
    # At T = 1, car scores 0.35: the engine's own threshold for car (0.3) publishes it.
    own = Calibration(rollup_threshold=0.4, rollup_label_thresholds={"car": 0.3})
    label, _, _ = await published(load_settings(env={}), own)
    assert label == "car"
    label, _, _ = await published(load_settings(env={"LOOKOUT_ROLLUP_THRESHOLD": "0.4"}), own)
    assert label == "unknown"  # fitted together with the engine's global one: the user's replaces both


# -- engine-build calibrate, end to end -------------------------------------------------------------


@pytest.fixture(scope="module")
def devset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("devset")
    for label, photo in [
        ("cat", "chelsea.png"),
        ("motorcycle", "motorcycle_left.png"),
        ("motorcycle", "motorcycle_right.png"),
        ("person", "astronaut.png"),
        ("unknown", "coffee.png"),
    ]:
        (root / label).mkdir(exist_ok=True)
        shutil.copy(sample_photo(photo), root / label / photo)
    return root


@needs_model
def test_calibrate_writes_metadata_that_serving_reads_back(devset: Path, tmp_path: Path) -> None:
    out = tmp_path / "calibrated.onnx"
    fit = calibrate_model(COMMITTED_ONNX, devset, out)
    assert fit.n == 5 and fit.groups == 5 and fit.counts["unknown"] == 1

    before, after = onnx.load(str(COMMITTED_ONNX)), onnx.load(str(out))
    assert after.graph.SerializeToString() == before.graph.SerializeToString()  # weights byte-identical
    kept = {p.key: p.value for p in before.metadata_props if p.key != "calibration"}
    written = {p.key: p.value for p in after.metadata_props}
    assert {k: v for k, v in written.items() if k != "calibration"} == kept  # replaced, not added twice
    assert [p.key for p in after.metadata_props].count("calibration") == 1

    engine = tmp_path / "engine.onnx"
    build_cpu_engine(out, engine, precision="fp32")
    backend = open_backend(engine)
    try:
        served = backend.info.calibration
        assert served.serving_temperature == pytest.approx(fit.calibration.serving_temperature)
        assert served.rollup_threshold == fit.calibration.rollup_threshold
        assert served.review_threshold == fit.calibration.review_threshold
        taxonomy = Taxonomy.for_engine(backend.info)
        report = evaluate_engine(backend, devset_leaves(devset, tmp_path), taxonomy).to_dict()
    finally:
        backend.close()
    section = report["calibration"]
    assert section["serving_temperature"] == pytest.approx(served.serving_temperature)
    assert len(section["before"]["top_label"]["bins"]) == 15
    assert 0.0 <= section["after"]["published"]["ece"] <= 1.0


def devset_leaves(devset: Path, tmp_path: Path) -> Path:
    """The dev set without its unknown folder (evaluate reads leaf folders only)."""
    leaves = tmp_path / "leaves"
    shutil.copytree(devset, leaves, ignore=lambda d, names: ["unknown"] if d == str(devset) else [])
    return leaves


@needs_model
def test_calibrate_command_prints_json_and_refuses_a_foreign_label(
    devset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.onnx"
    assert engine_build_main(["calibrate", "--data", str(devset), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["calibration"]["serving_temperature"] > 0
    assert {"threshold", "precision", "coverage", "recall", "published"} <= set(printed["rollup_curve"][0])
    (devset / "kitten").mkdir()
    try:
        shutil.copy(sample_photo("chelsea.png"), devset / "kitten" / "chelsea.png")
        assert engine_build_main(["calibrate", "--data", str(devset), "--out", str(out)]) == 2
        assert "kitten" in capsys.readouterr().err
    finally:
        shutil.rmtree(devset / "kitten")


def _frames_of(
    taxonomy: Taxonomy, label: str, n: int, group: str, temperature: float, seed: int, root: Path
) -> tuple[np.ndarray, list[DevItem]]:
    """``n`` frames whose truth is drawn from softmax(logits) over the real taxonomy's 1000
    classes; the engine reports softmax(logits * temperature)."""
    rng = np.random.default_rng(seed)
    classes = np.flatnonzero(taxonomy.label_classes(label))
    logits = rng.normal(0, 2, (n, 1000))
    logits[:, classes] += 3.0  # the label is likely
    truth = [label] * n
    probs = softmax(logits * temperature).astype(np.float32)
    items = [DevItem(root / f"{group}_{i:03d}.png", t, group) for i, t in enumerate(truth)]
    for i, item in enumerate(items):
        item.path.write_bytes(f"{seed}-{i}".encode())  # the fit records the data's digest
    return probs, items


def test_a_temperature_is_served_only_when_it_beats_none_on_held_out_scenes(tmp_path: Path) -> None:
    taxonomy = Taxonomy.load()
    # Every scene miscalibrated alike: a temperature fitted without a scene helps it too.
    parts = [_frames_of(taxonomy, "car", 40, f"scene{g}", 2.5, seed=g, root=tmp_path) for g in range(5)]
    fit = fit_calibration(taxonomy, np.concatenate([p for p, _ in parts]), [i for _, x in parts for i in x])
    assert fit.nll["after_cross_fitted"] < fit.nll["before"]
    assert fit.calibration.fitted["temperature_kept"] is True
    assert fit.calibration.serving_temperature not in (1.0, pytest.approx(1.0, abs=0.1))

    # Two scenes that disagree (one very overconfident, one very underconfident): what is fitted
    # on one is wrong for the other, so T = 1 is served and the thresholds use raw scores.
    parts = [
        _frames_of(taxonomy, "car", 40, f"scene{g}", 4.0 if g == 0 else 0.25, seed=10 + g, root=tmp_path)
        for g in range(2)
    ]
    fit = fit_calibration(taxonomy, np.concatenate([p for p, _ in parts]), [i for _, x in parts for i in x])
    assert fit.nll["after_cross_fitted"] >= fit.nll["before"]
    assert fit.calibration.fitted["temperature_kept"] is False
    assert fit.calibration.serving_temperature == 1.0
