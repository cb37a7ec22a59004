"""A fine-tuned model served end to end against the real broker and Redis (issue #14, item 3's
'done when'): ``engine-build finetune`` on a labelled folder with a label ImageNet-1k lacks
(``person``) and a nested one (``vehicle/car``), an fp32 engine built from it, and a worker that
serves it unchanged, its labels coming from the engine."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from engine_build.cpu import build_cpu_engine
from engine_build.finetune import FinetuneReport, finetune
from stream_worker import codec
from stream_worker.replay import encode_jpeg
from stream_worker.sinks.counts import CountsReader
from tests.conftest import Services, TopicFactory
from tests.support.media import labelled_shots, write_labelled_folder
from tests.support.pipeline import produce_frames, read_topic, running_worker, worker_settings
from tests.unit.engine_fixtures import COMMITTED_ONNX

pytestmark = pytest.mark.skipif(not COMMITTED_ONNX.is_file(), reason=f"{COMMITTED_ONNX} not exported yet")

HELD_OUT_PER_LABEL = 5


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FinetuneReport]:
    """16 augmented shots per label, fine-tuned over the shipped model, built as an fp32 engine."""
    root = tmp_path_factory.mktemp("finetune")
    write_labelled_folder(root / "data", 16, seed=0)
    report = finetune(root / "data", root / "model.onnx", progress=False)
    engine = root / "model-fp32.onnx"
    build_cpu_engine(root / "model.onnx", engine, precision="fp32", progress=False)
    return engine, report


async def test_a_finetuned_engine_labels_and_counts_its_own_labels(
    services: Services,
    make_topic: TopicFactory,
    redis_client: aioredis.Redis,
    key_prefix: str,
    finetuned: tuple[Path, FinetuneReport],
) -> None:
    engine, report = finetuned
    assert report.class_names == ("cat", "person", "bicycle", "car")
    # Other crops of the same photos and clips than the training folder's (another seed):
    # one camera per label folder.
    held_out = labelled_shots(HELD_OUT_PER_LABEL, seed=1)
    camera = {folder: "cam-" + folder.replace("/", "-") for folder in held_out}
    frames = [
        (camera[folder], encode_jpeg(image, 90, None))
        for folder, images in held_out.items()
        for image in images
    ]
    topic = await make_topic("frames", partitions=2)
    ids = await produce_frames(services.bootstrap, topic, frames)
    settings = worker_settings(services.bootstrap, services.redis_url, topic, key_prefix, engine=str(engine))
    async with running_worker(settings):
        labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(ids))

    records = [codec.parse_label_record(r.value) for r in labels]
    assert sorted(r["frame_id"] for r in records) == sorted(ids)
    for record in records:
        model = record["model"]
        assert (model["name"], model["version"]) == (report.model_name, report.model_version)
        assert model["taxonomy_version"] == report.taxonomy["version"]
        assert {c["name"] for c in record["top_k"]} <= set(report.class_names)

    # Each camera's frames are labelled with its folder's label, path included: person (which
    # ImageNet-1k has no class for) as a root, car and bicycle under vehicle.
    expected_path = {"person": ["person"], "cat": ["cat"], "vehicle/car": ["vehicle", "car"]}
    expected_path["vehicle/bicycle"] = ["vehicle", "bicycle"]
    seen: dict[str, Counter[str]] = {source: Counter() for source in camera.values()}
    for record in records:
        best = record["labels"][0]
        seen[record["source_id"]]["/".join(best["path"])] += 1
    for folder, source in camera.items():
        right = seen[source]["/".join(expected_path[folder])]
        assert right >= HELD_OUT_PER_LABEL - 1, (folder, dict(seen[source]))

    # Redis holds exactly the counts the label records imply (leaf and parents, once per frame),
    # so the new labels are counted: person on the person camera, vehicle and car on the car one.
    counts = CountsReader(redis_client, key_prefix=key_prefix)
    stored: dict[str, Counter[str]] = {}
    for source in camera.values():
        implied: Counter[str] = Counter()
        for record in (r for r in records if r["source_id"] == source):
            implied.update({name for lab in record["labels"] for name in (lab["label"], *lab["path"])})
        stored[source] = Counter()
        for window in await counts.read(source, "1m"):
            stored[source].update(window.labels)
        assert stored[source] == implied, source
    assert stored[camera["person"]]["person"] >= HELD_OUT_PER_LABEL - 1
    car = stored[camera["vehicle/car"]]
    assert car["car"] >= HELD_OUT_PER_LABEL - 1 and car["vehicle"] >= car["car"]
