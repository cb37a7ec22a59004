"""The published output contracts: JSON Schemas that records the worker really wrote satisfy.

Against the real broker and Redis, with a maintained JSON Schema library (``jsonschema``, draft
2020-12). A consumer generates its types from these files (`stream-worker schema NAME`), so a
field the worker writes that its schema does not allow, or a required one it leaves out, fails
here.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from stream_worker import codec
from stream_worker.frames import SourceKind
from stream_worker.schemas import SCHEMAS, load_schema
from tests.conftest import REPO, Services, TopicFactory
from tests.support.media import photo_jpeg, street_jpegs
from tests.support.pipeline import produce_frames, read_topic, running_worker, worker_settings


def validator(name: str) -> Draft202012Validator:
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def headers_of(record: Any) -> dict[str, str]:
    return {name: (raw or b"").decode("utf-8", "replace") for name, raw in record.headers}


def test_every_schema_is_valid_draft_2020_12_and_printed_by_the_cli() -> None:
    assert set(SCHEMAS) >= {
        "label-record",
        "window-counts-key",
        "window-counts-value",
        "camera-trap-event",
        "review-headers",
        "dead-letter-headers",
        "frame-headers",
    }
    for name in SCHEMAS:
        validator(name)
    listing = subprocess.run(
        [str(REPO / ".venv/bin/stream-worker"), "schema"], capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0 and set(listing.stdout.split()) == set(SCHEMAS)
    printed = subprocess.run(
        [str(REPO / ".venv/bin/stream-worker"), "schema", "label-record"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(printed.stdout) == load_schema("label-record")
    unknown = subprocess.run(
        [str(REPO / ".venv/bin/stream-worker"), "schema", "labels"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 2 and "label-record" in unknown.stderr and "\n" not in unknown.stderr.strip()


async def test_records_the_worker_wrote_satisfy_their_schemas(
    services: Services, make_topic: TopicFactory, key_prefix: str
) -> None:
    topic = await make_topic("frames", partitions=2)
    street = street_jpegs(4)
    cat = photo_jpeg("chelsea.png")
    frames = await produce_frames(services.bootstrap, topic, [("cam-1", data) for data in street])
    trap = await produce_frames(services.bootstrap, topic, [("trap-1", cat)] * 2, kind=SourceKind.WILDLIFE)
    bad = await produce_frames(services.bootstrap, topic, [("cam-2", b"\xff\xd8 not a jpeg")])
    settings = worker_settings(
        services.bootstrap,
        services.redis_url,
        topic,
        key_prefix,
        review_threshold=1.0,  # every frame is low-confidence: every one is sampled for review
        review_sample_rate=1.0,
    )
    good = len(frames) + len(trap)
    async with running_worker(settings):
        labels = await read_topic(services.bootstrap, settings.topics.labels_topic, good, settle_s=0)
        review = await read_topic(services.bootstrap, settings.topics.review_topic, good, settle_s=0)
        dead = await read_topic(
            services.bootstrap, settings.topics.dlq_topic.format(topic=topic), len(bad), settle_s=0
        )
        counts = await read_topic(services.bootstrap, settings.topics.counts_topic, 1, settle_s=2)
        events = await read_topic(services.bootstrap, settings.topics.events_topic, 1, settle_s=0)

    label_schema = validator("label-record")
    for record in labels:
        label_schema.validate(json.loads(record.value))
    models = {json.dumps(json.loads(r.value)["model"], sort_keys=True) for r in labels}
    assert len(models) == 1
    model = json.loads(models.pop())
    for record in review:
        headers = headers_of(record)
        validator("review-headers").validate(headers)
        label_schema.validate(json.loads(headers["lookout-labels"]))
    for record in dead:
        headers = headers_of(record)
        validator("dead-letter-headers").validate(headers)
        assert headers["lookout.engine.sha256"] == model["engine_sha256"]
    kinds = set()
    for record in counts:
        validator("window-counts-key").validate(record.key.decode())
        value = codec.parse_count_record(record.value)
        validator("window-counts-value").validate(value)
        assert value["model"] == {k: model[k] for k in ("engine_sha256", "taxonomy_version")}
        kinds.add(value["kind"])
    assert kinds == {"labels", "events"}  # both kinds of count record were checked
    for record in events:
        value = json.loads(record.value)
        validator("camera-trap-event").validate(value)
        assert record.key.decode() == value["event_id"]


def test_the_headers_lookout_tells_producers_to_send_satisfy_the_input_contract() -> None:
    schema = validator("frame-headers")
    headers = codec.frame_headers(
        "cam-1", SourceKind.TRAFFIC, "cam-1/1", 1_790_000_000_000, "image/jpeg", "gate", 51.5, -0.1
    )
    schema.validate({name: raw.decode() for name, raw in headers})
    with pytest.raises(Exception, match="source-kind"):
        schema.validate({"source-id": "cam-1"})
