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
    """Counts frames, and their bytes, between fetch and commit; ``full`` tells the worker to pause.

    Two budgets, because frames differ in size by three orders of magnitude: ``limit`` records
    keep the commit latency bounded, ``byte_limit`` bytes keep memory bounded (256 in-flight
    frames of up to 20 MB each would be 5 GB). ``acquire`` never refuses: records already
    fetched when a budget is reached must still be held, so either may overshoot by one fetch.
    Releasing more than was acquired is a bug in the caller and raises.
    """

    __slots__ = ("_bytes", "_count", "byte_limit", "limit")

    def __init__(self, limit: int, byte_limit: int | None = None) -> None:
        if limit < 1:
            raise ConfigError(f"the in-flight limit must be at least 1, got {limit}")
        if byte_limit is not None and byte_limit < 1:
            raise ConfigError(f"the in-flight byte limit must be at least 1, got {byte_limit}")
        self.limit = limit
        self.byte_limit = byte_limit
        self._count = 0
        self._bytes = 0

    @property
    def count(self) -> int:
        """Frames currently held."""
        return self._count

    @property
    def bytes(self) -> int:
        """Bytes of the frames currently held (their record values)."""
        return self._bytes

    @property
    def full(self) -> bool:
        """Whether a budget is reached: stop fetching until some frames are released."""
        return self._count >= self.limit or (self.byte_limit is not None and self._bytes >= self.byte_limit)

    @property
    def room(self) -> int:
        """How many more frames may be fetched before the record limit (0 when full)."""
        return 0 if self.full else self.limit - self._count

    def acquire(self, n: int = 1, nbytes: int = 0) -> None:
        """Count ``n`` frames of ``nbytes`` bytes in all as fetched."""
        if n < 0 or nbytes < 0:
            raise ValueError(f"cannot acquire {n} frames of {nbytes} bytes")
        self._count += n
        self._bytes += nbytes

    def release(self, n: int = 1, nbytes: int = 0) -> None:
        """Count ``n`` frames of ``nbytes`` bytes in all as finished (committed or dead-lettered)."""
        if n < 0 or n > self._count or nbytes < 0 or nbytes > self._bytes:
            raise ValueError(
                f"cannot release {n} frames of {nbytes} bytes, "
                f"{self._count} ({self._bytes} bytes) are in flight"
            )
        self._count -= n
        self._bytes -= nbytes
