"""The dashboard's live view: per-source statistics, the latest label record and a thumbnail.

Best effort by design: it is a view, not a record, so it is written after the commit, never
retried, and a Redis error only skips one update (keys: ``stream_worker/live_keys.py``).

A source's latest frame (its label record and a thumbnail, written together so that the labels
shown are the picture's) is renewed at most once a second, and thumbnails at most
``--thumbnail-rate`` a second in all, the stalest sources first: made on the decode pool, each
costs a reduced decode and a small JPEG encode, and 200 cameras at one frame a second each would
otherwise add one to every frame. With thumbnails off (0) the label records are still renewed.

Bounded whatever the number of sources: the directory of sources is a sorted set scored by the
time of the last write and trimmed to the stats' TTL on every write; every stats key has that
TTL, dead frames' included, and a dead frame's key name is built from a bounded identity of its
record key, never from the raw key; the clock of each source's latest frame is kept for the
thumbnail's TTL (after it the thumbnail is gone anyway) and for ``--max-tracked-sources`` sources.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any

import cv2
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from stream_worker import codec
from stream_worker.decode import DecodeLimits, DecodeTarget, decode_bgr, probe
from stream_worker.errors import BadFrame
from stream_worker.frames import Prediction
from stream_worker.live_keys import LiveKeys, dead_frame_identity
from stream_worker.pipeline import Batch
from stream_worker.settings import Settings
from stream_worker.sources import RecentSources, SourceLimits

log = logging.getLogger("lookout.live")

THUMBNAIL_WIDTH = 240
THUMBNAIL_EVERY_S = 1.0
WAIT_MEMORY_S = 10.0
"""How long a source that sends nothing keeps its place in the queue for a picture."""


class LiveViewSink:
    """Writes the live view of each batch in one Redis round trip."""

    name = "live"

    def __init__(
        self,
        client: aioredis.Redis,
        settings: Settings,
        *,
        model: Callable[[], Mapping[str, str]],
        executor: Executor,
        clock_ms: Callable[[], float] = lambda: time.monotonic() * 1000,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._client: Any = client
        self._keys = LiveKeys(settings.redis.key_prefix)
        self._stats_ttl_s = settings.redis.counts_ttl_s
        self._thumbnail_ttl_s = settings.counts.thumbnail_ttl_s
        self._model = model
        self._executor = executor
        self._clock_ms = clock_ms
        self._wall_ms = wall_ms
        self._limits = DecodeLimits.of(settings.batch)
        # When each source's latest frame was last written (with its thumbnail, if any).
        self._latest_written: RecentSources[None] = RecentSources(
            SourceLimits(settings.counts.max_tracked_sources, self._thumbnail_ttl_s * 1000)
        )
        self._thumbnails = (
            ThumbnailBudget(settings.counts.thumbnail_rate, clock_ms())
            if settings.counts.thumbnail_rate > 0
            else None
        )
        # Sources due a picture and not given one yet: since when each has waited.
        self._waiting: RecentSources[float] = RecentSources(
            SourceLimits(settings.counts.max_tracked_sources, WAIT_MEMORY_S * 1000)
        )
        self._legacy_expiring = False

    async def write(self, batch: Batch) -> None:
        """Update the live view; never raises for Redis trouble."""
        if not batch.predictions and not batch.dead:
            return
        keys, now_ms = self._keys, self._clock_ms()
        latest: dict[str, Prediction] = {}
        per_source: dict[str, int] = {}
        for p in batch.predictions:
            latest[p.frame.source_id] = p
            per_source[p.frame.source_id] = per_source.get(p.frame.source_id, 0) + 1
        due = self._due(latest, now_ms)
        thumbs = (
            await asyncio.get_running_loop().run_in_executor(self._executor, thumbnails, due, self._limits)
            if due and self._thumbnails is not None
            else {}
        )
        model = self._model()
        dead = Counter(dead_frame_identity(d.key) for d in batch.dead)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                if per_source:
                    wall_ms = self._wall_ms()
                    pipe.zadd(keys.sources, dict.fromkeys(per_source, wall_ms))
                    pipe.zremrangebyscore(keys.sources, "-inf", wall_ms - self._stats_ttl_s * 1000)
                    pipe.expire(keys.sources, self._stats_ttl_s)
                if not self._legacy_expiring:
                    # The unbounded set older workers wrote: nothing adds to it any more, and
                    # after one TTL every stats hash it names has expired too.
                    pipe.expire(keys.legacy_sources, self._stats_ttl_s)
                for source, n in per_source.items():
                    key = keys.stats(source)
                    snapshot = batch.drift[source]
                    p = latest[source]
                    pipe.hincrby(key, "frames", n)
                    pipe.hset(
                        key,
                        mapping={
                            "kind": p.frame.source_kind.value,
                            "latency_ms": f"{p.latency_ms:.1f}",
                            "low_confidence_share": f"{snapshot.low_confidence_share:.4f}",
                            "label_share": json.dumps(snapshot.label_share),
                            "updated_ms": str(p.processed_at_ms),
                        },
                    )
                    pipe.expire(key, self._stats_ttl_s)
                for identity, n in dead.items():
                    pipe.hincrby(keys.stats(identity), "dead", n)
                    pipe.expire(keys.stats(identity), self._stats_ttl_s)
                for p in due:
                    source = p.frame.source_id
                    self._latest_written.touch(source, now_ms, lambda: None)
                    pipe.set(keys.frame(source), codec.label_record(p, model), ex=self._thumbnail_ttl_s)
                    if source in thumbs:
                        pipe.set(keys.thumb(source), thumbs[source], ex=self._thumbnail_ttl_s)
                    else:  # never an older picture beside these labels
                        pipe.delete(keys.thumb(source))
                await pipe.execute()
            self._legacy_expiring = True
        except redis_errors.RedisError as exc:
            log.debug("live view not updated: %s", exc)

    def _due(self, latest: dict[str, Prediction], now_ms: float) -> list[Prediction]:
        """The latest frames to write now: those of sources whose latest frame is a second old or
        more (or was never written), as many as the thumbnail budget allows, to the sources that
        have waited longest for a picture (whichever delivery their frames come in)."""
        self._latest_written.forget(now_ms)
        every_ms = THUMBNAIL_EVERY_S * 1000
        stale: list[Prediction] = []
        for source, p in latest.items():
            written = self._latest_written.last_seen_ms(source)
            if written is None or now_ms - written >= every_ms:
                stale.append(p)
        budget = self._thumbnails
        if budget is None:
            return stale
        waiting = self._waiting
        for p in stale:
            written = self._latest_written.last_seen_ms(p.frame.source_id)
            due_at = now_ms if written is None else written + every_ms
            waiting.touch(p.frame.source_id, now_ms, functools.partial(float, due_at))
        waiting.forget(now_ms)
        granted = budget.available(now_ms)
        if not granted or not stale:
            return []
        # A picture goes to a source of this delivery only if fewer than ``granted`` sources
        # have waited longer: the others keep the budget for the sources ahead of them.

        def since(source: str) -> float:
            waited = waiting.get(source)
            return now_ms if waited is None else waited

        since_of = {p.frame.source_id: since(p.frame.source_id) for p in stale}
        cutoff = heapq.nsmallest(granted, map(since, waiting))[-1] if len(waiting) > granted else math.inf
        chosen = sorted(
            (p for p in stale if since_of[p.frame.source_id] <= cutoff),
            key=lambda p: since_of[p.frame.source_id],
        )[:granted]
        budget.spend(len(chosen))
        for p in chosen:
            waiting.discard(p.frame.source_id)
        return chosen


class ThumbnailBudget:
    """A token bucket: ``per_s`` thumbnails a second, and at most a second's worth at once."""

    __slots__ = ("_at_ms", "_per_s", "_tokens")

    def __init__(self, per_s: float, now_ms: float) -> None:
        self._per_s = per_s
        self._tokens = max(1.0, per_s)
        self._at_ms = now_ms

    def available(self, now_ms: float) -> int:
        """How many thumbnails may be made now."""
        elapsed_s = max(0.0, now_ms - self._at_ms) / 1000
        self._tokens = min(max(1.0, self._per_s), self._tokens + elapsed_s * self._per_s)
        self._at_ms = now_ms
        return int(self._tokens)

    def spend(self, made: int) -> None:
        """Take ``made`` thumbnails (at most what :meth:`available` said) out of the budget."""
        self._tokens -= made


