"""Check what went in against what came out: no frame lost, no count wrong.

The verifier reads, each up to the end offsets it finds when it starts (a bounded read, never
"until quiet"):

* the frames topic(s): what went in, by frame id (the ``frame-id`` header, or
  ``topic/partition/offset`` as the worker defaults it);
* the labels topic and the dead-letter topic(s): what came out, by frame id;
* the counts topic, latest record per key (what compaction keeps);
* the Redis counts, through :class:`~stream_worker.sinks.counts.CountsReader`.

It recomputes the counts from the *distinct* labelled frames with the pure reference
functions of :mod:`stream_worker.counting` (window counts from :func:`count_deltas`, camera-trap
events from :func:`event_updates`, run per source in the order of its frames, whatever the
worker's partition layout) and reports:

* ``missing``: frames that went in and were neither labelled nor dead-lettered;
* ``duplicates``: frame ids with more than one label record, and whether the copies are
  identical apart from ``processed_at`` and ``latency_ms`` (a replay after a crash may
  repeat a record; it must repeat it exactly);
* ``dead_lettered``: dead-lettered frame ids by reason;
* ``redis_mismatches`` / ``topic_mismatches``: every count that differs from the reference.

:func:`reconcile` is the pure core; :func:`verify` does the reading.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from stream_worker import codec, counting
from stream_worker.errors import BadFrame, LookoutError, ServiceUnavailable
from stream_worker.frames import LabelScore, SourceKind
from stream_worker.kafka import client_kwargs, partitions_of, unreachable
from stream_worker.record_batches import tolerate_unreadable_header_names
from stream_worker.redis_client import make_redis
from stream_worker.settings import Settings
from stream_worker.sinks.counts import CountsReader
from stream_worker.taxonomy import Taxonomy

# Fields of a label record that may differ between two records of the same frame: when and how
# fast it was processed. Everything else (labels, scores, model, offsets) must be identical.
VOLATILE_LABEL_FIELDS = ("processed_at", "latency_ms")
READ_TIMEOUT_S = 120.0

CountKey = tuple[str, str, int, str]  # (source id, window name, window start ms, "labels" | "events")


Place = tuple[str, int, int]
"""Where a frame was read from: topic, partition, offset. Unique, unlike frame ids."""


@dataclass(frozen=True, slots=True)
class InputFrame:
    """One record of a frames topic, as far as the verifier cares."""

    frame_id: str
    topic: str
    partition: int
    offset: int

    @property
    def place(self) -> Place:
        """Topic, partition and offset."""
        return (self.topic, self.partition, self.offset)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of a dead-letter topic."""

    frame_id: str
    reason: str
    place: Place | None = None
    """Topic, partition and offset of the record it stands for (Connect-style headers)."""


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A frame id with more than one label record."""

    frame_id: str
    copies: int
    identical: bool


@dataclass(frozen=True, slots=True)
class CountMismatch:
    """One count that is not what the distinct labelled frames say it should be."""

    source_id: str
    window: str
    window_start: int
    kind: str
    field: str
    expected: int
    actual: int


@dataclass(slots=True)
class VerifyReport:
    """Everything the verifier found; :attr:`ok` is the verdict."""

    frames_in: int
    labelled: int
    label_records: int
    missing: list[str] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    dead_lettered: dict[str, list[str]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    repeated_inputs: list[str] = field(default_factory=list)
    redis_mismatches: list[CountMismatch] = field(default_factory=list)
    topic_mismatches: list[CountMismatch] = field(default_factory=list)

    @property
    def counts_exact(self) -> bool:
        """Redis and the counts topic both equal the recomputed counts."""
        return not self.redis_mismatches and not self.topic_mismatches

    @property
    def ok(self) -> bool:
        """Nothing missing, nothing unexpected, every count exact."""
        return not self.missing and not self.unexpected and self.counts_exact

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {
            "ok": self.ok,
            "frames_in": self.frames_in,
            "labelled": self.labelled,
            "label_records": self.label_records,
            "missing": self.missing,
            "duplicates": [asdict(d) for d in self.duplicates],
            "dead_lettered": self.dead_lettered,
            "unexpected": self.unexpected,
            "repeated_inputs": self.repeated_inputs,
            "counts_exact": self.counts_exact,
            "redis_mismatches": [asdict(m) for m in self.redis_mismatches],
            "topic_mismatches": [asdict(m) for m in self.topic_mismatches],
        }

    def format(self, limit: int = 20) -> str:
        """A readable report; long lists are cut at ``limit`` entries."""
        dead = sum(len(ids) for ids in self.dead_lettered.values())
        lines = [
            f"verdict: {'OK' if self.ok else 'FAILED'}",
            f"frames in: {self.frames_in}   labelled: {self.labelled} "
            f"({self.label_records} label records)   dead-lettered: {dead}",
            f"missing: {len(self.missing)}",
        ]
        lines += [f"  {frame_id}" for frame_id in self.missing[:limit]]
        identical = sum(d.identical for d in self.duplicates)
        lines.append(f"duplicate label records: {len(self.duplicates)} frames ({identical} identical copies)")
        lines += [
            f"  {d.frame_id}: {d.copies} records, {'identical' if d.identical else 'DIFFERENT'}"
            for d in self.duplicates[:limit]
        ]
        for reason, ids in sorted(self.dead_lettered.items()):
            lines.append(f"dead-lettered ({reason}): {len(ids)}")
        if self.unexpected:
            lines.append(f"label records of frames that never went in: {len(self.unexpected)}")
            lines += [f"  {frame_id}" for frame_id in self.unexpected[:limit]]
        if self.repeated_inputs:
            lines.append(f"frame ids that went in more than once: {len(self.repeated_inputs)}")
        for name, found in (("Redis", self.redis_mismatches), ("counts topic", self.topic_mismatches)):
            lines.append(f"{name} counts: {'exact' if not found else f'{len(found)} mismatches'}")
            lines += [
                f"  {m.source_id} {m.window}@{m.window_start} {m.kind}.{m.field}: "
                f"expected {m.expected}, found {m.actual}"
                for m in found[:limit]
            ]
        return "\n".join(lines)


# --- the pure core ---------------------------------------------------------------------------


def expected_counts(
    label_records: Iterable[Mapping[str, Any]],
    windows: Sequence[counting.WindowSpec],
    *,
    gap_ms: int,
    parent_labels: frozenset[str] = counting.DEFAULT_PARENT_LABELS,
) -> dict[CountKey, dict[str, int]]:
    """Reference counts of distinct labelled frames: ``(source, window, start, kind) -> counts``.

    ``labels`` entries hold ``_frames`` and one field per counted label; ``events`` entries hold
    camera-trap events per species. Events are advanced per source, in the order of its frames
    in their topic and partition: whatever the worker's partition layout, a source has one
    sequence at a time (the worker keeps one per partition, so it agrees only while each source
    is on one partition, as the keying contract says).
    """
    by_source: dict[str, list[tuple[tuple[str, int, int], counting.Observation]]] = {}
    for record in label_records:
        observation = counting.Observation(
            str(record["source_id"]),
            SourceKind(record.get("source_kind", SourceKind.TRAFFIC.value)),
            int(record["captured_at"]),
            tuple(
                LabelScore(str(lab["label"]), float(lab.get("score", 0.0)), tuple(lab.get("path", ())))
                for lab in record["labels"]
            ),
        )
        place = (str(record.get("topic", "")), int(record.get("partition", 0)), int(record.get("offset", 0)))
        by_source.setdefault(observation.source_id, []).append((place, observation))
    out: dict[CountKey, dict[str, int]] = {}
    for frames in by_source.values():
        frames.sort(key=lambda item: item[0])
        observations = [obs for _, obs in frames]
        _add_deltas(out, counting.count_deltas(observations, windows), "labels")
        events = counting.event_updates(
            {}, observations, gap_ms=gap_ms, windows=windows, parent_labels=parent_labels
        )
        _add_deltas(out, events.deltas, "events")
    return out


def reconcile(
    inputs: Sequence[InputFrame],
    label_records: Sequence[Mapping[str, Any]],
    dead_letters: Sequence[DeadLetter],
    *,
    windows: Sequence[counting.WindowSpec],
    gap_ms: int,
    redis_counts: Mapping[CountKey, Mapping[str, int]] | None,
    topic_counts: Mapping[CountKey, Mapping[str, int]] | None,
    parent_labels: frozenset[str] = counting.DEFAULT_PARENT_LABELS,
) -> VerifyReport:
    """Compare inputs with outputs; ``None`` for a count store skips its comparison."""
    # Frames are matched by where they were read from (topic, partition, offset), which label
    # and dead-letter records carry, so a lost frame that shares its id with another is still
    # found; by frame id only where an output record lacks its place.
    ids: dict[str, list[InputFrame]] = {}
    for frame in inputs:
        ids.setdefault(frame.frame_id, []).append(frame)
    repeated = [fid for fid, frames in ids.items() if len(frames) > 1]

    def identity(frame_id: str, place: Place | None) -> Place | str:
        return place if place is not None else frame_id

    by_frame: dict[Place | str, list[Mapping[str, Any]]] = {}
    for record in label_records:
        by_frame.setdefault(identity(str(record["frame_id"]), _place_of(record)), []).append(record)
    duplicates = [
        Duplicate(str(copies[0]["frame_id"]), len(copies), _identical(copies))
        for copies in sorted(by_frame.values(), key=lambda c: str(c[0]["frame_id"]))
        if len(copies) > 1
    ]
    dead: dict[str, list[str]] = {}
    for letter in dead_letters:
        dead.setdefault(letter.reason, []).append(letter.frame_id)
    out_ids = {str(copies[0]["frame_id"]) for key, copies in by_frame.items() if isinstance(key, str)}
    out_ids |= {letter.frame_id for letter in dead_letters if letter.place is None}
    out_places = {key for key in by_frame if not isinstance(key, str)}
    out_places |= {letter.place for letter in dead_letters if letter.place is not None}
    missing = sorted(
        frame.frame_id if len(ids[frame.frame_id]) == 1 else f"{frame.frame_id} ({_where(frame.place)})"
        for frame in inputs
        if frame.place not in out_places and frame.frame_id not in out_ids
    )
    in_places = {frame.place for frame in inputs}
    unexpected = sorted(
        str(copies[0]["frame_id"])
        for key, copies in by_frame.items()
        if (key not in in_places if not isinstance(key, str) else key not in ids)
    )

    distinct = [copies[0] for copies in by_frame.values()]
    expected = expected_counts(distinct, windows, gap_ms=gap_ms, parent_labels=parent_labels)
    return VerifyReport(
        frames_in=len(inputs),
        labelled=len(by_frame),
        label_records=len(label_records),
        missing=missing,
        duplicates=duplicates,
        dead_lettered={reason: sorted(ids) for reason, ids in sorted(dead.items())},
        unexpected=unexpected,
        repeated_inputs=sorted(set(repeated)),
        redis_mismatches=[] if redis_counts is None else compare_counts(expected, redis_counts),
        topic_mismatches=[] if topic_counts is None else compare_counts(expected, topic_counts),
    )


def compare_counts(
    expected: Mapping[CountKey, Mapping[str, int]], actual: Mapping[CountKey, Mapping[str, int]]
) -> list[CountMismatch]:
    """Every field that differs, in either direction (a count nobody should have is one too)."""
    out: list[CountMismatch] = []
    for key in sorted(set(expected) | set(actual)):
        want, have = expected.get(key, {}), actual.get(key, {})
        for name in sorted(set(want) | set(have)):
            if want.get(name, 0) != have.get(name, 0):
                source, window, start, kind = key
                out.append(
                    CountMismatch(source, window, start, kind, name, want.get(name, 0), have.get(name, 0))
                )
    return out


def latest_counts(records: Iterable[tuple[bytes | None, bytes | None]]) -> dict[CountKey, dict[str, int]]:
    """The counts topic as compaction leaves it: the latest value per key, tombstones removing."""
    latest: dict[bytes, bytes | None] = {}
    for key, value in records:
        if key is not None:
            latest[key] = value
    out: dict[CountKey, dict[str, int]] = {}
    for value in latest.values():
        if value is None:
            continue
        record = codec.parse_count_record(value)
        count_key = (
            str(record["source_id"]),
            str(record["window"]),
            int(record["window_start"]),
            str(record["kind"]),
        )
        # One record per frames partition (shard) of a source: their sum is the source's count.
        total = out.setdefault(count_key, {})
        for name, n in record["counts"].items():
            total[str(name)] = total.get(str(name), 0) + int(n)
    return out


def _add_deltas(out: dict[CountKey, dict[str, int]], deltas: counting.Deltas, kind: str) -> None:
    for (source, window, start), counts in deltas.items():
        target = out.setdefault((source, window, start, kind), {})
        for name, n in counts.items():
            target[name] = target.get(name, 0) + n


def _identical(copies: Sequence[Mapping[str, Any]]) -> bool:
    stable = [{k: v for k, v in c.items() if k not in VOLATILE_LABEL_FIELDS} for c in copies]
    return all(s == stable[0] for s in stable[1:])


# --- reading ---------------------------------------------------------------------------------


async def read_to_end(settings: Settings, topic: str, *, timeout_s: float = READ_TIMEOUT_S) -> list[Any]:
    """Every record of ``topic`` up to the end offsets it has now; ``[]`` when it does not exist."""
    count = await partitions_of(settings.kafka, topic)
    if count == 0:
        return []
    tolerate_unreadable_header_names()  # such a record is read (and found dead-lettered), not fatal
    consumer = AIOKafkaConsumer(
        **client_kwargs(settings.kafka),
        client_id=f"{settings.kafka.client_id}-verify",
        group_id=None,
        enable_auto_commit=False,
        # Never "latest": a background offset reset to the end would race the seek below.
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=26_214_400,
        fetch_max_bytes=52_428_800,
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()  # what start() opened; unclosed, aiokafka complains at exit
        raise unreachable(settings.kafka, exc) from exc
    records: list[Any] = []
    try:
        partitions = [TopicPartition(topic, p) for p in range(count)]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        for tp, first in (await consumer.beginning_offsets(partitions)).items():
            consumer.seek(tp, first)
        pending = {tp for tp, end in ends.items() if end > 0}
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"verify: reading {topic} did not reach its end offsets within {timeout_s:.0f} s"
                )
            batch = await consumer.getmany(*pending, timeout_ms=500)
            for tp, recs in batch.items():
                records.extend(r for r in recs if r.offset < ends[tp])
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    except KafkaError as exc:
        raise ServiceUnavailable(f"verify: reading {topic} failed: {exc}") from exc
    finally:
        await consumer.stop()
    return records


def input_frame(record: Any) -> InputFrame:
    """The frame id of a frames-topic record, as the worker reads it."""
    frame_id = None
    for name, raw in record.headers or ():
        if name.lower() == codec.FRAME_ID and raw is not None:
            frame_id = raw.decode("utf-8", errors="replace")  # the last one wins, as in codec
    if not frame_id:
        frame_id = f"{record.topic}/{record.partition}/{record.offset}"
    return InputFrame(frame_id, record.topic, record.partition, record.offset)


def dead_letter(record: Any) -> DeadLetter:
    """Frame id, reason and origin of a dead-letter record (the origin from the Connect headers)."""
    headers = {name.lower(): (raw or b"").decode("utf-8", errors="replace") for name, raw in record.headers}
    origin = [headers.get(codec.ERROR_HEADER_PREFIX + name) for name in ("topic", "partition", "offset")]
    frame_id = headers.get(codec.FRAME_ID) or "/".join(str(part) for part in origin)
    place = _place_of({"topic": origin[0], "partition": origin[1], "offset": origin[2]})
    return DeadLetter(frame_id, headers.get(codec.REASON_HEADER.lower(), "unknown"), place)


def _place_of(record: Mapping[str, Any]) -> Place | None:
    """A record's topic, partition and offset, when it names all three."""
    topic, partition, offset = record.get("topic"), record.get("partition"), record.get("offset")
    if not topic or partition is None or offset is None:
        return None
    try:
        return (str(topic), int(partition), int(offset))
    except (TypeError, ValueError):
        return None


