"""What the dashboard shows, read from Redis as plain JSON-ready data.

The worker writes a live view per source (``<prefix>:live:*``, ``sinks/live.py``, keys in ``live_keys.py``)
and the exactly-once window counts (``sinks/counts.py``). This module only reads them. Rates
(frames/s, dead letters/s) are not stored anywhere: they are derived here from successive
readings of the cumulative counters, so every dashboard replica computes them on its own.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from stream_worker.errors import ConfigError
from stream_worker.live_keys import LiveKeys
from stream_worker.redis_client import redis_failure
from stream_worker.sinks.counts import CountsReader

RATE_HORIZON_S = 10.0
"""Throughput is averaged over about this many seconds of readings."""
MAX_WINDOWS = 240
"""Most windows one counts reply carries (the newest ones): 4 hours of 1-minute windows."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One reading of a source's cumulative counters."""

    at_s: float
    frames: int
    dead: int


@dataclass(slots=True)
class RateTracker:
    """Frames/s and dead letters/s per source from successive readings of cumulative counters.

    Readings older than the horizon are dropped, except the newest of them, so a rate always
    spans at least ``horizon_s`` once enough readings exist. A counter that goes down (the
    stats hash expired and started again) restarts the source's history.
    """

    horizon_s: float = RATE_HORIZON_S
    min_span_s: float = 1.0
    _history: dict[str, deque[Reading]] = field(default_factory=dict)

    def observe(self, source: str, reading: Reading) -> tuple[float | None, float | None]:
        """Record a reading; return (frames/s, dead/s), or ``None`` while the span is too short."""
        history = self._history.setdefault(source, deque())
        if history and (reading.frames < history[-1].frames or reading.dead < history[-1].dead):
            history.clear()
        history.append(reading)
        cutoff = reading.at_s - self.horizon_s
        while len(history) > 2 and history[1].at_s <= cutoff:
            history.popleft()
        oldest = history[0]
        span = reading.at_s - oldest.at_s
        if span < self.min_span_s:
            return None, None
        return (reading.frames - oldest.frames) / span, (reading.dead - oldest.dead) / span

    def forget_except(self, sources: Sequence[str]) -> None:
        """Drop the history of sources that are gone (keeps memory bounded)."""
        keep = set(sources)
        for source in [s for s in self._history if s not in keep]:
            del self._history[source]


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _number(raw: dict[str, str], name: str) -> float | None:
    try:
        value = float(raw[name])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _json(raw: str | None, default: Any) -> Any:
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return default


