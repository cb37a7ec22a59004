"""The micro-batching rule and the in-flight bound: pure, with the clock passed in.

A batch is flushed when it holds ``max_batch`` frames or ``max_wait_ms`` after its first
frame arrived, whichever comes first. The worker asks :meth:`BatchPolicy.wait_ms` how long it
may wait for more frames, so it never waits without a deadline; nothing here sleeps or reads a
clock, which keeps every timing rule testable with plain numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from stream_worker.errors import ConfigError


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """When an open batch is due, and how long the poll loop may wait before it is."""

    max_batch: int
    max_wait_ms: float

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must not be negative, got {self.max_wait_ms}")

    def due(self, size: int, opened_at_ms: float, now_ms: float) -> bool:
        """Whether a batch of ``size`` frames, opened at ``opened_at_ms``, must go now."""
        if size <= 0:
            return False
        return size >= self.max_batch or now_ms >= opened_at_ms + self.max_wait_ms

    def wait_ms(self, size: int, opened_at_ms: float, now_ms: float, idle_ms: float) -> float:
        """How long to wait for more frames: until the batch is due, at most ``idle_ms``.

        With no frames open there is nothing to flush, and the wait is the idle poll interval.
        """
        if size <= 0:
            return idle_ms
        if self.due(size, opened_at_ms, now_ms):
            return 0.0
        return max(0.0, min(idle_ms, opened_at_ms + self.max_wait_ms - now_ms))


class InFlight:
    """Counts frames between fetch and commit; ``full`` tells the worker to pause its partitions.

    ``acquire`` never refuses: records already fetched when the limit is reached must still
    be held, so the count may overshoot ``limit`` by one fetch. Releasing more than was
    acquired is a bug in the caller and raises.
    """

    __slots__ = ("_count", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ConfigError(f"the in-flight limit must be at least 1, got {limit}")
        self.limit = limit
        self._count = 0

    @property
    def count(self) -> int:
        """Frames currently held."""
        return self._count

    @property
    def full(self) -> bool:
        """Whether the limit is reached: stop fetching until some frames are released."""
        return self._count >= self.limit

    @property
    def room(self) -> int:
        """How many more frames may be fetched before the limit (0 when full)."""
        return max(0, self.limit - self._count)

    def acquire(self, n: int = 1) -> None:
        """Count ``n`` frames as fetched."""
        if n < 0:
            raise ValueError(f"cannot acquire {n} frames")
        self._count += n

    def release(self, n: int = 1) -> None:
        """Count ``n`` frames as finished (committed or dead-lettered)."""
        if n < 0 or n > self._count:
            raise ValueError(f"cannot release {n} frames, {self._count} are in flight")
        self._count -= n
