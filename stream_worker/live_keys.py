"""The Redis keys of the live view: written by ``sinks/live.py``, read by ``dashboard/live.py``.

======================================  ======================================================
``P:live:sources:last-seen``            sorted set: every source with a live view, scored by
                                        when a worker last wrote it (ms since the epoch);
                                        trimmed to the stats' TTL on every write
``P:live:sources``                      the set of sources written before the sorted set (read
                                        too; it expires one TTL after a worker first sees it)
``P:live:stats:<identity>``             hash: ``frames``, ``dead``, ``kind``, ``latency_ms``,
                                        ``low_confidence_share``, ``label_share`` (JSON),
                                        ``updated_ms``; with a TTL. A dead frame bumps ``dead``
                                        under :func:`dead_frame_identity` of its record key
``P:live:frame:<source>``               the latest label record of the source (JSON), with a TTL
``P:live:thumb:<source>``               a small JPEG of that frame, with a TTL
======================================  ======================================================
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from stream_worker.codec import source_id_of_key

NO_KEY = "_no-key"
"""The identity of dead frames without a record key."""


def dead_frame_identity(key: bytes | None) -> str:
    """Whose ``dead`` counter a dead frame's record key bumps, in at most 200 characters.

    The source id when the key is a valid one (records are keyed by source id, so the dashboard
    shows the source's dead share); otherwise ``_key:`` and 16 hex digits of the key's SHA-256,
    and :data:`NO_KEY` without a key. Source ids never start with ``_``, so neither can collide
    with a source. The key itself is arbitrary bytes of any length: it never becomes a key name.
    """
    if not key:
        return NO_KEY
    source = source_id_of_key(key)
    return source if source is not None else "_key:" + hashlib.sha256(key).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class LiveKeys:
    """Key names of the live view under one key prefix."""

    prefix: str

    @property
    def root(self) -> str:
        """Every live-view key starts with this."""
        return f"{self.prefix}:live"

    @property
    def sources(self) -> str:
        """The sorted set of sources, scored by when they were last written."""
        return f"{self.root}:sources:last-seen"

    @property
    def legacy_sources(self) -> str:
        """The set of sources as workers before the sorted set wrote it (never trimmed)."""
        return f"{self.root}:sources"

    def stats(self, source: str) -> str:
        """A source's counters and latest statistics."""
        return f"{self.root}:stats:{source}"

    def frame(self, source: str) -> str:
        """A source's latest label record."""
        return f"{self.root}:frame:{source}"

    def thumb(self, source: str) -> str:
        """A source's latest thumbnail."""
        return f"{self.root}:thumb:{source}"
