"""Closing the loop: the frames sampled for review, exported as image files to be labelled.

The worker samples low-confidence frames to the review topic (the frame's image, its own
headers and its label record in ``lookout-labels``). ``stream-worker review export --out DIR``
reads that topic up to its current end and writes:

* ``DIR/_unsorted/<frame>.jpg|png``: one image per sampled frame (a frame exported before is
  not written again, so the command can run on a schedule into the same folder);
* ``DIR/manifest.csv``: one row per image written (file, source, frame id, capture time, the
  labels the engine gave with their scores, its top classes), appended to.

A person moves each image from ``_unsorted/`` into ``DIR/<label>/`` (nested folders for the
hierarchy, e.g. ``vehicle/car``); ``engine-build finetune --data DIR`` then learns from them
(folders starting with ``_`` are not labels). Nothing is sorted for them: an image filed under
the engine's own guess would teach the engine its own mistakes.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream_worker.decode import sniff_content_type
from stream_worker.errors import ConfigError
from stream_worker.kafka import records_to_end
from stream_worker.settings import Settings

UNSORTED = "_unsorted"
MANIFEST = "manifest.csv"
MANIFEST_FIELDS = (
    "file",
    "source_id",
    "frame_id",
    "captured_at",
    "labels",
    "top_k",
    "topic",
    "partition",
    "offset",
)
READ_TIMEOUT_S = 300.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What one export did."""

    written: int
    already_there: int
    skipped: int
    """Records that were not review samples (no label record, or not a JPEG or PNG)."""


def file_name(record: Any, labels: dict[str, Any]) -> str:
    """A file name safe on every file system, unique per frame: the frame id, then where it was read."""
    stem = _UNSAFE.sub("_", str(labels.get("frame_id", "")))[:120].strip("._") or "frame"
    topic, partition = labels.get("topic", record.topic), labels.get("partition", record.partition)
    where = f"{topic}-{partition}-{labels.get('offset', record.offset)}"
    return f"{stem}__{_UNSAFE.sub('_', where)}"


_EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png"}


def extension(data: bytes) -> str | None:
    """``.jpg`` or ``.png`` from the image's magic bytes; ``None`` for anything else."""
    return _EXTENSIONS.get(sniff_content_type(data) or "")


def manifest_row(file: str, labels: dict[str, Any]) -> dict[str, str]:
    """One manifest row: the engine's labels as ``label:score`` pairs, best first."""
    return {
        "file": file,
        "source_id": str(labels.get("source_id", "")),
        "frame_id": str(labels.get("frame_id", "")),
        "captured_at": str(labels.get("captured_at", "")),
        "labels": ";".join(f"{x['label']}:{x['score']:.3f}" for x in labels.get("labels", [])),
        "top_k": ";".join(f"{x['name']}:{x['score']:.3f}" for x in labels.get("top_k", [])),
        "topic": str(labels.get("topic", "")),
        "partition": str(labels.get("partition", "")),
        "offset": str(labels.get("offset", "")),
    }


async def export_review(settings: Settings, out: Path, *, limit: int | None = None) -> ExportReport:
    """Write the review topic's frames under ``out`` (see the module docstring)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder")
    unsorted = out / UNSORTED
    unsorted.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    new_manifest = not manifest.exists()
    written = already = skipped = 0
    # Already exported: still unsorted, or filed under a label since.
    existing = {path.name for path in out.rglob("*") if path.is_file()}
    with manifest.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        if new_manifest:
            writer.writeheader()
        topic = settings.topics.review_topic
        async for batch in records_to_end(settings.kafka, topic, timeout_s=READ_TIMEOUT_S, what="review"):
            for record in batch:
                headers = {name: raw for name, raw in record.headers}
                data = record.value or b""
                suffix = extension(data)
                try:
                    labels = json.loads(headers.get("lookout-labels") or b"")
                except ValueError:
                    labels = None
                if suffix is None or not isinstance(labels, dict):
                    skipped += 1
                    continue
                name = file_name(record, labels) + suffix
                if name in existing:
                    already += 1
                    continue
                (unsorted / name).write_bytes(data)
                existing.add(name)
                writer.writerow(manifest_row(f"{UNSORTED}/{name}", labels))
                written += 1
                if limit is not None and written >= limit:
                    return ExportReport(written, already, skipped)
    return ExportReport(written, already, skipped)
