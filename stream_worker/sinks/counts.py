"""Exactly-once window counts in Redis: one Lua call per partition-batch.

Key layout (``P`` = the key prefix, ``{t:p}`` = a Redis Cluster hash tag naming the Kafka
topic and partition the frames came from; every key one script call touches shares it):

==============================================  =================================================
``P:{t:p}:wm``                                  last frame offset applied (the watermark)
``P:{t:p}:owner``                               hash: ``group`` counting the partition and the
                                                ``topic_id`` (Kafka topic ID) the watermark
                                                belongs to
``P:{t:p}:c:<source>:<window>:<start_ms>``      hash: ``_frames``, one field per label, and
                                                ``event:<species>`` for wildlife sources
``P:{t:p}:cw:<source>:<window>``                sorted set of the window starts that exist
``P:{t:p}:ev:<source>``                         camera-trap sequence state (last time, species)
``P:{t:p}:dirty``                               count hashes not yet published to the counts topic
``P:{t:p}:e:<source>:<start_ms>``               hash: a camera-trap sequence's event record
                                                (``lo``, ``hi``, ``frames``, ``n:<species>``,
                                                ``b:<species>``, ``closed``)
``P:{t:p}:edirty``                              event hashes not yet published to the events topic
``P:src:<source>``                              set of the ``t:p`` tags holding the source's counts
``P:sources:last-seen``                         sorted set of every source with counts, scored by
                                                when a worker last wrote its counts (ms since
                                                the epoch)
``P:sources``                                   the set of sources written before the sorted set
                                                (read too; it expires one TTL after a worker
                                                first writes)
==============================================  =================================================

Count keys expire ``ttl_s`` after their last write; ``P:src:<source>`` is refreshed with that TTL
on every write. ``P:sources:last-seen`` is trimmed on every write of sources last written more
than ``ttl_s`` ago: by then each of their count keys has expired, so a source leaves the directory
only once it has no counts left to find (the workers' clocks are taken to agree within seconds,
NTP; a clock ahead by a minute drops a source a minute before its last counts expire).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from stream_worker.counting import CountedFrame, SpeciesEvent, WindowCounts, merge
from stream_worker.errors import ConfigError
from stream_worker.redis_client import redis_failure
from stream_worker.settings import Settings

if TYPE_CHECKING:
    from stream_worker.pipeline import Batch

LUA_SOURCE = resources.files("stream_worker.sinks").joinpath("counts.lua").read_text()


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one partition-batch did to Redis."""

    applied: int
    windows: tuple[WindowCounts, ...]
    watermark: int = -1
    reset_from: int = -1
    """The watermark dropped because the topic was deleted and created again, or -1."""


