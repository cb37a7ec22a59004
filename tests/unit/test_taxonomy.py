"""The domain taxonomy: the packaged map, score sums, roll-up, multi-label thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stream_worker.errors import ConfigError, EngineError
from stream_worker.taxonomy import UNKNOWN, Taxonomy, load_class_names

LEAVES = (
    "car",
    "truck",
    "bus",
    "motorcycle",
    "bicycle",
    "person",
    "bird",
    "deer",
    "fox",
    "wild_boar",
    "bear",
    "squirrel",
    "rabbit",
    "dog",
    "cat",
    "horse",
    "cattle",
    "sheep",
)
DATA_FILE = Path(__file__).resolve().parents[2] / "stream_worker" / "data" / "taxonomy.yaml"

# ImageNet-1k indices used to craft probability vectors.
TABBY, SIAMESE = 281, 284
TIMBER_WOLF = 269  # mapped straight to mammal
GOLDFISH = 1  # mapped straight to animal
ROBIN = 15
SPORTS_CAR, PICKUP, STREETCAR = 817, 717, 829
SCUBA_DIVER = 983
TOILET_TISSUE = 999  # not mapped at all


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return Taxonomy.load()


def probs(**mass: float) -> npt.NDArray[np.float32]:
    """One frame's probabilities from ``index_<n>=p`` pairs; the rest goes to toilet tissue."""
    row = np.zeros(1000, dtype=np.float32)
    for key, value in mass.items():
        row[int(key.removeprefix("c"))] = value
    row[TOILET_TISSUE] += 1.0 - row.sum()
    return row[None, :]


def only_label(
    tax: Taxonomy, p: npt.NDArray[np.float32], **kwargs: float
) -> tuple[str, float, tuple[str, ...]]:
    (result,) = tax.classify(p, **kwargs)  # type: ignore[arg-type]
    (label,) = result.labels
    return label.label, label.score, label.path


# -- the packaged map -----------------------------------------------------------------------


def test_leaves_and_hierarchy_are_the_documented_ones(tax: Taxonomy) -> None:
    assert tax.leaves == LEAVES
    assert tax.labels == (*LEAVES, "vehicle", "animal", "mammal")
    assert tax.path("cat") == ("animal", "mammal", "cat")
    assert tax.path("bird") == ("animal", "bird")
    assert tax.path("car") == ("vehicle", "car")
    assert tax.path("person") == ("person",)
    assert tax.path(UNKNOWN) == (UNKNOWN,)
    assert tax.ancestors("dog") == ("mammal", "animal")
    parents = tax.leaf_parents()
    assert {leaf for leaf, parent in parents.items() if parent == "vehicle"} == {
        "car",
        "truck",
        "bus",
        "motorcycle",
        "bicycle",
    }
    assert parents["bird"] == "animal" and parents["person"] is None
    assert tax.parents["mammal"] == "animal"


def test_every_leaf_has_classes_except_the_documented_gap(tax: Taxonomy) -> None:
    doc = yaml.safe_load(DATA_FILE.read_text())
    empty = {leaf for leaf in tax.leaves if not doc["mapping"][leaf]["classes"]}
    assert empty == {"deer"}
    assert doc["mapping"]["deer"]["why"].startswith("GAP")
    assert doc["mapping"]["person"]["why"].startswith("GAP")


def test_no_class_is_mapped_twice_and_names_match_the_class_list() -> None:
    doc = yaml.safe_load(DATA_FILE.read_text())
    names = load_class_names()
    pairs = [tuple(pair) for entry in doc["mapping"].values() for pair in entry["classes"]]
    indices = [index for index, _ in pairs]
    assert len(indices) == len(set(indices))
    assert all(names[index] == name for index, name in pairs)


def test_the_decisions_the_model_card_relies_on(tax: Taxonomy) -> None:
    names = tax.class_names
    assert len(names) == 1000
    assert tax.classes_of("dog") == tuple(range(151, 269))
    assert tax.classes_of("cat") == tuple(range(281, 286))
    assert [names[i] for i in tax.classes_of("wild_boar")] == ["wild boar"]
    hog = names.index("hog")
    assert hog not in tax.classes_of("wild_boar") and hog in tax.classes_of("mammal")
    assert [names[i] for i in tax.classes_of("person")] == ["ballplayer", "groom", "scuba diver"]
    for antelope in ("hartebeest", "impala", "gazelle"):
        assert names.index(antelope) in tax.classes_of("mammal")
    # Every ImageNet animal class (0-397) is under 'animal' but the two extinct ones.
    extinct = {names.index("triceratops"), names.index("trilobite")}
    assert set(range(398)) - set(tax.classes_of("animal")) == extinct
    # The railway 'passenger car' is no car; big cats are no cats.
    assert names.index("passenger car") not in tax.classes_of("car")
    assert names.index("lion") not in tax.classes_of("cat")
    assert not set(tax.classes_of("vehicle")) & set(tax.classes_of("animal"))


