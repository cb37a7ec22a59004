"""Kafka bytes and headers <-> lookout's values. Bytes stop here.

Input contract (headers of a frames-topic record; the value is the encoded image):

============== ========== ==================================================================
header         required   value
============== ========== ==================================================================
content-type   see below  ``image/jpeg`` or ``image/png`` (``image/jpg`` is read as JPEG)
source-id      or key     ``[A-Za-z0-9][A-Za-z0-9._:@/+=-]*``, at most 200 characters
source-kind    yes [1]_   ``traffic``, ``wildlife`` or ``fleet``
frame-id       no         any UTF-8 text up to 512 bytes; default ``topic/partition/offset``
captured-at    no         epoch milliseconds, decimal digits; default the record timestamp
site           no         UTF-8 text up to 200 characters
lat, lon       no         decimal degrees, both or neither
============== ========== ==================================================================

.. [1] unless the worker is configured with a default kind.

Decisions:

* Header names are matched case-insensitively; when a name repeats, the last one wins
  (Kafka's ``Headers.lastHeader``).
* A header name that is not UTF-8 (read with ``surrogateescape`` by
  :mod:`stream_worker.record_batches`) makes the record a ``header_name_not_utf8`` dead letter,
  whatever header it is: it may be one of ours written in another encoding, and guessing which
  would risk a frame counted with the wrong source or time. In dead letters such a name is
  written with its bytes escaped (``cam\\xe9ra``), the only form a Kafka client can write.
* A missing ``content-type`` is filled in only from JPEG or PNG magic bytes; anything else
  is a ``headers/missing_content_type`` dead letter, never a guess. A declared type is passed
  on as declared (lower-cased, parameters dropped) and the decode guard judges it, so a
  mistyped frame fails there with ``unsupported_type`` or ``magic_mismatch``.
* A missing record value is an empty frame; the decode guard refuses it as ``empty``.
* Source ids are restricted so that they are safe in Redis keys (no braces, which would
  change Redis Cluster hash slots, no spaces or control characters) and in record keys.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from stream_worker.counting import SpeciesEvent, parse_duration_ms
from stream_worker.decode import normalise_content_type, sniff_content_type
from stream_worker.errors import BadFrame, LookoutError
from stream_worker.frames import Frame, Prediction, SourceKind

SCHEMA_VERSION = 1

CONTENT_TYPE = "content-type"
SOURCE_ID = "source-id"
SOURCE_KIND = "source-kind"
FRAME_ID = "frame-id"
CAPTURED_AT = "captured-at"
SITE = "site"
LAT = "lat"
LON = "lon"

ERROR_HEADER_PREFIX = "__connect.errors."
REASON_HEADER = "lookout.errors.reason"
COUNT_KINDS = ("labels", "events")
MODEL_FIELDS = ("name", "version", "backend", "precision", "engine_sha256", "onnx_sha256", "taxonomy_version")
# The model fields every window-counts record and dead letter carries (the engine serving then).
MODEL_IDENTITY = ("engine_sha256", "taxonomy_version")
SCHEMA_VERSION_HEADER = "lookout.schema.version"

_SOURCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,199}")
_DIGITS = re.compile(r"[0-9]{1,15}")
_MAX_FRAME_ID_BYTES = 512
_MAX_SITE_CHARS = 200
_MAX_ERROR_MESSAGE_CHARS = 2000
_CONTENT_TYPE_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}

RawHeaders = Sequence[tuple[str, bytes | None]] | Sequence[tuple[str, bytes]]


def frame_from_record(
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    key: bytes | None,
    value: bytes | None,
    headers: RawHeaders,
    *,
    default_kind: SourceKind | None = None,
    max_skew_ms: int | None = None,
) -> Frame:
    """Build a :class:`Frame` from a consumed record; raise ``BadFrame(stage="headers")`` when it cannot be.

    Reasons: ``header_name_not_utf8``, ``not_utf8``, ``missing_source_id``, ``bad_source_id``,
    ``missing_source_kind``, ``bad_source_kind``, ``key_not_source_id`` (camera-trap frames
    only), ``bad_frame_id``, ``bad_captured_at``,
    ``captured_at_in_future``, ``missing_captured_at``, ``missing_content_type``, ``bad_site``,
    ``bad_location``, ``control_characters``.

    ``max_skew_ms`` bounds how far ``captured-at`` may run ahead of the record's own timestamp
    (the producer's clock): one frame dated in the future would otherwise become every
    window's newest, trim the window index and make later camera-trap frames "late".
    """
    by_name: dict[str, bytes | None] = {name.lower(): raw for name, raw in headers}
    if not "".join(by_name).isascii():  # names are nearly always ASCII: one scan, the check otherwise
        _check_header_names(headers)
    data = value or b""

    source_id = _text(by_name, SOURCE_ID)
    if source_id is None and key:
        source_id = _decode(key, "record key")
    if not source_id:
        raise BadFrame("headers", "missing_source_id", "no source-id header and no record key")
    if _SOURCE_ID.fullmatch(source_id) is None:
        raise BadFrame(
            "headers",
            "bad_source_id",
            f"source id {source_id[:80]!r} must match {_SOURCE_ID.pattern}",
        )

    kind_text = _text(by_name, SOURCE_KIND)
    if kind_text is None:
        if default_kind is None:
            raise BadFrame(
                "headers", "missing_source_kind", "no source-kind header (traffic, wildlife or fleet)"
            )
        source_kind = default_kind
    else:
        try:
            source_kind = SourceKind(kind_text.strip().lower())
        except ValueError:
            raise BadFrame(
                "headers",
                "bad_source_kind",
                f"source-kind {kind_text[:40]!r} is not traffic, wildlife or fleet",
            ) from None

    if source_kind is SourceKind.WILDLIFE and key != source_id.encode():
        # Camera-trap events follow a source's frames in order; Kafka orders them only within a
        # partition, and only records keyed by the source id all land in one partition.
        raise BadFrame(
            "headers",
            "key_not_source_id",
            f"camera-trap frames must be keyed by their source id {source_id!r}: events need all of "
            f"a source's frames in order on one partition (record key: {_key_text(key)})",
        )

    frame_id = _text(by_name, FRAME_ID)
    if frame_id is None:
        frame_id = f"{topic}/{partition}/{offset}"
    elif not frame_id or len(frame_id.encode()) > _MAX_FRAME_ID_BYTES:
        raise BadFrame("headers", "bad_frame_id", f"frame-id must have 1 to {_MAX_FRAME_ID_BYTES} bytes")

    captured_text = _text(by_name, CAPTURED_AT)
    if captured_text is not None:
        if _DIGITS.fullmatch(captured_text.strip()) is None:
            raise BadFrame(
                "headers", "bad_captured_at", f"captured-at {captured_text[:40]!r} is not epoch milliseconds"
            )
        captured_at_ms = int(captured_text.strip())
        if max_skew_ms is not None and timestamp_ms is not None and timestamp_ms >= 0:
            ahead_ms = captured_at_ms - timestamp_ms
            if ahead_ms > max_skew_ms:
                raise BadFrame(
                    "headers",
                    "captured_at_in_future",
                    f"captured-at is {ahead_ms / 1000:.0f} s after the record's timestamp "
                    f"(at most {max_skew_ms / 1000:.0f} s allowed): check the camera's clock",
                )
    elif timestamp_ms is not None and timestamp_ms >= 0:
        captured_at_ms = timestamp_ms
    else:
        raise BadFrame("headers", "missing_captured_at", "no captured-at header and no record timestamp")

    declared = _text(by_name, CONTENT_TYPE)
    if declared is None:
        sniffed = sniff_content_type(data)
        if sniffed is None:
            raise BadFrame(
                "headers",
                "missing_content_type",
                "no content-type header and the bytes are neither JPEG nor PNG",
            )
        content_type = sniffed
    else:
        content_type = normalise_content_type(declared)
        content_type = _CONTENT_TYPE_ALIASES.get(content_type, content_type)

    site = _text(by_name, SITE)
    if site is not None and not 0 < len(site) <= _MAX_SITE_CHARS:
        raise BadFrame("headers", "bad_site", f"site must have 1 to {_MAX_SITE_CHARS} characters")

    lat = _degrees(by_name, LAT, 90.0)
    lon = _degrees(by_name, LON, 180.0)
    if (lat is None) != (lon is None):
        raise BadFrame("headers", "bad_location", "lat and lon must be given together")

    return Frame(
        topic=topic,
        partition=partition,
        offset=offset,
        source_id=source_id,
        source_kind=source_kind,
        frame_id=frame_id,
        captured_at_ms=captured_at_ms,
        content_type=content_type,
        data=data,
        site=site,
        lat=lat,
        lon=lon,
        headers=tuple((name, raw if raw is not None else b"") for name, raw in headers),
        key=key,
    )


def frame_headers(
    source_id: str,
    source_kind: SourceKind | str,
    frame_id: str,
    captured_at_ms: int,
    content_type: str,
    site: str | None = None,
    lat: float | None = None,
    lon: float | None = None,
) -> list[tuple[str, bytes]]:
    """The headers of a frames-topic record, as replay produces them."""
    if (lat is None) != (lon is None):
        raise ValueError("lat and lon must be given together")
    kind = SourceKind(source_kind).value
    headers = [
        (CONTENT_TYPE, content_type.encode()),
        (SOURCE_ID, source_id.encode()),
        (SOURCE_KIND, kind.encode()),
        (FRAME_ID, frame_id.encode()),
        (CAPTURED_AT, str(int(captured_at_ms)).encode()),
    ]
    if site is not None:
        headers.append((SITE, site.encode()))
    if lat is not None and lon is not None:
        headers.extend([(LAT, repr(float(lat)).encode()), (LON, repr(float(lon)).encode())])
    return headers


def label_record(prediction: Prediction, model: Mapping[str, str]) -> bytes:
    """The labels-topic value for one classified frame (JSON, ``schema_version`` 1).

    ``model`` must name every one of :data:`MODEL_FIELDS`. The schema is
    ``stream_worker/schemas/label-record.schema.json``.
    """
    missing = [name for name in MODEL_FIELDS if name not in model]
    if missing:
        raise LookoutError(f"model description lacks {', '.join(missing)}")
    frame, result = prediction.frame, prediction.result
    record = {
        "schema_version": SCHEMA_VERSION,
        "frame_id": frame.frame_id,
        "source_id": frame.source_id,
        "source_kind": frame.source_kind.value,
        "captured_at": frame.captured_at_ms,
        "processed_at": prediction.processed_at_ms,
        "labels": [
            {"label": label.label, "score": _score(label.score), "path": list(label.path)}
            for label in result.labels
        ],
        "top_k": [{"index": c.index, "name": c.name, "score": _score(c.score)} for c in result.top_k],
        "model": {name: model[name] for name in MODEL_FIELDS},
        "latency_ms": round(prediction.latency_ms, 3),
        "site": frame.site,
        "lat": frame.lat,
        "lon": frame.lon,
        "topic": frame.topic,
        "partition": frame.partition,
        "offset": frame.offset,
    }
    return _dumps(record)


def parse_label_record(data: bytes) -> dict[str, Any]:
    """Read a labels-topic value; raises ``BadFrame(stage="record")`` when it is not one."""
    return _loads_record(data, ("frame_id", "source_id", "captured_at", "labels"))


def count_key(
    source_id: str, window_name: str, window_start_ms: int, kind: str = "labels", shard: str | None = None
) -> bytes:
    """The counts-topic key: one compacted record per source, window, window start and kind.

    ``shard`` names the frames partition (``topic:partition``) whose counts the record holds. A
    source keyed by its id lives on one partition, so there is one record per window; a source
    spread over partitions gets one record per partition, and readers sum them.
    """
    if kind not in COUNT_KINDS:
        raise LookoutError(f"count kind must be one of {COUNT_KINDS}, got {kind!r}")
    base = f"{source_id}|{window_name}|{window_start_ms}|{kind}"
    return (f"{base}|{shard}" if shard else base).encode()


def count_record(
    source_id: str,
    window_name: str,
    window_start_ms: int,
    counts: Mapping[str, int],
    kind: str = "labels",
    shard: str | None = None,
    model: Mapping[str, str] | None = None,
) -> tuple[bytes, bytes]:
    """Key and value of a counts-topic record, with the window's *absolute* counts.

    ``kind`` is ``labels`` (frames per label) or ``events`` (camera-trap events per species);
    it is part of the key so that compaction keeps both. ``model`` (the serving engine) puts
    its :data:`MODEL_IDENTITY` in the record.
    """
    key = count_key(source_id, window_name, window_start_ms, kind, shard)
    value = {
        "schema_version": SCHEMA_VERSION,
        "source_id": source_id,
        "window": window_name,
        "window_start": window_start_ms,
        "window_end": window_start_ms + parse_duration_ms(window_name),
        "kind": kind,
        "shard": shard,
        "counts": {label: int(n) for label, n in sorted(counts.items())},
    }
    if model is not None:
        value["model"] = {name: model[name] for name in MODEL_IDENTITY}
    return key, _dumps(value)


def event_record(event: SpeciesEvent, shard: str, model: Mapping[str, str]) -> tuple[bytes, bytes]:
    """Key and value of an events-topic record: one camera-trap event of one species.

    Keyed by the event id (source, sequence start, species), so the compacted topic keeps the
    latest state of each event; ``closed`` says it is final (a later frame of the source came
    after the sequence gap). The schema is ``stream_worker/schemas/camera-trap-event.schema.json``.
    """
    value = {
        "schema_version": SCHEMA_VERSION,
        "event_id": event.event_id,
        "source_id": event.source_id,
        "species": event.species,
        "start": event.first_ms,
        "end": event.last_ms,
        "frames": event.species_frames,
        "sequence_frames": event.frames,
        "best_score": _score(event.best_score),
        "closed": event.closed,
        "shard": shard,
        "model": {name: model[name] for name in MODEL_IDENTITY},
    }
    return event.event_id.encode(), _dumps(value)


def parse_count_record(data: bytes) -> dict[str, Any]:
    """Read a counts-topic value; raises ``BadFrame(stage="record")`` when it is not one."""
    return _loads_record(data, ("source_id", "window", "window_start", "kind", "counts"))


def dead_letter_headers(
    topic: str,
    partition: int,
    offset: int,
    stage: str,
    reason: str,
    exc: BaseException,
    original_headers: Sequence[tuple[str, bytes]] = (),
    model: Mapping[str, str] | None = None,
) -> list[tuple[str, bytes]]:
    """Headers of a dead-letter record, Kafka Connect style, after the frame's own headers.

    Error headers already on the original (a frame dead-lettered twice) are replaced, not
    repeated, so that every name appears once. With ``model`` (the serving engine), the
    schema version, engine digest and taxonomy version follow
    (``stream_worker/schemas/dead-letter-headers.schema.json``).
    """
    kept = [(writable_header_name(name), raw) for name, raw in original_headers if not _is_error_header(name)]
    exc_type = type(exc)
    message = str(exc)[:_MAX_ERROR_MESSAGE_CHARS]
    return [
        *kept,
        (f"{ERROR_HEADER_PREFIX}topic", topic.encode()),
        (f"{ERROR_HEADER_PREFIX}partition", str(partition).encode()),
        (f"{ERROR_HEADER_PREFIX}offset", str(offset).encode()),
        (f"{ERROR_HEADER_PREFIX}stage", stage.encode()),
        (
            f"{ERROR_HEADER_PREFIX}exception.class.name",
            f"{exc_type.__module__}.{exc_type.__qualname__}".encode(),
        ),
        (f"{ERROR_HEADER_PREFIX}exception.message", message.encode(errors="replace")),
        (REASON_HEADER, reason.encode()),
        *(model_headers(model) if model is not None else []),
    ]


_LOOKOUT_OUTPUT_HEADERS = frozenset(
    {REASON_HEADER, SCHEMA_VERSION_HEADER, "lookout.engine.sha256", "lookout.taxonomy.version"}
)


def model_headers(model: Mapping[str, str]) -> list[tuple[str, bytes]]:
    """The schema version and the serving engine's identity, as headers of an output record."""
    return [
        (SCHEMA_VERSION_HEADER, str(SCHEMA_VERSION).encode()),
        ("lookout.engine.sha256", model["engine_sha256"].encode()),
        ("lookout.taxonomy.version", model["taxonomy_version"].encode()),
    ]


def writable_header_name(name: str) -> str:
    """``name`` as a Kafka client can write it: a name that was not UTF-8 with its bytes escaped.

    A name read from bytes that are not UTF-8 carries lone surrogates (``surrogateescape``), which
    no client can encode: read from the bytes ``cam\\xe9ra`` (Latin-1), it is written as the ASCII
    text ``cam\\xe9ra``. Every other name is returned as is.
    """
    if name.isascii():
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def source_id_of_key(key: bytes | None) -> str | None:
    """The record key as a source id, when it is one a frame could carry (else ``None``).

    A valid source id is at most 200 characters, so whatever is built from it stays bounded.
    """
    if not key or len(key) > 200:  # the alphabet is ASCII: 200 characters are 200 bytes
        return None
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if _SOURCE_ID.fullmatch(text) else None


# --- helpers -------------------------------------------------------------------------------


def _key_text(key: bytes | None) -> str:
    if key is None:
        return "none"
    return repr(key[:60].decode("utf-8", "backslashreplace")) + ("..." if len(key) > 60 else "")


def _check_header_names(headers: RawHeaders) -> None:
    for name, _ in headers:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise BadFrame(
                "headers",
                "header_name_not_utf8",
                f'header name "{writable_header_name(name)[:80]}" is not valid UTF-8 '
                "(Kafka header names are UTF-8 strings): fix the producer",
            ) from None


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadFrame("headers", "not_utf8", f"{what} is not valid UTF-8") from None


def _text(by_name: Mapping[str, bytes | None], name: str) -> str | None:
    raw = by_name.get(name)
    if raw is None:
        return None
    text = _decode(raw, f"header {name}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise BadFrame("headers", "control_characters", f"header {name} contains control characters")
    return text


def _degrees(by_name: Mapping[str, bytes | None], name: str, limit: float) -> float | None:
    text = _text(by_name, name)
    if text is None:
        return None
    try:
        degrees = float(text)
    except ValueError:
        raise BadFrame("headers", "bad_location", f"{name} {text[:40]!r} is not a number") from None
    if not math.isfinite(degrees) or abs(degrees) > limit:
        raise BadFrame("headers", "bad_location", f"{name} {degrees} is outside -{limit:g}..{limit:g}")
    return degrees


def _is_error_header(name: str) -> bool:
    return name.startswith(ERROR_HEADER_PREFIX) or name in _LOOKOUT_OUTPUT_HEADERS


def _score(score: float) -> float:
    return round(float(score), 6)


def _dumps(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _loads_record(data: bytes, required: Sequence[str]) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadFrame("record", "not_json", f"record is not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise BadFrame("record", "not_object", "record is not a JSON object")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise BadFrame(
            "record",
            "unsupported_schema",
            f"schema_version {record.get('schema_version')!r}, expected {SCHEMA_VERSION}",
        )
    missing = [name for name in required if name not in record]
    if missing:
        raise BadFrame("record", "missing_field", f"record lacks {', '.join(missing)}")
    return record
