"""`stream-worker review export`: the frames sampled for review become image files to label.

Against the real broker and Redis, through the CLI as an operator runs it.
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

from engine_build.finetune import finetune
from stream_worker.settings import Settings
from tests.conftest import REPO, Services, TopicFactory
from tests.support.media import photo_jpeg, street_jpegs
from tests.support.pipeline import produce_frames, read_topic, running_worker, worker_settings


def export(settings: Settings, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(REPO / ".venv/bin/stream-worker"),
            "review",
            "export",
            "--out",
            str(out),
            "--bootstrap",
            settings.kafka.bootstrap,
            "--review-topic",
            settings.topics.review_topic,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def all_sampled_for_review(
    services: Services, topic: str, key_prefix: str, images: list[bytes]
) -> tuple[Settings, list[str]]:
    """A worker that samples every frame for review has labelled ``images``; its settings and frame ids."""
    ids = await produce_frames(services.bootstrap, topic, [("cam-1", data) for data in images])
    settings = worker_settings(
        services.bootstrap,
        services.redis_url,
        topic,
        key_prefix,
        review_threshold=1.0,
        review_sample_rate=1.0,
    )
    async with running_worker(settings):
        await read_topic(services.bootstrap, settings.topics.review_topic, len(ids), settle_s=0)
    return settings, ids


async def test_review_samples_are_exported_once_as_images_with_a_manifest(
    services: Services, make_topic: TopicFactory, key_prefix: str, tmp_path: Path
) -> None:
    images = [*street_jpegs(3), photo_jpeg("chelsea.png")]
    settings, ids = await all_sampled_for_review(services, await make_topic("frames"), key_prefix, images)

    out = tmp_path / "review"
    first = export(settings, out)
    assert first.returncode == 0, first.stderr
    assert "4 new images" in first.stdout
    files = sorted((out / "_unsorted").iterdir())
    assert sorted(f.read_bytes() for f in files) == sorted(images)  # the frames themselves
    with (out / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["frame_id"] for r in rows) == sorted(ids)
    assert all((out / r["file"]).is_file() and r["labels"] and r["top_k"] for r in rows)

    # Filed under a label by a person, an image is not exported again.
    (out / "cat").mkdir()
    files[0].rename(out / "cat" / files[0].name)
    again = export(settings, out)
    assert again.returncode == 0 and "0 new images" in again.stdout and "4 exported before" in again.stdout


async def test_an_export_filed_into_label_folders_is_what_finetune_learns_from(
    services: Services, make_topic: TopicFactory, key_prefix: str, tmp_path: Path
) -> None:
    # The loop of the README: review -> label -> finetune. Some frames stay unsorted.
    street, cats = street_jpegs(5), [photo_jpeg("chelsea.png", quality=q) for q in (70, 80, 90)]
    settings, _ = await all_sampled_for_review(
        services, await make_topic("frames"), key_prefix, [*street, *cats]
    )
    out = tmp_path / "review"
    assert export(settings, out).returncode == 0
    cat_bytes = set(cats)
    for label in ("cat", "street"):
        (out / label).mkdir()
    filed = sorted((out / "_unsorted").iterdir())[:-1]  # a person files all but one
    for path in filed:
        path.rename(out / ("cat" if path.read_bytes() in cat_bytes else "street") / path.name)

    report = finetune(out, tmp_path / "mine.onnx", progress=False)
    assert report.class_names == ("cat", "street")
    assert sum(report.counts.values()) == len(filed)
