"""engine-build finetune on a small real ONNX classifier: the folder scan and its refusals, the
features, the joined model, its metadata, and the engines and labels made from it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine_build.cpu import build_cpu_engine
from engine_build.evaluate import evaluate_engine, run_engine
from engine_build.export import preprocess_batch
from engine_build.finetune import (
    FinetuneReport,
    feature_model,
    finetune,
    locate_classifier,
    scan_training_folder,
    taxonomy_document,
)
from engine_build.head import log_softmax
from engine_build.imagefolder import path_sources
from engine_build.metadata import read_onnx_model_info
from stream_worker.backends.registry import open_backend
from stream_worker.backends.sidecar import read_sidecar, sha256_file
from stream_worker.errors import ConfigError, EngineError
from stream_worker.preprocess import PreprocessSpec
from stream_worker.taxonomy import Taxonomy
from tests.unit.engine_fixtures import REPO_ROOT, build_tiny_onnx

COLOURS = {"person": (40, 40, 200), "vehicle/car": (200, 60, 40), "vehicle/bicycle": (50, 190, 60)}
"""BGR tints of the synthetic images of each label folder."""


def tinted(colour: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(colour, 45.0, (72, 96, 3)), 0, 255).astype(np.uint8)


def write_folder(root: Path, per_label: int = 6) -> Path:
    """``root/<folder>/<n>.jpg|png``: noisy images tinted by label, JPEG and PNG mixed."""
    for index, (folder, colour) in enumerate(COLOURS.items()):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for n in range(per_label):
            suffix = ".png" if n % 2 else ".jpg"
            cv2.imwrite(str(root / folder / f"{n:02d}{suffix}"), tinted(colour, 100 * index + n))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_onnx(tmp_path_factory.mktemp("base") / "tiny.onnx")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, tiny: Path, data: Path) -> tuple[Path, FinetuneReport]:
    out = tmp_path_factory.mktemp("tuned") / "tuned.onnx"
    return out, finetune(data, out, base_onnx=tiny, progress=False)


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


# -- the folder ---------------------------------------------------------------------------------


def test_the_folder_tree_becomes_the_classes_and_the_taxonomy(data: Path) -> None:
    training = scan_training_folder(data)
    assert training.class_names == ("person", "bicycle", "car")
    assert training.folders == ("person", "vehicle/bicycle", "vehicle/car")
    assert training.counts() == {"person": 6, "bicycle": 6, "car": 6}
    assert training.parents == {"person": None, "bicycle": "vehicle", "car": "vehicle", "vehicle": None}
    taxonomy = Taxonomy.for_classes(training.class_names, taxonomy_document(training))
    assert taxonomy.leaves == ("person", "bicycle", "car")
    assert taxonomy.path("car") == ("vehicle", "car")
    (result,) = taxonomy.classify(np.array([[0.1, 0.3, 0.6]], dtype=np.float32))
    assert (result.labels[0].label, result.labels[0].path) == ("car", ("vehicle", "car"))
    # A weak car rolls up to vehicle, which scores as its children together.
    (weak,) = taxonomy.classify(np.array([[0.2, 0.35, 0.45]], dtype=np.float32), rollup_threshold=0.5)
    assert (weak.labels[0].label, weak.labels[0].score) == ("vehicle", pytest.approx(0.8))


def _layout(root: Path, files: dict[str, int]) -> Path:
    """``files``: relative folder (or '.' for the root) -> number of images to write there."""
    root.mkdir(parents=True, exist_ok=True)
    for folder, n in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(root / folder / f"{i}.png"), tinted((90, 90, 90), i))
    return root


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no label folders in"),
        ({"cat": 0, "dog": 0}, "no JPEG or PNG images under"),
        ({"cat": 3}, "has one label only (cat): a classifier needs at least two"),
        ({"vehicle/car": 3}, "has one label only (vehicle/car)"),
        (
            {"cat": 3, "dog": 1, "fox": 0},
            "fewer than two JPEG/PNG images: dog (1), fox (0); every label needs",
        ),
        ({".": 1, "cat": 2, "dog": 2}, "image(s) outside any label folder (0.png, ...)"),
        ({"vehicle": 2, "vehicle/car": 2, "cat": 2}, "vehicle holds both images and label folders"),
        ({"a/cat": 2, "b/cat": 2}, "the label 'cat' appears twice (a/cat and b/cat)"),
        ({"unknown": 2, "cat": 2}, "'unknown' is reserved"),
        ({"my cat": 2, "dog": 2}, "folder 'my cat' is not a usable label name"),
        ({"_unsorted": 2, "dog": 2}, "has one label only (dog)"),  # _-prefixed folders are not labels
    ],
)
def test_untrainable_folders_are_refused_in_one_line(
    tmp_path: Path, files: dict[str, int], message: str
) -> None:
    root = _layout(tmp_path / "data", files)
    with pytest.raises(ConfigError) as refused:
        scan_training_folder(root)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="training folder not found"):
        scan_training_folder(tmp_path / "nowhere")


def test_every_unreadable_image_is_listed_and_nothing_is_written(
    tmp_path: Path, tiny: Path, data: Path
) -> None:
    root = Path(shutil.copytree(data, tmp_path / "data"))
    good_jpeg = (root / "person" / "00.jpg").read_bytes()
    (root / "person" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (root / "person" / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "vehicle" / "car" / "notes.png").write_text("not an image")
    # A PNG named .jpg is still a readable image: the bytes decide, not the suffix.
    shutil.copy(root / "person" / "01.png", root / "person" / "renamed.jpg")
    out = tmp_path / "out.onnx"
    with pytest.raises(ConfigError) as refused:
        finetune(root, out, base_onnx=tiny, progress=False)
    message = str(refused.value)
    assert message.startswith(f"3 of 22 images under {root} cannot be read: ")
    assert "person/garbage.jpg (" in message
    assert "person/truncated.jpg (truncated)" in message
    assert "vehicle/car/notes.png (neither JPEG nor PNG)" in message
    assert "renamed" not in message and "\n" not in message
    assert not out.exists() and not list(tmp_path.glob("out.onnx*"))


# -- the model ----------------------------------------------------------------------------------


def test_the_joined_model_is_the_head_on_the_base_models_features(
    tuned: tuple[Path, FinetuneReport], tiny: Path, data: Path
) -> None:
    out, report = tuned
    images = [cv2.imread(str(p)) for p in sorted(data.rglob("*.*"))]
    batch = preprocess_batch(images, PreprocessSpec.from_metadata(metadata(tiny)))
    base = onnx.load(str(tiny))
    extractor = ort.InferenceSession(feature_model(base, locate_classifier(base, "tiny")).SerializeToString())
    (features,) = extractor.run(None, {"images": batch})
    assert features.shape == (len(images), report.feature_dim) == (len(images), 16)
    head, temperature = report.trained.head, report.trained.temperature
    expected = np.exp(log_softmax((features @ head.weight.T + head.bias) / temperature))
    (got,) = ort.InferenceSession(str(out)).run(None, {"images": batch})
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.shape == (len(images), 3)
    # The graph before the head is the base's, untouched.
    base_nodes = [n.SerializeToString() for n in base.graph.node[:-2]]
    assert [n.SerializeToString() for n in onnx.load(str(out)).graph.node[:-2]] == base_nodes


def test_the_metadata_says_what_the_model_is_and_where_it_came_from(
    tuned: tuple[Path, FinetuneReport], tiny: Path
) -> None:
    out, report = tuned
    meta = metadata(out)
    assert json.loads(meta["class_names"]) == ["person", "bicycle", "car"]
    assert json.loads(meta["taxonomy"]) == report.taxonomy
    assert report.taxonomy["version"].startswith("finetuned-")
    assert float(meta["temperature"]) == report.trained.temperature
    assert json.loads(meta["training_counts"]) == {"person": 6, "bicycle": 6, "car": 6}
    assert meta["training_data_sha256"] == report.data_sha256
    assert meta["model_version"] == report.data_sha256[:12]
    assert (meta["model_name"], meta["base_model"]) == ("tiny-finetuned", "tiny test-1")
    assert meta["base_onnx_sha256"] == sha256_file(tiny)
    assert float(meta["cv_accuracy"]) == report.cv_accuracy == 1.0
    training = json.loads(meta["training"])
    assert training["cv_folds"] == 5 and training["l2_penalty"] == report.trained.l2
    assert {row["l2"] for row in training["cv"]} >= {report.trained.l2}
    base_spec = PreprocessSpec.from_metadata(metadata(tiny))
    assert PreprocessSpec.from_metadata(meta) == base_spec
    info = read_onnx_model_info(out)
    assert (info.taxonomy_version, info.output_name) == (report.taxonomy["version"], "probabilities")


def test_the_data_digest_follows_the_images_and_their_labels(tmp_path: Path, tiny: Path, data: Path) -> None:
    root = Path(shutil.copytree(data, tmp_path / "data"))
    first = finetune(root, tmp_path / "a.onnx", base_onnx=tiny, progress=False)
    again = finetune(root, tmp_path / "b.onnx", base_onnx=tiny, progress=False)
    assert again.data_sha256 == first.data_sha256
    np.testing.assert_array_equal(again.trained.head.weight, first.trained.head.weight)  # deterministic
    shutil.move(root / "vehicle" / "car" / "05.png", root / "vehicle" / "bicycle" / "99.png")
    moved = finetune(root, tmp_path / "c.onnx", base_onnx=tiny, progress=False)
    assert moved.data_sha256 != first.data_sha256
    assert moved.counts == {"person": 6, "bicycle": 7, "car": 5}


def test_engines_built_from_it_label_with_its_own_taxonomy(
    tuned: tuple[Path, FinetuneReport], data: Path, tmp_path: Path
) -> None:
    out, report = tuned
    engine = tmp_path / "tuned-fp32.onnx"
    build_cpu_engine(out, engine, precision="fp32", progress=False)
    sidecar = read_sidecar(engine)
    assert sidecar.taxonomy == report.taxonomy
    assert sidecar.class_names == ("person", "bicycle", "car")
    backend = open_backend(engine)
    try:
        taxonomy = Taxonomy.for_engine(backend.info)
        fresh = [tmp_path / f"{name}.png" for name in ("person", "car")]
        cv2.imwrite(str(fresh[0]), tinted(COLOURS["person"], 999))
        cv2.imwrite(str(fresh[1]), tinted(COLOURS["vehicle/car"], 998))
        person, car = taxonomy.classify(run_engine(backend, path_sources(fresh)))
        assert (person.labels[0].label, person.labels[0].path) == ("person", ("person",))
        assert (car.labels[0].label, car.labels[0].path) == ("car", ("vehicle", "car"))
        # evaluate reads the nested training layout: vehicle/car/x.jpg is a car.
        report_on_data = evaluate_engine(backend, data, taxonomy)
        assert report_on_data.n == 18 and report_on_data.labels == ("person", "bicycle", "car")
        assert report_on_data.accuracy == 1.0
    finally:
        backend.close()
    # INT8, calibrated on the training folder: the new head stays in float, as the shipped one does.
    int8 = tmp_path / "tuned-int8.onnx"
    build_cpu_engine(out, int8, precision="int8", calib_dir=data, progress=False)
    quantised = open_backend(int8)
    try:
        assert evaluate_engine(quantised, data, Taxonomy.for_engine(quantised.info)).accuracy == 1.0
    finally:
        quantised.close()


def test_a_model_without_a_softmax_over_a_gemm_is_refused(tmp_path: Path, tiny: Path, data: Path) -> None:
    model = onnx.load(str(tiny))
    softmax = model.graph.node[-1]
    model.graph.node.remove(softmax)
    model.graph.output[0].name = softmax.input[0]
    bare = tmp_path / "logits.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(EngineError, match=r"needs a classifier whose output is Softmax\(Gemm\(features\)\)"):
        finetune(data, tmp_path / "out.onnx", base_onnx=bare, progress=False)
    with pytest.raises(ConfigError, match="would overwrite the base model"):
        finetune(data, tiny, base_onnx=tiny, progress=False)


# -- the command ------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine_build.cli", "finetune", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_cli_refuses_bad_folders_in_one_line(tmp_path: Path) -> None:
    root = _layout(tmp_path / "data", {"cat": 3, "dog": 1})
    result = _cli("--data", str(root), "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"engine-build: error: {root}: label(s) with fewer than two JPEG/PNG images: dog (1); every label "
        "needs at least two (cross-validation holds some out)"
    ]


def test_cli_trains_and_reports(tmp_path: Path, tiny: Path, data: Path) -> None:
    out = tmp_path / "m.onnx"
    result = _cli("--data", str(data), "--out", str(out), "--onnx", str(tiny), "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["class_names"] == ["person", "bicycle", "car"]
    assert report["counts"] == {"person": 6, "bicycle": 6, "car": 6}
    assert report["cv_accuracy"] == 1.0 and report["cv_folds"] == 5
    assert out.is_file()
