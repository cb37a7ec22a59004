"""Kafka records <-> frames, label and count records, dead-letter headers (stream_worker.codec)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from stream_worker.codec import (
    count_record,
    dead_letter_headers,
    frame_from_record,
    frame_headers,
    label_record,
    parse_count_record,
    parse_label_record,
    writable_header_name,
)
from stream_worker.errors import BadFrame, LookoutError
from stream_worker.frames import ClassScore, Frame, FrameLabels, LabelScore, Prediction, SourceKind

JPEG_BYTES = b"\xff\xd8\xff\xe0" + bytes(20)
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(20)
TS = 1_700_000_000_123
MODEL = {
    "name": "efficientnet_lite0",
    "version": "1",
    "backend": "onnxruntime",
    "precision": "int8",
    "engine_sha256": "0" * 64,
    "onnx_sha256": "1" * 64,
    "taxonomy_version": "t1",
}


def record(
    headers: Sequence[tuple[str, bytes | None]] | Sequence[tuple[str, bytes]],
    *,
    key: bytes | None = b"cam-1",
    value: bytes | None = JPEG_BYTES,
    timestamp_ms: int | None = TS,
) -> Frame:
    return frame_from_record("frames", 3, 42, timestamp_ms, key, value, headers)


def headers_refused(headers: list[tuple[str, bytes | None]], **kwargs: object) -> BadFrame:
    with pytest.raises(BadFrame) as caught:
        record(headers, **kwargs)  # type: ignore[arg-type]
    assert caught.value.stage == "headers"
    return caught.value


FULL = frame_headers(
    "cam-1", SourceKind.WILDLIFE, "cam-1/000017", TS - 5, "image/jpeg", "north gate", 51.5, -0.12
)


# --- frames in ----------------------------------------------------------------------------


def test_replay_headers_round_trip_into_a_frame() -> None:
    frame = record(FULL)
    assert frame == Frame(
        topic="frames",
        partition=3,
        offset=42,
        source_id="cam-1",
        source_kind=SourceKind.WILDLIFE,
        frame_id="cam-1/000017",
        captured_at_ms=TS - 5,
        content_type="image/jpeg",
        data=JPEG_BYTES,
        site="north gate",
        lat=51.5,
        lon=-0.12,
        headers=tuple(FULL),
        key=b"cam-1",
    )


def test_defaults_come_from_the_record() -> None:
    frame = record([("content-type", b"image/jpeg"), ("source-kind", b"traffic")])
    assert (frame.source_id, frame.frame_id, frame.captured_at_ms) == ("cam-1", "frames/3/42", TS)
    assert (frame.site, frame.lat, frame.lon) == (None, None, None)


def test_source_id_header_wins_over_the_key() -> None:
    assert record([("source-id", b"cam-7"), ("source-kind", b"fleet")]).source_id == "cam-7"


def test_header_names_are_case_insensitive_and_the_last_repeat_wins() -> None:
    frame = record(
        [("Source-Kind", b"traffic"), ("source-kind", b"Wildlife"), ("Content-Type", b"Image/PNG")],
        value=PNG_BYTES,
    )
    assert (frame.source_kind, frame.content_type) == (SourceKind.WILDLIFE, "image/png")


@pytest.mark.parametrize(("value", "content_type"), [(JPEG_BYTES, "image/jpeg"), (PNG_BYTES, "image/png")])
def test_missing_content_type_is_sniffed_from_jpeg_or_png_magic_only(value: bytes, content_type: str) -> None:
    assert record([("source-kind", b"traffic")], value=value).content_type == content_type


def test_declared_content_type_is_passed_on_for_the_guard_to_judge() -> None:
    assert record([("source-kind", b"traffic"), ("content-type", b"image/gif")]).content_type == "image/gif"
    assert record([("source-kind", b"traffic"), ("content-type", b"image/jpg")]).content_type == "image/jpeg"


def test_missing_value_is_an_empty_frame_for_the_guard() -> None:
    assert record([("source-kind", b"traffic"), ("content-type", b"image/jpeg")], value=None).data == b""


def test_default_kind_fills_a_missing_source_kind() -> None:
    frame = frame_from_record("f", 0, 0, TS, b"k", JPEG_BYTES, [], default_kind=SourceKind.FLEET)
    assert frame.source_kind is SourceKind.FLEET


@pytest.mark.parametrize(
    ("headers", "kwargs", "reason"),
    [
        pytest.param([("source-kind", b"traffic")], {"key": None}, "missing_source_id", id="no-id-no-key"),
        pytest.param([("source-kind", b"traffic")], {"key": b""}, "missing_source_id", id="empty-key"),
        pytest.param(
            [("source-id", b"cam {1}"), ("source-kind", b"traffic")], {}, "bad_source_id", id="braces"
        ),
        pytest.param(
            [("source-id", b"-cam"), ("source-kind", b"traffic")], {}, "bad_source_id", id="leading-dash"
        ),
        pytest.param(
            [("source-id", b"c" * 201), ("source-kind", b"traffic")], {}, "bad_source_id", id="too-long"
        ),
        pytest.param(
            [("source-id", b"\xff\xfe"), ("source-kind", b"traffic")], {}, "not_utf8", id="id-not-utf8"
        ),
        pytest.param([("source-kind", b"traffic")], {"key": b"\xc3("}, "not_utf8", id="key-not-utf8"),
        pytest.param([], {}, "missing_source_kind", id="no-kind"),
        pytest.param([("source-kind", b"drone")], {}, "bad_source_kind", id="unknown-kind"),
        pytest.param(
            [("source-kind", b"traffic"), ("captured-at", b"yesterday")],
            {},
            "bad_captured_at",
            id="captured-at-text",
        ),
        pytest.param(
            [("source-kind", b"traffic"), ("captured-at", b"1.7e12")],
            {},
            "bad_captured_at",
            id="captured-at-float",
        ),
        pytest.param(
            [("source-kind", b"traffic"), ("captured-at", b"-5")],
            {},
            "bad_captured_at",
            id="captured-at-negative",
        ),
        pytest.param(
            [("source-kind", b"traffic")], {"timestamp_ms": -1}, "missing_captured_at", id="no-time"
        ),
        pytest.param(
            [("source-kind", b"traffic")], {"value": b"GIF89a"}, "missing_content_type", id="no-type-gif"
        ),
        pytest.param(
            [("source-kind", b"traffic")], {"value": None}, "missing_content_type", id="no-type-empty"
        ),
        pytest.param(
            [("source-kind", b"traffic"), ("frame-id", b"")], {}, "bad_frame_id", id="empty-frame-id"
        ),
        pytest.param(
            [("source-kind", b"traffic"), ("frame-id", b"f" * 513)], {}, "bad_frame_id", id="long-frame-id"
        ),
        pytest.param([("source-kind", b"traffic"), ("site", b"")], {}, "bad_site", id="empty-site"),
        pytest.param(
            [("source-kind", b"traffic"), ("lat", b"91"), ("lon", b"0")], {}, "bad_location", id="lat-91"
        ),
        pytest.param(
            [("source-kind", b"traffic"), ("lat", b"0"), ("lon", b"-180.5")],
            {},
            "bad_location",
            id="lon-range",
        ),
        pytest.param(
            [("source-kind", b"traffic"), ("lat", b"nan"), ("lon", b"0")], {}, "bad_location", id="lat-nan"
        ),
        pytest.param(
            [("source-kind", b"traffic"), ("lat", b"north"), ("lon", b"0")], {}, "bad_location", id="lat-text"
        ),
        pytest.param([("source-kind", b"traffic"), ("lat", b"10")], {}, "bad_location", id="lat-alone"),
        pytest.param([("source-kind", b"traffic\n")], {}, "control_characters", id="newline"),
    ],
)
def test_malformed_headers_are_refused_with_their_reason(
    headers: list[tuple[str, bytes | None]], kwargs: dict[str, object], reason: str
) -> None:
    assert headers_refused(headers, **kwargs).reason == reason


# "caméra-name" written in Latin-1, as aiokafka reads it with stream_worker.record_batches.
UNREADABLE_NAME = b"cam\xe9ra-name".decode("utf-8", "surrogateescape")


def test_a_header_name_that_is_not_utf8_is_refused_whatever_the_header() -> None:
    # The name is none of ours, and the frame would otherwise be complete: still refused, since
    # nothing tells which header it was meant to be.
    refused = headers_refused([*FULL, (UNREADABLE_NAME, b"north gate")])
    assert refused.reason == "header_name_not_utf8"
    assert 'header name "cam\\xe9ra-name" is not valid UTF-8' in str(refused)


def test_a_header_name_in_utf8_beyond_ascii_is_accepted() -> None:
    assert record([*FULL, ("caméra", b"1")]).source_id == "cam-1"


def test_null_header_value_counts_as_absent() -> None:
    frame = record([("source-kind", b"traffic"), ("source-id", None), ("content-type", b"image/jpeg")])
    assert frame.source_id == "cam-1"


def test_frame_headers_refuse_half_a_location() -> None:
    with pytest.raises(ValueError):
        frame_headers("cam-1", "traffic", "f", TS, "image/jpeg", lat=1.0)


# --- label records ------------------------------------------------------------------------


def prediction() -> Prediction:
    frame = record(FULL)
    labels = (
        LabelScore("deer", 0.61234567, ("animal", "mammal", "deer")),
        LabelScore("mammal", 0.8, ("animal",)),
    )
    top_k = (ClassScore(351, "hartebeest", 0.4), ClassScore(352, "impala", 0.2))
    return Prediction(frame, FrameLabels(labels, top_k, 0.61234567), TS + 80, 12.3456)


def test_label_record_round_trip() -> None:
    parsed = parse_label_record(label_record(prediction(), MODEL))
    assert parsed == {
        "schema_version": 1,
        "frame_id": "cam-1/000017",
        "source_id": "cam-1",
        "source_kind": "wildlife",
        "captured_at": TS - 5,
        "processed_at": TS + 80,
        "labels": [
            {"label": "deer", "score": 0.612346, "path": ["animal", "mammal", "deer"]},
            {"label": "mammal", "score": 0.8, "path": ["animal"]},
        ],
        "top_k": [
            {"index": 351, "name": "hartebeest", "score": 0.4},
            {"index": 352, "name": "impala", "score": 0.2},
        ],
        "model": MODEL,
        "latency_ms": 12.346,
        "site": "north gate",
        "lat": 51.5,
        "lon": -0.12,
        "topic": "frames",
        "partition": 3,
        "offset": 42,
    }


def test_label_record_is_compact_json() -> None:
    assert b", " not in label_record(prediction(), MODEL) and b": " not in label_record(prediction(), MODEL)


def test_label_record_needs_the_whole_model_description() -> None:
    with pytest.raises(LookoutError, match="precision"):
        label_record(prediction(), {"name": "m", "version": "1", "backend": "onnxruntime"})


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff", "not_json"),
        (b"{not json", "not_json"),
        (b"[1, 2]", "not_object"),
        (b'{"schema_version": 2, "frame_id": "f"}', "unsupported_schema"),
        (b'{"schema_version": 1, "frame_id": "f"}', "missing_field"),
    ],
)
def test_foreign_label_records_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(BadFrame) as caught:
        parse_label_record(data)
    assert caught.value.reason == reason


# --- count records ------------------------------------------------------------------------


def test_count_record_round_trip_with_absolute_counts() -> None:
    key, value = count_record("cam-1", "15m", 1_700_000_100_000, {"vehicle": 7, "car": 5, "_frames": 7})
    assert key == b"cam-1|15m|1700000100000|labels"
    assert parse_count_record(value) == {
        "schema_version": 1,
        "source_id": "cam-1",
        "window": "15m",
        "window_start": 1_700_000_100_000,
        "window_end": 1_700_001_000_000,
        "kind": "labels",
        "shard": None,
        "counts": {"_frames": 7, "car": 5, "vehicle": 7},
    }


def test_a_source_spread_over_partitions_gets_one_count_record_per_partition() -> None:
    first, _ = count_record("cam-1", "1m", 0, {"car": 2}, shard="frames:0")
    second, value = count_record("cam-1", "1m", 0, {"car": 1}, shard="frames:3")
    assert first != second and first.startswith(b"cam-1|1m|0|labels|")
    assert parse_count_record(value)["shard"] == "frames:3"


def test_label_and_event_counts_of_one_window_have_distinct_keys() -> None:
    labels_key, _ = count_record("trap-3", "1m", 0, {"deer": 4}, kind="labels")
    events_key, _ = count_record("trap-3", "1m", 0, {"deer": 1}, kind="events")
    assert labels_key != events_key


def test_unknown_count_kind_is_refused() -> None:
    with pytest.raises(LookoutError):
        count_record("cam-1", "1m", 0, {}, kind="species")


# --- dead letters -------------------------------------------------------------------------


def test_dead_letter_headers_name_the_origin_and_keep_the_frame_headers() -> None:
    error = BadFrame("decode", "truncated", "the JPEG has no end-of-image marker")
    frame = record(FULL)
    headers = dead_letter_headers(
        frame.topic, frame.partition, frame.offset, error.stage, error.reason, error, frame.headers
    )
    assert headers[: len(FULL)] == FULL
    assert dict(headers[len(FULL) :]) == {
        "__connect.errors.topic": b"frames",
        "__connect.errors.partition": b"3",
        "__connect.errors.offset": b"42",
        "__connect.errors.stage": b"decode",
        "__connect.errors.exception.class.name": b"stream_worker.errors.BadFrame",
        "__connect.errors.exception.message": b"the JPEG has no end-of-image marker",
        "lookout.errors.reason": b"truncated",
    }


def test_dead_lettering_twice_replaces_the_old_error_headers() -> None:
    first = dead_letter_headers(
        "frames", 0, 1, "guard", "empty", BadFrame("guard", "empty", "no bytes"), FULL
    )
    second = dead_letter_headers("frames.dlq", 0, 9, "headers", "bad", ValueError("x" * 5000), first)
    names = [name for name, _ in second]
    assert len(names) == len(set(names))
    as_dict = dict(second)
    assert as_dict["__connect.errors.topic"] == b"frames.dlq"
    assert as_dict["__connect.errors.exception.class.name"] == b"builtins.ValueError"
    assert len(as_dict["__connect.errors.exception.message"]) == 2000


def test_a_dead_letter_writes_a_header_name_that_was_not_utf8_with_its_bytes_escaped() -> None:
    error = BadFrame("headers", "header_name_not_utf8", "header name is not valid UTF-8")
    original = [*FULL, (UNREADABLE_NAME, b"north gate")]
    headers = dead_letter_headers("frames", 3, 42, error.stage, error.reason, error, original)
    assert headers[: len(original)] == [*FULL, ("cam\\xe9ra-name", b"north gate")]
    for name, _ in headers:
        name.encode("utf-8")  # what every Kafka client must be able to do


def test_writable_header_names_keep_every_readable_name_as_it_is() -> None:
    assert writable_header_name("frame-id") == "frame-id"
    assert writable_header_name("caméra") == "caméra"
    assert writable_header_name(UNREADABLE_NAME) == "cam\\xe9ra-name"


def test_dead_letter_message_is_utf8() -> None:
    headers = dict(dead_letter_headers("f", 0, 0, "decode", "decode_failed", RuntimeError("Bild kaputt: ü")))
    assert headers["__connect.errors.exception.message"].decode() == "Bild kaputt: ü"


def test_a_captured_at_far_ahead_of_the_record_timestamp_is_refused() -> None:
    hour = 3_600_000
    ahead = frame_headers("cam-1", SourceKind.TRAFFIC, "cam-1/1", TS + 2 * hour, "image/jpeg")
    with pytest.raises(BadFrame) as caught:
        frame_from_record("frames", 0, 1, TS, None, JPEG_BYTES, ahead, max_skew_ms=hour)
    assert (caught.value.stage, caught.value.reason) == ("headers", "captured_at_in_future")
    # Within the bound, behind the producer's clock (a backfill), or with no record timestamp: kept.
    for captured, timestamp in ((TS + hour // 2, TS), (TS - 30 * 24 * hour, TS), (TS + 2 * hour, None)):
        headers = frame_headers("cam-1", SourceKind.TRAFFIC, "cam-1/1", captured, "image/jpeg")
        frame = frame_from_record("frames", 0, 1, timestamp, None, JPEG_BYTES, headers, max_skew_ms=hour)
        assert frame.captured_at_ms == captured


@pytest.mark.parametrize("key", [b"cam-9", b"shot-17", None])
def test_camera_trap_frames_must_be_keyed_by_their_source_id(key: bytes | None) -> None:
    refused = headers_refused(list(FULL), key=key)
    assert refused.reason == "key_not_source_id" and "'cam-1'" in str(refused)
    # Window counts do not depend on order: other sources may be keyed as their producer likes.
    traffic = [(n, SourceKind.TRAFFIC.value.encode() if n == "source-kind" else v) for n, v in FULL]
    assert record(traffic, key=key).source_id == "cam-1"
