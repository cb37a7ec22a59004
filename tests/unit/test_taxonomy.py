"""The domain taxonomy: the packaged map, score sums, roll-up, multi-label thresholds, and its
binding to an engine's own classes (engines made from the shipped model)."""

from __future__ import annotations

import dataclasses
import functools
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engine_build.cpu import build_cpu_engine
from engine_build.evaluate import run_engine
from engine_build.imagefolder import ImageSource, bundled_street_and_photo_sources
from engine_build.metadata import write_sidecar
from stream_worker.backends.registry import open_backend
from stream_worker.backends.sidecar import read_sidecar, sha256_file
from stream_worker.errors import ConfigError, EngineError
from stream_worker.frames import FrameLabels
from stream_worker.taxonomy import UNKNOWN, Taxonomy, load_class_names
from tests.unit.engine_fixtures import COMMITTED_ONNX, with_classes

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
    assert tax.path("dog") == ("animal", "mammal", "dog")
    parents = {leaf: tax.parents[leaf] for leaf in tax.leaves}
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


def counted_for(tax: Taxonomy, label: str) -> list[int]:
    """The classes whose frames count for ``label`` when the model is sure of them: one-hot frames, scored."""
    sure = tax.scores(np.eye(len(tax.class_names), dtype=np.float32))
    return np.flatnonzero(sure[:, tax.labels.index(label)] == 1.0).tolist()


@functools.cache
def taxonomy_file() -> Any:
    return yaml.safe_load(DATA_FILE.read_text())


@functools.cache
def mapped_classes(label: str) -> list[int]:
    """The classes the taxonomy file maps to ``label`` or to a label under it (the tests' oracle)."""
    doc = taxonomy_file()
    parent = {row["label"]: row["parent"] for row in doc["labels"]}

    def under(node: str | None) -> bool:
        while node is not None and node != label:
            node = parent[node]
        return node == label

    return sorted(i for mapped, entry in doc["mapping"].items() if under(mapped) for i, _ in entry["classes"])


def test_the_decisions_the_model_card_relies_on(tax: Taxonomy) -> None:
    names = tax.class_names
    assert len(names) == 1000
    assert counted_for(tax, "dog") == list(range(151, 269))
    assert counted_for(tax, "cat") == list(range(281, 286))
    assert [names[i] for i in counted_for(tax, "wild_boar")] == ["wild boar"]
    hog = names.index("hog")
    assert hog not in counted_for(tax, "wild_boar") and hog in counted_for(tax, "mammal")
    assert [names[i] for i in counted_for(tax, "person")] == ["ballplayer", "groom", "scuba diver"]
    for antelope in ("hartebeest", "impala", "gazelle"):
        assert names.index(antelope) in counted_for(tax, "mammal")
    # Every ImageNet animal class (0-397) is under 'animal' but the two extinct ones.
    extinct = {names.index("triceratops"), names.index("trilobite")}
    assert set(range(398)) - set(counted_for(tax, "animal")) == extinct
    # The railway 'passenger car' is no car; big cats are no cats.
    assert names.index("passenger car") not in counted_for(tax, "car")
    assert names.index("lion") not in counted_for(tax, "cat")
    assert not set(counted_for(tax, "vehicle")) & set(counted_for(tax, "animal"))


# -- scores -----------------------------------------------------------------------------------


def test_scores_are_sums_of_class_probabilities(tax: Taxonomy) -> None:
    rng = np.random.default_rng(7)
    batch = rng.dirichlet(np.full(1000, 0.05), size=6).astype(np.float32)
    scores = tax.scores(batch)
    assert scores.shape == (6, len(tax.labels))
    for j, label in enumerate(tax.labels):
        expected = batch[:, mapped_classes(label)].sum(axis=1)
        np.testing.assert_allclose(scores[:, j], expected, rtol=1e-5, atol=1e-6)
    column = {label: j for j, label in enumerate(tax.labels)}
    mammal_children = [leaf for leaf in tax.leaves if tax.parents[leaf] == "mammal"]
    in_children = {i for child in mammal_children for i in mapped_classes(child)}
    direct_mammal = batch[:, [i for i in mapped_classes("mammal") if i not in in_children]].sum(axis=1)
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


# -- bound to the model's own class names --------------------------------------------------


def assert_same_labels(
    got: Sequence[FrameLabels], expected: Sequence[FrameLabels], atol: float = 1e-5
) -> None:
    """The same labels and paths, frame by frame, with scores equal up to float rounding."""
    assert [[(x.label, x.path) for x in r.labels] for r in got] == [
        [(x.label, x.path) for x in r.labels] for r in expected
    ]
    np.testing.assert_allclose(
        [x.score for r in got for x in r.labels], [x.score for r in expected for x in r.labels], atol=atol
    )