class CountsReader:
    """Reads lookout's counts (the ``counts`` command, verify, the dashboard)."""

    def __init__(self, client: aioredis.Redis, *, key_prefix: str) -> None:
        # redis-py's async typing is loose (bytes | str | Awaitable unions); the replies used
        # here are plain bytes, so the client is held untyped.
        self._client: Any = client
        self._prefix = key_prefix

    def stem(self, topic: str, partition: int) -> str:
        """Key stem of one partition: the hash tag keeps its keys in one cluster slot."""
        return f"{self._prefix}:{{{topic}:{partition}}}"

    @property
    def directory(self) -> str:
        """The sorted set of sources with counts, scored by their last write."""
        return f"{self._prefix}:sources:last-seen"

    @property
    def legacy_directory(self) -> str:
        """The set of sources as workers before the sorted set wrote it (never trimmed)."""
        return f"{self._prefix}:sources"

    async def sources(self) -> list[str]:
        """Every source with counts (and, until their trim, a few whose counts just expired)."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zrange(self.directory, 0, -1)
                pipe.smembers(self.legacy_directory)
                recent, legacy = await pipe.execute()
        except redis_errors.RedisError as exc:
            raise redis_failure(exc) from exc
        return sorted({s.decode() for s in recent} | {s.decode() for s in legacy})

    async def read(self, source_id: str, window: str, *, last: int | None = None) -> list[WindowCounts]:
        """The windows of one source, oldest first, summed over the partitions that hold them.

        ``last`` keeps only the newest N windows of each partition (a dashboard's view), so a
        reader never fetches a week of one-minute windows to draw the last four hours.
        """
        try:
            tags = sorted(t.decode() for t in await self._client.smembers(f"{self._prefix}:src:{source_id}"))
            starts_by_stem: list[tuple[str, list[int]]] = []
            for tag in tags:
                stem = f"{self._prefix}:{{{tag}}}"
                first = -last if last else 0
                starts = await self._client.zrange(f"{stem}:cw:{source_id}:{window}", first, -1)
                starts_by_stem.append((stem, [int(s) for s in starts]))
            async with self._client.pipeline(transaction=False) as pipe:
                order: list[tuple[str, int]] = []
                for stem, starts in starts_by_stem:
                    for start in starts:
                        pipe.hgetall(f"{stem}:c:{source_id}:{window}:{start}")
                        order.append((stem, start))
                values = await pipe.execute()
        except redis_errors.RedisError as exc:
            raise redis_failure(exc) from exc
        merged: dict[int, WindowCounts] = {}
        for (stem, start), value in zip(order, values, strict=True):
            if not value:
                continue
            part = self._parse_hash(stem, f"{stem}:c:{source_id}:{window}:{start}", self._flatten(value))
            merged[start] = merge(merged[start], part) if start in merged else part
        ordered = [merged[s] for s in sorted(merged)]
        return ordered[-last:] if last else ordered

    @staticmethod
    def _flatten(mapping: dict[Any, Any]) -> list[Any]:
        return [x for kv in mapping.items() for x in kv]

    @staticmethod
    def _parse_hash(stem: str, key: Any, flat: Sequence[Any]) -> WindowCounts:
        key_text = key.decode() if isinstance(key, bytes) else str(key)
        rest = key_text[len(stem) + len(":c:") :]
        source_id, window, start = rest.rsplit(":", 2)
        labels: dict[str, int] = {}
        events: dict[str, int] = {}
        frames = 0
        for i in range(0, len(flat), 2):
            name = flat[i].decode() if isinstance(flat[i], bytes) else str(flat[i])
            value = int(flat[i + 1])
            if name == "_frames":
                frames = value
            elif name.startswith("event:"):
                events[name.removeprefix("event:")] = value
            else:
                labels[name] = value
        return WindowCounts(source_id, window, int(start), frames, labels, events, key_text)


class CountsWriter(CountsReader):
    """Applies partition-batches to the counts exactly once (the worker's side)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str,
        ttl_s: int,
        event_gap_ms: int,
        windows: Sequence[tuple[str, int]] = (("1m", 60_000), ("15m", 900_000)),
        group: str = "lookout",
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        super().__init__(client, key_prefix=key_prefix)
        self._group = group
        self._topic_ids: dict[str, str] = {}
        self._windows = json.dumps([list(w) for w in windows])
        self._ttl_s = ttl_s
        self._event_gap_ms = event_gap_ms
        self._script = client.register_script(LUA_SOURCE)
        self._wall_ms = wall_ms
        self._legacy_expiring = False

    @classmethod
    def from_settings(cls, client: aioredis.Redis, settings: Settings) -> CountsWriter:
        """The writer for the worker's settings (prefix, TTL, event gap, windows)."""
        return cls(
            client,
            key_prefix=settings.redis.key_prefix,
            ttl_s=settings.redis.counts_ttl_s,
            event_gap_ms=settings.counts.event_gap_ms,
            windows=[(w.name, w.size_ms) for w in settings.counts.window_specs],
            group=settings.topics.group,
        )

    def bind_topic_ids(self, topic_ids: dict[str, str]) -> None:
        """The current Kafka topic ID of each frames topic (refreshed on every assignment)."""
        self._topic_ids.update(topic_ids)

    async def claim(self, topic: str, partition: int) -> ApplyResult:
        """Take a partition for this group and topic incarnation; returns its watermark.

        Raises ``ConfigError`` when another consumer group counts the partition under the same
        key prefix. The reply's ``reset_from`` says the topic was recreated and its old
        watermark dropped.
        """
        return await self.apply(topic, partition, ())

    async def apply(self, topic: str, partition: int, frames: Sequence[CountedFrame]) -> ApplyResult:
        """Apply a partition-batch atomically; frames at or below the watermark change nothing."""
        stem = self.stem(topic, partition)
        payload = json.dumps(
            [
                {
                    "o": f.offset,
                    "s": f.source_id,
                    "t": f.captured_at_ms,
                    "l": list(f.labels),
                    "e": list(f.event_labels) if f.event_labels is not None else None,
                    "x": list(f.event_scores),
                }
                for f in frames
            ],
            separators=(",", ":"),
        )
        tag = f"{topic}:{partition}"
        sources = sorted({f.source_id for f in frames})
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                # The directory is written first, so a reader never misses counts that exist.
                for source in sources:
                    pipe.sadd(f"{self._prefix}:src:{source}", tag)
                    pipe.expire(f"{self._prefix}:src:{source}", self._ttl_s)
                if sources:
                    now_ms = self._wall_ms()
                    pipe.zadd(self.directory, dict.fromkeys(sources, now_ms))
                    pipe.zremrangebyscore(self.directory, "-inf", now_ms - self._ttl_s * 1000)
                    pipe.expire(self.directory, self._ttl_s)
                if not self._legacy_expiring:
                    # Nothing adds to the old set any more; one TTL from now its counts are gone.
                    pipe.expire(self.legacy_directory, self._ttl_s)
                await pipe.execute()
                self._legacy_expiring = True
            raw = await self._script(
                keys=[f"{stem}:wm", f"{stem}:owner"],
                args=[
                    stem,
                    self._ttl_s,
                    self._event_gap_ms,
                    self._windows,
                    payload,
                    self._group,
                    self._topic_ids.get(topic, ""),
                ],
            )
        except redis_errors.ResponseError as exc:
            owner = str(exc).partition("LOOKOUT_OWNER ")[2]
            if owner:
                raise self._owned_by(owner, topic, partition) from exc
            raise redis_failure(exc) from exc
        except redis_errors.RedisError as exc:
            raise redis_failure(exc) from exc
        windows = tuple(self._parse_hash(stem, raw[i], raw[i + 1]) for i in range(3, len(raw), 2))
        return ApplyResult(
            applied=int(raw[0]), windows=windows, watermark=int(raw[1]), reset_from=int(raw[2])
        )

    def _owned_by(self, owner: str, topic: str, partition: int) -> ConfigError:
        return ConfigError(
            f"Redis key prefix {self._prefix!r} holds the counts of {topic}:{partition} for consumer "
            f"group {owner!r}; group {self._group!r} would count the same frames twice: give it its "
            "own --key-prefix (LOOKOUT_KEY_PREFIX), or hand the counts over as docs/RELIABILITY.md "
            "says ('Handing counts to another consumer group')"
        )

    async def watermark(self, topic: str, partition: int) -> int:
        """The last applied offset of a partition, or -1 when none was applied."""
        try:
            value = await self._client.get(f"{self.stem(topic, partition)}:wm")
        except redis_errors.RedisError as exc:
            raise redis_failure(exc) from exc
        return int(value) if value is not None else -1

    async def _listed_hashes(self, listing: str) -> list[tuple[str, dict[Any, Any]]]:
        """The hashes a set lists (one round trip for them all), skipping those that expired."""
        try:
            keys = sorted(k.decode() for k in await self._client.smembers(listing))
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                values = await pipe.execute()
        except redis_errors.RedisError as exc:
            raise redis_failure(exc) from exc
        return [(key, value) for key, value in zip(keys, values, strict=True) if value]

    async def dirty(self, topic: str, partition: int) -> list[WindowCounts]:
        """Count hashes changed in Redis but not yet confirmed on the counts topic."""
        stem = self.stem(topic, partition)
        return [
            self._parse_hash(stem, key, self._flatten(value))
            for key, value in await self._listed_hashes(f"{stem}:dirty")
        ]

    async def dirty_events(self, topic: str, partition: int) -> list[SpeciesEvent]:
        """Camera-trap events changed in Redis but not yet confirmed on the events topic."""
        stem = self.stem(topic, partition)
        return [
            event
            for key, value in await self._listed_hashes(f"{stem}:edirty")
            for event in _species_events(stem, key, {_text(k): _text(v) for k, v in value.items()})
        ]

    async def mark_events_published(self, topic: str, partition: int, events: Sequence[SpeciesEvent]) -> None:
        """Forget the dirty marks of events now on the events topic."""
        keys = sorted({e.key for e in events})
        if not keys:
            return
        try:
            await self._client.srem(f"{self.stem(topic, partition)}:edirty", *keys)
        except redis_errors.RedisError as exc:
            raise redis_failure(exc) from exc

    async def mark_published(self, windows: Mapping[tuple[str, int], Sequence[WindowCounts]]) -> None:
        """Forget the dirty marks of windows (by partition) now on the counts topic: one round
        trip for every partition."""
        marks = {
            f"{self.stem(topic, partition)}:dirty": [w.key for w in group]
            for (topic, partition), group in windows.items()
            if group
        }
        if not marks:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for listing, keys in marks.items():
                    pipe.srem(listing, *keys)
                await pipe.execute()
        except redis_errors.RedisError as exc:
            raise redis_failure(exc) from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _species_events(stem: str, key: str, fields: dict[str, str]) -> list[SpeciesEvent]:
    """The per-species events of one sequence's event hash (``<stem>:e:<source>:<start>``)."""
    source_id, start = key[len(stem) + len(":e:") :].rsplit(":", 1)
    return [
        SpeciesEvent(
            source_id=source_id,
            species=name[2:],
            start_ms=int(start),
            first_ms=int(fields["lo"]),
            last_ms=int(fields["hi"]),
            frames=int(fields.get("frames", "0")),
            species_frames=int(count),
            best_score=float(fields.get(f"b:{name[2:]}", "0")),
            closed=fields.get("closed") == "1",
            key=key,
        )
        for name, count in sorted(fields.items())
        if name.startswith("n:")
    ]


class CountsSink:
    """The Redis counts of a batch: one atomic, watermark-gated Lua call per partition.

    Idempotent: a partition-batch already applied changes nothing, so a retry, or a replay after
    a crash, re-runs it safely. It leaves each partition's changed windows on ``batch.windows``
    for the window-counts topic; when some of the frames were applied before (a retry or a
    replay), the Lua call cannot tell which windows they changed, so the partition's whole set
    of windows not yet on the counts topic (its dirty set) is taken instead.
    """

    name = "counts"

    def __init__(self, writer: CountsWriter, *, skipped: Callable[[int], None] = lambda n: None) -> None:
        self._writer = writer
        self._skipped = skipped

    async def write(self, batch: Batch) -> None:
        """Apply every partition-batch of ``batch``, the partitions side by side.

        Each partition's Lua call is atomic on its own and gated by its own watermark, so their
        order does not matter; one after the other, a delivery of four partitions waited for
        eight Redis round trips in a row. A failure is raised once every partition's call has
        ended (the others' writes stand: they are idempotent, and the retry skips them).
        """
        partitions = list(batch.counted.items())
        results = await asyncio.gather(
            *(self._apply(topic, partition, frames) for (topic, partition), frames in partitions),
            return_exceptions=True,
        )
        for ((topic, partition), _), result in zip(partitions, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            batch.windows[(topic, partition)] = result

    async def _apply(
        self, topic: str, partition: int, frames: Sequence[CountedFrame]
    ) -> tuple[WindowCounts, ...]:
        """One partition-batch; the windows it changed (its whole dirty set when some of its
        frames were applied before)."""
        result = await self._writer.apply(topic, partition, frames)
        if result.applied == len(frames):
            return result.windows
        self._skipped(len(frames) - result.applied)
        return tuple(await self._writer.dirty(topic, partition))
