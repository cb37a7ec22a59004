"""The micro-batcher and the in-flight bound: pure, with the clock passed in.

A batch is flushed when it holds ``max_batch`` items or ``max_wait_ms`` after its first
item arrived, whichever comes first. The worker asks :meth:`MicroBatcher.deadline_ms` how
long it may wait, so it never waits without a deadline; no method here sleeps or reads a
clock, which keeps every timing rule testable with plain numbers.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from stream_worker.errors import ConfigError

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Holds pending items in arrival order and says when a batch is due.

    Items left over after a :meth:`take` keep their own arrival times, so the next batch's
    deadline counts from its own first item, not from when the previous batch was taken.
    """

    __slots__ = ("_pending", "max_batch", "max_wait_ms")

    def __init__(self, max_batch: int, max_wait_ms: float) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must not be negative, got {max_wait_ms}")
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self._pending: deque[tuple[float, T]] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, item: T, now_ms: float) -> None:
        """Queue ``item``, which arrived at ``now_ms``."""
        self._pending.append((now_ms, item))

    def deadline_ms(self) -> float | None:
        """When the oldest pending item's batch must be flushed; ``None`` when nothing is pending."""
        if not self._pending:
            return None
        return self._pending[0][0] + self.max_wait_ms

    def ready(self, now_ms: float) -> bool:
        """Whether a batch should be taken now: it is full, or its deadline has come."""
        deadline = self.deadline_ms()
        if deadline is None:
            return False
        return len(self._pending) >= self.max_batch or now_ms >= deadline

    def take(self) -> list[T]:
        """Remove and return up to ``max_batch`` of the oldest items (all of them when fewer)."""
        count = min(self.max_batch, len(self._pending))
        return [self._pending.popleft()[1] for _ in range(count)]


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