# -- scores -----------------------------------------------------------------------------------


def test_scores_are_sums_of_class_probabilities(tax: Taxonomy) -> None:
    rng = np.random.default_rng(7)
    batch = rng.dirichlet(np.full(1000, 0.05), size=6).astype(np.float32)
    scores = tax.scores(batch)
    assert scores.shape == (6, len(tax.labels))
    for j, label in enumerate(tax.labels):
        expected = batch[:, list(tax.classes_of(label))].sum(axis=1)
        np.testing.assert_allclose(scores[:, j], expected, rtol=1e-5, atol=1e-6)
    column = {label: j for j, label in enumerate(tax.labels)}
    mammal_children = [leaf for leaf in tax.leaves if tax.parents[leaf] == "mammal"]
    direct_mammal = batch[
        :,
        [
            i
            for i in tax.classes_of("mammal")
            if not any(i in tax.classes_of(child) for child in mammal_children)
        ],
    ].sum(axis=1)
    np.testing.assert_allclose(
        scores[:, column["mammal"]],
        scores[:, [column[c] for c in mammal_children]].sum(axis=1) + direct_mammal,
        rtol=1e-5,
    )


def test_wrong_output_shape_is_an_engine_error(tax: Taxonomy) -> None:
    with pytest.raises(EngineError, match="1000"):
        tax.scores(np.zeros((2, 1001), dtype=np.float32))


# -- single-label mode ----------------------------------------------------------------------


def test_confident_leaf_is_returned_with_its_path(tax: Taxonomy) -> None:
    (result,) = tax.classify(probs(c281=0.6, c284=0.3))
    assert result.labels[0].label == "cat"
    assert result.labels[0].path == ("animal", "mammal", "cat")
    assert result.labels[0].score == pytest.approx(0.9)
    assert result.best_score == pytest.approx(0.9)
    assert [(c.index, c.name) for c in result.top_k[:3]] == [
        (TABBY, "tabby"),
        (SIAMESE, "Siamese cat"),
        (TOILET_TISSUE, "toilet tissue"),
    ]


def test_weak_leaf_rolls_up_to_its_parent(tax: Taxonomy) -> None:
    # cat 0.3 is under 0.5, but the mammal mass (cat + wolf) is 0.7.
    label, score, path = only_label(tax, probs(c281=0.3, c269=0.4))
    assert (label, path) == ("mammal", ("animal", "mammal"))
    assert score == pytest.approx(0.7)


def test_rolls_up_to_the_grandparent_when_the_parent_is_weak_too(tax: Taxonomy) -> None:
    # cat 0.2 + wolf 0.2 = mammal 0.4; robin and goldfish bring animal to 0.7.
    label, score, _ = only_label(tax, probs(c281=0.2, c269=0.2, c15=0.15, c1=0.15))
    assert label == "animal" and score == pytest.approx(0.7)


def test_unknown_when_not_even_a_root_passes(tax: Taxonomy) -> None:
    (result,) = tax.classify(probs(c281=0.2, c817=0.2, c983=0.1))
    (label,) = result.labels
    assert (label.label, label.path) == (UNKNOWN, (UNKNOWN,))
    assert label.score == pytest.approx(0.5)  # the mass outside the taxonomy
    assert result.best_score == pytest.approx(0.2)


def test_a_root_leaf_has_nothing_to_roll_up_to(tax: Taxonomy) -> None:
    assert only_label(tax, probs(c983=0.4))[0] == UNKNOWN
    assert only_label(tax, probs(c983=0.4), rollup_threshold=0.3)[0] == "person"


def test_rollup_threshold_is_configurable(tax: Taxonomy) -> None:
    p = probs(c817=0.35, c717=0.2)
    assert only_label(tax, p)[0] == "vehicle"
    assert only_label(tax, p, rollup_threshold=0.3)[0] == "car"
    assert only_label(tax, p, rollup_threshold=0.6)[0] == UNKNOWN


def test_a_specific_label_beats_a_stronger_parent_elsewhere(tax: Taxonomy) -> None:
    # With a low threshold, car (0.3) passes; mammal (0.45) also does but is less specific.
    assert only_label(tax, probs(c817=0.3, c269=0.45), rollup_threshold=0.25)[0] == "car"