class LiveView:
    """Reads the live view and the counts of every source from Redis for the dashboard."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str,
        windows: Sequence[str],
        parents: Mapping[str, str | None] | None = None,
        clock_s: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        # redis-py's async typing is loose; replies used here are plain bytes.
        self._client: Any = client
        self._keys = LiveKeys(key_prefix)
        self.windows = tuple(windows)
        # The taxonomy's hierarchy: the page stacks leaves and shows what a group counted
        # beyond its children (frames rolled up to "vehicle" when no type was sure enough).
        self._parents = {k: v for k, v in (parents or {}).items() if v}
        # ttl and event gap only matter for writes; the dashboard never writes counts.
        self._counts = CountsReader(client, key_prefix=key_prefix)
        self._rates = RateTracker()
        self._clock_s = clock_s
        self._wall_ms = wall_ms

    async def ping(self) -> None:
        """Raise a :class:`LookoutError` when Redis does not answer."""
        try:
            await self._client.ping()
        except redis_errors.RedisError as exc:
            raise redis_failure(exc) from exc

    async def source_ids(self) -> list[str]:
        """Every source with counts or a live view, sorted."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zrange(self._keys.sources, 0, -1)
                pipe.smembers(self._keys.legacy_sources)
                pipe.zrange(self._counts.directory, 0, -1)
                pipe.smembers(self._counts.legacy_directory)
                replies = await pipe.execute()
        except redis_errors.RedisError as exc:
            raise redis_failure(exc) from exc
        return sorted({_text(s) for reply in replies for s in reply})

    async def sources(self) -> dict[str, Any]:
        """``/api/sources``: the sources, their kind, and the count windows on offer."""
        ids = await self.source_ids()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for source in ids:
                    pipe.hget(self._keys.stats(source), "kind")
                kinds = await pipe.execute()
        except redis_errors.RedisError as exc:
            raise redis_failure(exc) from exc
        return {
            "sources": [
                {"id": s, "kind": _text(k) if k is not None else None}
                for s, k in zip(ids, kinds, strict=True)
            ],
            "windows": list(self.windows),
            "now_ms": self._wall_ms(),
        }

    async def stats(self) -> dict[str, Any]:
        """``/api/stats``: per source throughput, latency, dead letters, drift and latest labels."""
        ids = await self.source_ids()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for source in ids:
                    pipe.hgetall(self._keys.stats(source))
                    pipe.get(self._keys.frame(source))
                    pipe.exists(self._keys.thumb(source))
                replies = await pipe.execute()
        except redis_errors.RedisError as exc:
            raise redis_failure(exc) from exc
        now_s, now_ms = self._clock_s(), self._wall_ms()
        self._rates.forget_except(ids)
        out = []
        for i, source in enumerate(ids):
            raw_hash, raw_frame, has_thumb = replies[3 * i : 3 * i + 3]
            stats = {_text(k): _text(v) for k, v in raw_hash.items()}
            frame = _json(_text(raw_frame), {}) if raw_frame is not None else {}
            if not isinstance(frame, dict):
                frame = {}
            frames, dead = int(_number(stats, "frames") or 0), int(_number(stats, "dead") or 0)
            fps, dead_per_s = self._rates.observe(source, Reading(now_s, frames, dead))
            updated_ms = _number(stats, "updated_ms")
            out.append(
                {
                    "id": source,
                    "kind": stats.get("kind") or frame.get("source_kind"),
                    "frames": frames,
                    "dead": dead,
                    "fps": fps,
                    "dead_per_s": dead_per_s,
                    "dead_share": dead / (frames + dead) if frames + dead else 0.0,
                    "latency_ms": _number(stats, "latency_ms"),
                    "low_confidence_share": _number(stats, "low_confidence_share"),
                    "label_share": _json(stats.get("label_share"), {}),
                    "updated_ms": int(updated_ms) if updated_ms is not None else None,
                    "age_s": (now_ms - updated_ms) / 1000 if updated_ms is not None else None,
                    "latest": {
                        "frame_id": frame.get("frame_id"),
                        "captured_at": frame.get("captured_at"),
                        "labels": frame.get("labels", []),
                        "top_k": frame.get("top_k", [])[:3],
                    },
                    "thumbnail": bool(has_thumb),
                }
            )
        return {"now_ms": now_ms, "sources": out}

    async def counts(self, source: str, window: str, limit: int = MAX_WINDOWS) -> dict[str, Any]:
        """``/api/counts``: per window and label (and per species for events), oldest first."""
        if window not in self.windows:
            raise ConfigError(f"unknown window {window!r}; one of {', '.join(self.windows)}")
        windows = await self._counts.read(source, window, last=max(1, limit))
        labels = sorted({name for w in windows for name in w.labels})
        species = sorted({name for w in windows for name in w.events})
        try:
            kind = await self._client.hget(self._keys.stats(source), "kind")
        except redis_errors.RedisError as exc:
            raise redis_failure(exc) from exc
        return {
            "source": source,
            "window": window,
            "kind": _text(kind) if kind is not None else ("wildlife" if species else "traffic"),
            "starts": [w.start_ms for w in windows],
            "frames": [w.frames for w in windows],
            "labels": {name: [w.labels.get(name, 0) for w in windows] for name in labels},
            "events": {name: [w.events.get(name, 0) for w in windows] for name in species},
            "totals": {
                "frames": sum(w.frames for w in windows),
                "labels": {name: sum(w.labels.get(name, 0) for w in windows) for name in labels},
                "events": {name: sum(w.events.get(name, 0) for w in windows) for name in species},
            },
            "parents": {name: self._parents[name] for name in labels if name in self._parents},
            "groups": sorted(set(labels) & set(self._parents.values())),
        }

    async def thumbnail(self, source: str) -> bytes | None:
        """The latest JPEG thumbnail of a source, or ``None`` when it expired or never existed."""
        try:
            data = await self._client.get(self._keys.thumb(source))
        except redis_errors.RedisError as exc:
            raise redis_failure(exc) from exc
        return bytes(data) if data is not None else None