def test_classes_are_matched_by_name_whatever_their_order(tax: Taxonomy) -> None:
    order = np.random.default_rng(3).permutation(1000)
    shuffled = Taxonomy.for_classes([tax.class_names[i] for i in order])
    batch = np.random.default_rng(4).dirichlet(np.full(1000, 0.05), size=8).astype(np.float32)
    batch[0] = probs(c281=0.6, c284=0.3)[0]
    # Column j of the shuffled model's output is the class order[j] of the packaged list.
    np.testing.assert_allclose(shuffled.scores(batch[:, order]), tax.scores(batch), rtol=1e-5, atol=1e-6)
    assert_same_labels(shuffled.classify(batch[:, order]), tax.classify(batch))
    (cat,) = shuffled.classify(batch[:1, order])
    assert cat.labels[0].label == "cat"
    assert cat.top_k[0].name == "tabby" and order[cat.top_k[0].index] == TABBY


def test_a_model_lacking_mapped_classes_is_refused_naming_them() -> None:
    names = [n for n in load_class_names() if n not in ("tabby", "tiger cat")]
    with pytest.raises(EngineError) as excinfo:
        Taxonomy.for_classes(names, origin="engine e.onnx")
    message = str(excinfo.value)
    assert message.startswith("engine e.onnx lacks 2 of the classes taxonomy 1.0.0 maps: ")
    assert "'tabby' (cat), 'tiger cat' (cat)" in message and "\n" not in message
    # Another class set altogether: the first few are named, with how many more.
    with pytest.raises(EngineError, match=r"lacks \d+ of the classes .* and \d+ more; serve an engine"):
        Taxonomy.for_classes(["feline", "canine"])


def test_unmapped_classes_may_be_missing_or_extra() -> None:
    names = [n for n in load_class_names() if n != "toilet tissue"] + ["lawn mower robot"]
    tax = Taxonomy.for_classes(names)
    batch = np.zeros((2, 1000), dtype=np.float32)
    batch[0, names.index("tabby")], batch[0, names.index("lawn mower robot")] = 0.7, 0.3
    batch[1, names.index("lawn mower robot")] = 1.0
    cat, robot = (r.labels[0] for r in tax.classify(batch))
    assert cat.label == "cat" and cat.score == pytest.approx(0.7)
    assert robot.label == UNKNOWN and robot.score == pytest.approx(1.0)


def test_a_mapped_class_name_that_repeats_cannot_be_matched() -> None:
    names = list(load_class_names())
    names[998] = names[999]  # two unmapped 'toilet tissue' classes are harmless
    Taxonomy.for_classes(names)
    names[999] = names[281]
    with pytest.raises(EngineError, match=r"the mapped class names 'tabby' repeat among its 1000 classes"):
        Taxonomy.for_classes(names)


def test_a_model_with_its_own_taxonomy_is_labelled_with_it() -> None:
    doc = {
        "version": "pets-1",
        "labels": [{"label": "feline", "parent": "pet"}, {"label": "pet", "parent": None}],
        "mapping": {"feline": {"classes": [[0, "tabby"]]}, "pet": {"classes": [[1, "Chihuahua"]]}},
    }
    tax = Taxonomy.for_classes(["Chihuahua", "tabby", "lawn mower robot"], doc)
    assert (tax.version, tax.leaves, tax.labels) == ("pets-1", ("feline",), ("feline", "pet"))
    (result,) = tax.classify(np.array([[0.1, 0.8, 0.1]], dtype=np.float32))
    assert (result.labels[0].label, result.labels[0].path) == ("feline", ("pet", "feline"))
    with pytest.raises(ConfigError, match="mapping for undeclared label 'dog'"):
        Taxonomy.for_classes(["tabby"], {**doc, "mapping": {"dog": {"classes": []}}})


# -- engines made from the shipped model ----------------------------------------------------

needs_model = pytest.mark.skipif(not COMMITTED_ONNX.is_file(), reason=f"{COMMITTED_ONNX} not exported yet")


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


def build_engine(onnx_path: Path) -> Path:
    engine = onnx_path.with_name(f"{onnx_path.stem}-fp32.onnx")
    build_cpu_engine(onnx_path, engine, precision="fp32", progress=False)
    return engine


@pytest.fixture(scope="module")
def photos() -> list[ImageSource]:
    """Real photos (a cat, motorcycles, a person, coffee, a rocket) and street frames."""
    return bundled_street_and_photo_sources(16)


@pytest.fixture(scope="module")
def shipped(engine_dir: Path) -> Path:
    return build_engine(Path(shutil.copy(COMMITTED_ONNX, engine_dir / "shipped.onnx")))


def labelled(engine: Path, photos: Sequence[ImageSource]) -> list[FrameLabels]:
    """What serving says about ``photos``: the engine's output through the taxonomy bound to it."""
    backend = open_backend(engine)
    try:
        return Taxonomy.for_engine(backend.info).classify(run_engine(backend, photos))
    finally:
        backend.close()