def thumbnails(predictions: list[Prediction], limits: DecodeLimits) -> dict[str, bytes]:
    """Small JPEG thumbnails of each source's latest frame (runs on the decode pool)."""
    out: dict[str, bytes] = {}
    for p in predictions:
        data = thumbnail(p.frame.data, p.frame.content_type, limits)
        if data is not None:
            out[p.frame.source_id] = data
    return out


def thumbnail(data: bytes, content_type: str, limits: DecodeLimits) -> bytes | None:
    """A JPEG of the frame, ``THUMBNAIL_WIDTH`` wide, or ``None`` when it cannot be decoded.

    The JPEG is decoded at the smallest DCT scale whose width still covers the thumbnail's (720p
    at a quarter, 1080p at an eighth: already the width), then shrunk with the area filter:
    about 40 % less CPU than a half-scale decode at 720p, half at 1080p (``bench.thumbnails``).
    A frame turned by its EXIF orientation, whose stored height becomes its width, is decoded
    again at the scale that keeps both sides covered.
    """
    try:
        header = probe(data, content_type, limits)
        wide = header.width >= header.height
        image = decode_bgr(data, header, DecodeTarget(THUMBNAIL_WIDTH, "longer" if wide else "shorter"))
        if image.shape[1] < THUMBNAIL_WIDTH and max(image.shape[:2]) < max(header.width, header.height):
            image = decode_bgr(data, header, DecodeTarget(THUMBNAIL_WIDTH, "shorter"))
    except BadFrame:
        return None
    height, width = image.shape[:2]
    size = (THUMBNAIL_WIDTH, max(1, round(height * THUMBNAIL_WIDTH / width)))
    interpolation = cv2.INTER_AREA if width > THUMBNAIL_WIDTH else cv2.INTER_LINEAR
    small = image if size == (width, height) else cv2.resize(image, size, interpolation=interpolation)
    ok, encoded = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 75])
    return encoded.tobytes() if ok else None