def test_batches_are_classified_row_by_row(tax: Taxonomy) -> None:
    batch = np.vstack([probs(c281=0.9), probs(c817=0.8), probs()])
    assert [r.labels[0].label for r in tax.classify(batch)] == ["cat", "car", UNKNOWN]


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float32, 1000, elements=st.floats(0, 1, width=32)),
    st.floats(0.05, 0.95),
)
def test_single_label_always_passes_its_threshold_or_is_unknown(
    tax: Taxonomy, raw: npt.NDArray[np.float32], threshold: float
) -> None:
    total = float(raw.sum())
    p = (raw / total if total > 0 else np.full(1000, 1e-3, dtype=np.float32))[None, :].astype(np.float32)
    (result,) = tax.classify(p, rollup_threshold=threshold)
    (label,) = result.labels
    scores = dict(zip(tax.labels, tax.scores(p)[0].tolist(), strict=True))
    if label.label == UNKNOWN:
        assert max(scores.values()) < threshold
    else:
        assert label.score >= threshold
        # Nothing more specific passes: no passing child of the chosen label.
        children = [c for c, parent in tax.parents.items() if parent == label.label]
        assert all(scores[c] < threshold for c in children)


# -- multi-label mode -----------------------------------------------------------------------


def test_multi_returns_every_passing_label_best_first(tax: Taxonomy) -> None:
    (result,) = tax.classify(probs(c281=0.4, c15=0.35, c817=0.2), mode="multi", default_threshold=0.3)
    assert [(x.label, round(x.score, 3)) for x in result.labels] == [
        ("animal", 0.75),
        ("cat", 0.4),
        ("mammal", 0.4),
        ("bird", 0.35),
    ]
    assert dict((x.label, x.path) for x in result.labels)["bird"] == ("animal", "bird")


def test_multi_uses_per_label_thresholds(tax: Taxonomy) -> None:
    p = probs(c281=0.4, c15=0.35, c817=0.2)
    (result,) = tax.classify(p, mode="multi", thresholds={"car": 0.15, "animal": 0.9}, default_threshold=0.38)
    assert [x.label for x in result.labels] == ["cat", "mammal", "car"]


def test_multi_is_unknown_when_nothing_passes(tax: Taxonomy) -> None:
    (result,) = tax.classify(probs(c281=0.1), mode="multi")
    assert [x.label for x in result.labels] == [UNKNOWN]


def test_bad_settings_are_config_errors(tax: Taxonomy) -> None:
    p = probs(c281=0.9)
    with pytest.raises(ConfigError, match="zebra"):
        tax.classify(p, mode="multi", thresholds={"zebra": 0.5})
    with pytest.raises(ConfigError, match="rollup_threshold"):
        tax.classify(p, rollup_threshold=1.5)
    with pytest.raises(ConfigError, match="mode"):
        tax.classify(p, mode="all")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        tax.path("zebra")


def test_top_k_is_sorted_and_bounded(tax: Taxonomy) -> None:
    p = probs(c281=0.5, c284=0.3, c15=0.1)
    (result,) = tax.classify(p, top_k=2)
    assert [c.index for c in result.top_k] == [TABBY, SIAMESE]
    (none,) = tax.classify(p, top_k=0)
    assert none.top_k == ()


# -- loading ----------------------------------------------------------------------------------


def test_a_model_with_another_class_order_is_refused() -> None:
    names = list(load_class_names())
    names[281], names[282] = names[282], names[281]
    with pytest.raises(ConfigError, match="does not fit this model"):
        Taxonomy.load(class_names=names)


def test_a_class_mapped_twice_is_refused(tmp_path: Path) -> None:
    doc = yaml.safe_load(DATA_FILE.read_text())
    doc["mapping"]["fox"]["classes"].append([281, "tabby"])
    path = tmp_path / "taxonomy.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="281"):
        Taxonomy.load(path)


def test_a_custom_taxonomy_file_is_loaded(tmp_path: Path) -> None:
    doc = {
        "version": "test-1",
        "labels": [{"label": "feline", "parent": "pet"}, {"label": "pet", "parent": None}],
        "mapping": {"feline": {"classes": [[281, "tabby"]]}, "pet": {"classes": [[151, "Chihuahua"]]}},
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(doc))
    tax = Taxonomy.load(path)
    assert (tax.version, tax.leaves, tax.labels) == ("test-1", ("feline",), ("feline", "pet"))
    assert only_label(tax, probs(c281=0.3, c151=0.3)) == ("pet", pytest.approx(0.6), ("pet",))