def leaf_labels(results: Sequence[FrameLabels]) -> list[str]:
    return [r.labels[0].label for r in results]


@needs_model
def test_an_engine_with_its_classes_permuted_is_labelled_like_the_shipped_one(
    engine_dir: Path, shipped: Path, photos: list[ImageSource]
) -> None:
    order = np.random.default_rng(12).permutation(1000).tolist()
    permuted = build_engine(with_classes(COMMITTED_ONNX, engine_dir / "permuted.onnx", order))
    expected = labelled(shipped, photos)
    assert {"cat", "motorcycle"} <= set(leaf_labels(expected))  # the photos say something
    got = labelled(permuted, photos)
    assert_same_labels(got, expected)
    assert [[c.name for c in r.top_k] for r in got] == [[c.name for c in r.top_k] for r in expected]
    # The packaged ImageNet order, which serving used before, mislabels this engine.
    backend = open_backend(permuted)
    packaged_order = Taxonomy.load().classify(run_engine(backend, photos))
    assert leaf_labels(packaged_order) != leaf_labels(expected)


@needs_model
def test_an_engine_without_a_mapped_class_is_refused_at_build_and_at_start_up(
    engine_dir: Path, shipped: Path
) -> None:
    names = load_class_names()
    keep = [i for i, name in enumerate(names) if name != "tabby"]
    no_tabby = with_classes(COMMITTED_ONNX, engine_dir / "no-tabby.onnx", keep)
    with pytest.raises(EngineError) as built:
        build_engine(no_tabby)
    assert "lacks 1 of the classes taxonomy 1.0.0 maps: 'tabby' (cat)" in str(built.value)
    assert "\n" not in str(built.value)
    assert not (engine_dir / "no-tabby-fp32.onnx").exists()
    # An engine made without that check (an older engine-build, another tool) runs, but is
    # refused before it labels anything.
    engine = Path(shutil.copy(no_tabby, engine_dir / "no-tabby-unchecked.onnx"))
    sidecar = dataclasses.replace(
        read_sidecar(shipped),
        class_names=tuple(names[i] for i in keep),
        onnx_path=str(no_tabby),
        onnx_sha256=sha256_file(no_tabby),
        engine_sha256=sha256_file(engine),
    )
    write_sidecar(engine, sidecar)
    backend = open_backend(engine)
    assert backend.infer(np.zeros((1, *backend.info.input_shape), np.float32)).shape == (1, 999)
    with pytest.raises(EngineError) as served:
        Taxonomy.for_engine(backend.info)
    message = str(served.value)
    assert message.startswith(f"engine {engine} lacks 1 of the classes taxonomy 1.0.0 maps: 'tabby' (cat)")
    assert "\n" not in message


@needs_model
def test_an_engine_without_an_unmapped_class_is_labelled_like_the_shipped_one(
    engine_dir: Path, shipped: Path, photos: list[ImageSource]
) -> None:
    keep = [i for i, name in enumerate(load_class_names()) if name != "toilet tissue"]
    without = build_engine(with_classes(COMMITTED_ONNX, engine_dir / "no-tissue.onnx", keep))
    # The softmax spreads the dropped class's (tiny) probability over the rest: scores move a little.
    assert_same_labels(labelled(without, photos), labelled(shipped, photos), atol=1e-3)


@needs_model
def test_an_engine_with_its_own_label_set_is_served_with_its_own_labels(
    engine_dir: Path, photos: list[ImageSource]
) -> None:
    names = load_class_names()
    pets = list(range(151, 286))  # dogs, wolves and foxes, cats: a model of pets and their kin
    own = {
        "version": "pets-1",
        "labels": [
            {"label": "feline", "parent": "pet"},
            {"label": "canine", "parent": "pet"},
            {"label": "pet", "parent": None},
        ],
        "mapping": {
            "feline": {"classes": [[j, names[i]] for j, i in enumerate(pets) if i >= 281]},
            "canine": {"classes": [[j, names[i]] for j, i in enumerate(pets) if i < 269]},
            "pet": {"classes": []},
        },
    }
    engine = build_engine(with_classes(COMMITTED_ONNX, engine_dir / "pets.onnx", pets, taxonomy=own))
    sidecar = read_sidecar(engine)
    assert (sidecar.taxonomy, sidecar.taxonomy_version) == (own, "pets-1")
    (chelsea,) = (i for i, p in enumerate(photos) if p.name.endswith("chelsea.png"))
    result = labelled(engine, photos)[chelsea]
    assert (result.labels[0].label, result.labels[0].path) == ("feline", ("pet", "feline"))
    # The packaged taxonomy cannot label this model at all.
    with pytest.raises(EngineError, match=r"lacks \d+ of the classes taxonomy 1.0.0 maps"):
        Taxonomy.for_classes(sidecar.class_names)
