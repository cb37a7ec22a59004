"""Per-source state that forgets: least recently seen sources go past a limit and an idle time.

Source ids come from the records, so their number is whatever the cameras (or a misconfigured
producer) make it: every per-source structure the worker holds in memory or exports (the drift
tracker, the metrics' label sets, the live view's thumbnail clock) keeps its sources in a
:class:`RecentSources` and forgets them by one rule, stated once in :meth:`RecentSources.forget`:

* a source not seen for ``idle_ms`` or longer is forgotten;
* then, while more than ``max_sources`` remain, the least recently seen is forgotten.

Pure, with the clock passed in (like ``batching.py``): nothing here reads a clock, and the
caller's clock must never go backwards (``time.monotonic``), so that the least recently seen
source is always the first one held. ``touch``
never forgets anything, so the sources of the batch being handled are all still there when the
caller reads them; the caller calls ``forget`` once per batch, after it, which means the table
may hold one batch's worth of sources beyond ``max_sources`` in between (the same overshoot as
``InFlight``). ``admit`` is the refusing variant for label sets with an overflow value: it adds a
new source only while there is room, so the limit is never exceeded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from stream_worker.errors import ConfigError

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class SourceLimits:
    """How many sources a structure keeps, and how long an unseen source is kept."""

    max_sources: int
    idle_ms: float

    def __post_init__(self) -> None:
        if self.max_sources < 1:
            raise ConfigError(f"max_sources must be at least 1, got {self.max_sources}")
        if self.idle_ms <= 0:
            raise ConfigError(f"idle_ms must be positive, got {self.idle_ms}")


class RecentSources(Generic[V]):
    """A value per source, ordered from least to most recently seen; see the module docstring.

    Every operation is O(1) except ``forget``, which is O(sources forgotten): the oldest source
    is always first, so it stops at the first one that stays.
    """

    __slots__ = ("_entries", "limits")

    def __init__(self, limits: SourceLimits) -> None:
        self.limits = limits
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, source: object) -> bool:
        return source in self._entries

    def __iter__(self) -> Iterator[str]:
        """Sources from least to most recently seen."""
        return iter(self._entries)

    def get(self, source: str) -> V | None:
        """The source's value, or ``None`` when it is not held; does not count as seeing it."""
        entry = self._entries.get(source)
        return entry[1] if entry is not None else None

    def last_seen_ms(self, source: str) -> float | None:
        """When the source was last touched or admitted, or ``None`` when it is not held."""
        entry = self._entries.get(source)
        return entry[0] if entry is not None else None

    def touch(self, source: str, now_ms: float, make: Callable[[], V]) -> V:
        """The source's value (made with ``make`` when new), marked as seen at ``now_ms``."""
        entry = self._entries.get(source)
        value = make() if entry is None else entry[1]
        self._entries[source] = (now_ms, value)
        self._entries.move_to_end(source)
        return value

    def discard(self, source: str) -> None:
        """Forget one source now (nothing when it is not held)."""
        self._entries.pop(source, None)

    def admit(self, source: str, now_ms: float, make: Callable[[], V]) -> V | None:
        """Like :meth:`touch` while the source is held or there is room; ``None`` (nothing
        changed) for a new source when ``max_sources`` are held."""
        if source not in self._entries and len(self._entries) >= self.limits.max_sources:
            return None
        return self.touch(source, now_ms, make)

    def forget(self, now_ms: float) -> list[tuple[str, V]]:
        """Forget sources idle for ``idle_ms`` or longer, then the least recently seen beyond
        ``max_sources``; returns what was forgotten, oldest first (to remove its traces)."""
        gone: list[tuple[str, V]] = []
        entries, cutoff = self._entries, now_ms - self.limits.idle_ms
        while entries:
            source, (seen_ms, value) = next(iter(entries.items()))
            if seen_ms > cutoff and len(entries) <= self.limits.max_sources:
                break
            del entries[source]
            gone.append((source, value))
        return gone