def _where(place: Place) -> str:
    return f"{place[0]}/{place[1]}/{place[2]}"


async def read_redis_counts(
    settings: Settings, windows: Sequence[counting.WindowSpec]
) -> dict[CountKey, dict[str, int]]:
    """Every count of every source under the key prefix, summed over partitions."""
    client = make_redis(settings.redis)
    try:
        counts = CountsReader(client, key_prefix=settings.redis.key_prefix)
        out: dict[CountKey, dict[str, int]] = {}
        for source in await counts.sources():
            for window in windows:
                for w in await counts.read(source, window.name):
                    out[(source, window.name, w.start_ms, "labels")] = {"_frames": w.frames, **w.labels}
                    if w.events:
                        out[(source, window.name, w.start_ms, "events")] = dict(w.events)
        return out
    finally:
        await client.aclose()


async def verify(settings: Settings, *, parent_labels: frozenset[str] | None = None) -> VerifyReport:
    """Read every topic up to its end and Redis, then :func:`reconcile` them.

    Frames topics are ``settings.topics.frames_topic`` (all of them), their dead-letter topics
    follow ``settings.topics.dlq_topic``; windows and the event gap come from ``settings.counts``.
    """
    t = settings.topics
    if not t.frames_topic:
        raise LookoutError("verify needs --frames-topic (a pattern cannot be read to its end)")
    windows = settings.counts.window_specs
    if parent_labels is None:
        parent_labels = Taxonomy.load().parent_labels
    dlq_topics = sorted({t.dlq_topic.format(topic=topic) for topic in t.frames_topic})
    reads = await asyncio.gather(
        *[read_to_end(settings, topic) for topic in t.frames_topic],
        read_to_end(settings, t.labels_topic),
        read_to_end(settings, t.counts_topic),
        *[read_to_end(settings, topic) for topic in dlq_topics],
    )
    n = len(t.frames_topic)
    inputs = [input_frame(r) for records in reads[:n] for r in records]
    labels_raw, counts_raw = reads[n], reads[n + 1]
    dead = [dead_letter(r) for records in reads[n + 2 :] for r in records]
    try:
        labels = [codec.parse_label_record(r.value) for r in labels_raw]
        names = {w.name for w in windows}
        topic_counts = {
            key: value
            for key, value in latest_counts((r.key, r.value) for r in counts_raw).items()
            if key[1] in names
        }
    except BadFrame as exc:
        raise LookoutError(
            f"verify: a record on {t.labels_topic} or {t.counts_topic} is unreadable: {exc}"
        ) from exc
    redis_counts = await read_redis_counts(settings, windows)
    return reconcile(
        inputs,
        labels,
        dead,
        windows=windows,
        gap_ms=settings.counts.event_gap_ms,
        redis_counts=redis_counts,
        topic_counts=topic_counts,
        parent_labels=parent_labels,
    )


def report_json(report: VerifyReport) -> str:
    """The ``--json`` output."""
    return json.dumps(report.as_dict(), indent=None, separators=(",", ":"))


__all__ = [
    "CountMismatch",
    "DeadLetter",
    "Duplicate",
    "InputFrame",
    "VerifyReport",
    "compare_counts",
    "expected_counts",
    "latest_counts",
    "read_to_end",
    "reconcile",
    "verify",
]
