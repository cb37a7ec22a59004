"""A worker serving a calibrated engine uses the thresholds fitted into it, against the real broker.

The calibration here is written by hand (``write_calibrated_model``, the writer
``engine-build calibrate`` uses) with extreme thresholds, so the outcome cannot come from the
built-in defaults: a review threshold of 1.0 sends every frame to review, where the default 0.3
would keep the confidently labelled cat photo out of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_build.calibrate import write_calibrated_model
from engine_build.cpu import build_cpu_engine
from engine_build.imagefolder import read_image, sample_photo
from stream_worker import codec
from stream_worker.calibration import Calibration
from stream_worker.replay import encode_jpeg
from tests.conftest import Services, TopicFactory
from tests.support.pipeline import produce_frames, read_topic, running_worker, worker_settings
from tests.unit.engine_fixtures import COMMITTED_ONNX

pytestmark = pytest.mark.skipif(not COMMITTED_ONNX.is_file(), reason=f"{COMMITTED_ONNX} not exported yet")

PHOTOS = ("chelsea.png", "motorcycle_left.png", "coffee.png")


@pytest.fixture(scope="module")
def calibrated_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("calibrated")
    fitted = Calibration(serving_temperature=0.5, rollup_threshold=0.4, review_threshold=1.0)
    write_calibrated_model(COMMITTED_ONNX, root / "model.onnx", fitted)
    engine = root / "engine.onnx"
    build_cpu_engine(root / "model.onnx", engine, precision="fp32", progress=False)
    return engine


async def test_the_worker_takes_the_review_threshold_from_the_engine_unless_set(
    services: Services, make_topic: TopicFactory, key_prefix: str, calibrated_engine: Path
) -> None:
    frames = [(f"cam-{name}", encode_jpeg(read_image(sample_photo(name)), 90, None)) for name in PHOTOS]
    topic = await make_topic("frames")
    ids = await produce_frames(services.bootstrap, topic, frames)
    settings = worker_settings(
        services.bootstrap,
        services.redis_url,
        topic,
        key_prefix,
        engine=str(calibrated_engine),
        review_sample_rate=1.0,
    )
    async with running_worker(settings) as worker:
        labels = await read_topic(services.bootstrap, settings.topics.labels_topic, len(ids))
        reviewed = await read_topic(services.bootstrap, settings.topics.review_topic, len(ids), settle_s=2)
        assert worker.settings.origin("counts", "review_threshold").kind == "engine"
    parsed = [codec.parse_label_record(r.value) for r in labels]
    cat = next(r["labels"][0] for r in parsed if r["source_id"] == "cam-chelsea.png")
    assert cat["label"] == "cat" and cat["score"] >= 0.3  # so the default threshold would not review it
    assert len(reviewed) == len(ids)  # the engine's review threshold (1.0) sent every frame

    # Set by the user, the review threshold is the user's: nothing scores under 0.
    topic = await make_topic("frames")
    ids = await produce_frames(services.bootstrap, topic, frames)
    mine = worker_settings(
        services.bootstrap,
        services.redis_url,
        topic,
        key_prefix,
        engine=str(calibrated_engine),
        review_sample_rate=1.0,
        review_threshold=0.0,
    )
    async with running_worker(mine) as worker:
        await read_topic(services.bootstrap, mine.topics.labels_topic, len(ids))
        assert worker.settings.counts.review_threshold == 0.0
    assert await read_topic(services.bootstrap, mine.topics.review_topic, 0, settle_s=2) == []
