"""The Redis keys of the live view: written by ``sinks/live.py``, read by ``dashboard/live.py``.

==================================  ==========================================================
``P:live:sources``                  set of every source with a live view
``P:live:stats:<source>``           hash: ``frames``, ``dead``, ``kind``, ``latency_ms``,
                                    ``low_confidence_share``, ``label_share`` (JSON),
                                    ``updated_ms``
``P:live:frame:<source>``           the latest label record of the source (JSON), with a TTL
``P:live:thumb:<source>``           a small JPEG of that frame, with a TTL
==================================  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass


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
        """The set of sources."""
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
