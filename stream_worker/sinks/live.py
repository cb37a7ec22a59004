"""The dashboard's live view: per-source statistics, the latest label record and a thumbnail.

Best effort by design: it is a view, not a record, so it is written after the commit, never
retried, and a Redis error only skips one update. Thumbnails are made at most once a second
per source, on the decode pool (keys: ``stream_worker/live_keys.py``).

Bounded whatever the number of sources: the directory of sources is a sorted set scored by the
time of the last write and trimmed to the stats' TTL on every write; every stats key has that
TTL, dead frames' included, and a dead frame's key name is built from a bounded identity of its
record key, never from the raw key; the clock of the last thumbnail per source is only kept for
the second in which it matters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any

import cv2
import numpy as np
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from stream_worker import codec
from stream_worker.frames import Prediction
from stream_worker.live_keys import LiveKeys, dead_frame_identity
from stream_worker.pipeline import Batch
from stream_worker.settings import Settings
from stream_worker.sources import RecentSources, SourceLimits

log = logging.getLogger("lookout.live")

THUMBNAIL_WIDTH = 240
THUMBNAIL_EVERY_S = 1.0


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
        # When each source's last thumbnail was made; forgotten once a new one is due anyway.
        self._last_thumbnail: RecentSources[None] = RecentSources(
            SourceLimits(settings.counts.max_tracked_sources, THUMBNAIL_EVERY_S * 1000)
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
        self._last_thumbnail.forget(now_ms)
        due = [p for s, p in latest.items() if s not in self._last_thumbnail]
        thumbs = (
            await asyncio.get_running_loop().run_in_executor(self._executor, thumbnails, due) if due else {}
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
                    self._last_thumbnail.touch(source, now_ms, lambda: None)
                    pipe.set(keys.frame(source), codec.label_record(p, model), ex=self._thumbnail_ttl_s)
                    if source in thumbs:
                        pipe.set(keys.thumb(source), thumbs[source], ex=self._thumbnail_ttl_s)
                await pipe.execute()
            self._legacy_expiring = True
        except redis_errors.RedisError as exc:
            log.debug("live view not updated: %s", exc)


def thumbnails(predictions: list[Prediction]) -> dict[str, bytes]:
    """Small JPEG thumbnails of each source's latest frame (runs on the decode pool)."""
    out: dict[str, bytes] = {}
    for p in predictions:
        image = cv2.imdecode(np.frombuffer(p.frame.data, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
        if image is None:
            continue
        height = max(1, round(image.shape[0] * THUMBNAIL_WIDTH / image.shape[1]))
        small = cv2.resize(image, (THUMBNAIL_WIDTH, height), interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 75])
        if ok:
            out[p.frame.source_id] = data.tobytes()
    return out
