"""Metrics against hand-computed cases, and evaluation/comparison of a real engine on real photos."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine_build.calibrate import write_calibrated_model
from engine_build.cpu import build_cpu_engine
from engine_build.evaluate import (
    auc_roc,
    average_ranks,
    compare,
    evaluate_engine,
    evaluate_predictions,
    group_bootstrap_interval,
    override_preprocessing,
    published_outcome,
    wilson_interval,
)
from engine_build.imagefolder import path_sources, sample_photo
from stream_worker.backends.registry import open_backend
from stream_worker.calibration import Calibration
from stream_worker.errors import ConfigError
from stream_worker.preprocess import PreprocessSpec
from stream_worker.taxonomy import Taxonomy
from tests.unit.engine_fixtures import COMMITTED_ONNX


def test_auc_counts_tied_scores_as_half() -> None:
    positive = np.array([True, True, False, False])
    # Pairs (pos, neg): 0.8>0.5, 0.8>0.2, 0.5=0.5 (half), 0.5>0.2  ->  3.5 / 4
    assert auc_roc(positive, np.array([0.8, 0.5, 0.5, 0.2])) == pytest.approx(0.875)
    assert auc_roc(positive, np.array([0.3, 0.3, 0.3, 0.3])) == pytest.approx(0.5)
    assert auc_roc(positive, np.array([0.1, 0.2, 0.3, 0.4])) == pytest.approx(0.0)


def test_auc_is_undefined_without_both_classes() -> None:
    assert auc_roc(np.array([True, True]), np.array([0.1, 0.9])) is None
    assert auc_roc(np.array([False, False]), np.array([0.1, 0.9])) is None


def test_average_ranks_share_ties() -> None:
    assert average_ranks(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]


@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 4)), min_size=2, max_size=40).filter(
        lambda rows: 0 < sum(p for p, _ in rows) < len(rows)
    )
)
def test_auc_equals_pairwise_definition(rows: list[tuple[bool, int]]) -> None:
    positive = np.array([p for p, _ in rows])
    scores = np.array([float(s) for _, s in rows])
    pos, neg = scores[positive], scores[~positive]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    assert auc_roc(positive, scores) == pytest.approx(wins / (len(pos) * len(neg)))


def test_precision_recall_f1_with_a_zero_support_class() -> None:
    truth = ["cat", "cat", "dog", "dog"]
    predicted = ["cat", "dog", "dog", "bird"]
    scores = np.array([[0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]])
    report = evaluate_predictions(truth, predicted, scores, ["cat", "dog", "bird"])

    assert report.labels == ("cat", "dog", "bird")
    assert report.accuracy == pytest.approx(0.5)
    cat, dog, bird = (report.per_class[k] for k in ("cat", "dog", "bird"))
    assert (cat.precision, cat.recall, cat.f1, cat.support) == pytest.approx((1.0, 0.5, 2 / 3, 2))
    assert (dog.precision, dog.recall, dog.f1, dog.support) == pytest.approx((0.5, 0.5, 0.5, 2))
    # bird was predicted once and never true: precision 0, recall undefined -> 0, F1 0.
    assert (bird.precision, bird.recall, bird.f1, bird.support) == (0.0, 0.0, 0.0, 0)
    assert report.macro_f1 == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert report.macro_precision == pytest.approx(0.5)
    assert report.confusion == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]
    # cat scores: positives 0.9, 0.4 vs negatives 0.1, 0.2 -> 1.0; dog: 0.8, 0.3 vs 0.1, 0.6 -> 0.75
    assert report.auc_roc_per_class == pytest.approx({"cat": 1.0, "dog": 0.75})
    assert report.auc_roc_macro == pytest.approx(0.875)
    assert "bird" not in report.auc_roc_per_class


def test_evaluate_predictions_rejects_mismatched_inputs() -> None:
    with pytest.raises(ConfigError):
        evaluate_predictions(["cat"], ["cat", "dog"], np.zeros((1, 2)), ["cat", "dog"])


needs_model = pytest.mark.skipif(not COMMITTED_ONNX.is_file(), reason=f"{COMMITTED_ONNX} not exported yet")


@pytest.fixture(scope="module")
def fp32_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "fp32.onnx"
    build_cpu_engine(COMMITTED_ONNX, out, precision="fp32")
    return out


@needs_model
def test_evaluate_engine_on_labelled_photos(fp32_engine: Path, tmp_path: Path) -> None:
    for label, photo in [("cat", "chelsea.png"), ("motorcycle", "motorcycle_left.png")]:
        (tmp_path / label).mkdir()
        shutil.copy(sample_photo(photo), tmp_path / label / photo)
    backend = open_backend(fp32_engine)
    taxonomy = Taxonomy.load(class_names=backend.info.class_names)
    report = evaluate_engine(backend, tmp_path, taxonomy)
    assert report.n == 2
    assert report.accuracy == 1.0
    assert report.per_class["cat"].support == 1
    assert report.auc_roc_macro == 1.0


@needs_model
def test_evaluate_refuses_folders_that_are_not_leaf_labels(fp32_engine: Path, tmp_path: Path) -> None:
    (tmp_path / "kitten").mkdir()
    shutil.copy(sample_photo("chelsea.png"), tmp_path / "kitten" / "chelsea.png")
    backend = open_backend(fp32_engine)
    with pytest.raises(ConfigError, match="kitten"):
        evaluate_engine(backend, tmp_path, Taxonomy.load(class_names=backend.info.class_names))


@needs_model
def test_compare_an_engine_with_itself_agrees_exactly(fp32_engine: Path) -> None:
    sources = path_sources([sample_photo("chelsea.png"), sample_photo("coffee.png")])
    a, b = open_backend(fp32_engine), open_backend(fp32_engine)
    result = compare(a, b, sources, Taxonomy.load(class_names=a.info.class_names))
    assert result.n == 2
    assert result.top1_agreement == 1.0
    assert result.label_agreement == 1.0
    assert result.published_label_agreement == 1.0
    assert result.max_abs_diff < 1e-6


@needs_model
def test_compare_publishes_with_each_engines_fitted_thresholds(fp32_engine: Path, tmp_path: Path) -> None:
    # The same weights, one model calibrated to publish nothing under 0.99: on a motorbike
    # (vehicle well above 0.4, below 0.99) the worker would publish a label with one engine and
    # `unknown` with the other, so their published labels must not agree.
    strict = tmp_path / "strict.onnx"
    write_calibrated_model(COMMITTED_ONNX, strict, Calibration(rollup_threshold=0.99))
    build_cpu_engine(strict, tmp_path / "strict-fp32.onnx", precision="fp32")
    sources = path_sources([sample_photo("motorcycle_left.png")])
    a, b = open_backend(fp32_engine), open_backend(tmp_path / "strict-fp32.onnx")
    taxonomy = Taxonomy.for_engine(a.info)
    served = compare(a, b, sources, taxonomy)
    assert served.top1_agreement == 1.0 and served.max_abs_diff < 1e-6
    assert served.published_label_agreement == 0.0
    # A roll-up threshold given for both replaces the engines' own, as a user's setting does.
    assert compare(a, b, sources, taxonomy, rollup_threshold=0.4).published_label_agreement == 1.0


@pytest.mark.parametrize(
    ("truth", "published", "outcome"),
    [
        ("bicycle", "bicycle", "leaf"),
        ("bicycle", "vehicle", "ancestor"),
        ("cat", "animal", "ancestor"),
        ("bicycle", "car", "wrong"),
        ("cat", "vehicle", "wrong"),
        ("cat", "unknown", "unknown"),
        ("unknown", "unknown", "leaf"),
        ("unknown", "animal", "wrong"),
    ],
)
def test_published_label_is_right_when_it_is_the_truth_or_one_of_its_parents(
    truth: str, published: str, outcome: str
) -> None:
    assert published_outcome(Taxonomy.load(), truth, published) == outcome


def test_wilson_interval_matches_the_textbook_values() -> None:
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_group_bootstrap_moves_whole_groups() -> None:
    # One scene of 30 frames: resampling scenes cannot tell anything beyond that scene.
    assert group_bootstrap_interval(np.array([1.0] * 20 + [0.0] * 10), ["a"] * 30) == pytest.approx(
        (2 / 3, 2 / 3)
    )
    # Two scenes, all right and all wrong: the interval spans both.
    low, high = group_bootstrap_interval(np.array([1.0] * 20 + [0.0] * 10), ["a"] * 20 + ["b"] * 10)
    assert low == 0.0 and high == 1.0


def test_a_bad_preprocess_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="expected crop:FRACTION"):
        override_preprocessing(PreprocessSpec(), "fit")


@needs_model
def test_evaluate_scores_the_published_label_with_unknown_images_and_groups(
    fp32_engine: Path, tmp_path: Path
) -> None:
    for label, photo in [("cat", "chelsea.png"), ("unknown", "coffee.png"), ("unknown", "rocket.jpg")]:
        (tmp_path / label).mkdir(exist_ok=True)
        shutil.copy(sample_photo(photo), tmp_path / label / photo)
    (tmp_path / "manifest.csv").write_text(
        "path,label,source,group\n"
        "cat/chelsea.png,cat,skimage,chelsea\n"
        "unknown/coffee.png,unknown,skimage,table\n"
        "unknown/rocket.jpg,unknown,skimage,table\n"
    )
    backend = open_backend(fp32_engine)
    report = evaluate_engine(backend, tmp_path, Taxonomy.for_engine(backend.info))
    assert report.n == 1 and report.accuracy == 1.0  # best-leaf metrics: leaf images only
    published = report.published
    assert published is not None
    assert (published.overall.n, published.overall.right, published.overall.wrong) == (3, 3, 0)
    assert published.per_label["unknown"].leaf == 2
    assert set(published.per_group) == {"chelsea", "table"} and published.per_group["table"].n == 2
    assert report.to_dict()["published"]["accuracy_wilson95"][1] == 1.0
    assert report.meta["preprocess"] == backend.info.spec.describe()


@needs_model
def test_a_preprocess_override_changes_what_the_engine_sees(fp32_engine: Path, tmp_path: Path) -> None:
    from engine_build.imagefolder import clip_frame_sources

    # A wide street frame (bikes.mp4 #60, a taxi): the centre crop and the letterbox differ.
    sources = clip_frame_sources("bikes.mp4", keep=lambda i: i == 60)
    a, b = open_backend(fp32_engine), open_backend(fp32_engine)
    same = compare(a, b, sources, Taxonomy.for_engine(a.info))
    letterbox = override_preprocessing(b.info.spec, "letterbox")
    changed = compare(a, b, sources, Taxonomy.for_engine(a.info), spec_b=letterbox)
    assert same.max_abs_diff < 1e-6
    assert changed.max_abs_diff > 0.01
