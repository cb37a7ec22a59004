"""The micro-batcher's size and deadline rules, and the in-flight bound (stream_worker.batching)."""

from __future__ import annotations

import pytest

from stream_worker.batching import InFlight, MicroBatcher
from stream_worker.errors import ConfigError


def test_empty_batcher_has_no_deadline_and_is_never_ready() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_batch=4, max_wait_ms=20)
    assert batcher.deadline_ms() is None
    assert not batcher.ready(now_ms=1e12)
    assert batcher.take() == []


def test_deadline_counts_from_the_first_item() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_batch=8, max_wait_ms=20)
    batcher.add("a", now_ms=100)
    batcher.add("b", now_ms=115)  # a later item does not push the deadline back
    assert batcher.deadline_ms() == 120
    assert not batcher.ready(now_ms=119.9)
    assert batcher.ready(now_ms=120)
    assert batcher.take() == ["a", "b"]
    assert batcher.deadline_ms() is None


def test_full_batch_is_ready_before_its_deadline() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_batch=3, max_wait_ms=1000)
    for i in range(2):
        batcher.add(i, now_ms=0)
    assert not batcher.ready(now_ms=0)
    batcher.add(2, now_ms=1)
    assert batcher.ready(now_ms=1)
    assert batcher.take() == [0, 1, 2]


def test_take_returns_at_most_max_batch_oldest_first_and_leftovers_keep_their_arrival() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_batch=2, max_wait_ms=50)
    for i, at in enumerate([0, 10, 30, 40, 45]):
        batcher.add(i, now_ms=at)
    assert batcher.take() == [0, 1]
    # Still a full batch pending: ready at once.
    assert batcher.ready(now_ms=46)
    assert batcher.take() == [2, 3]
    assert len(batcher) == 1
    assert batcher.deadline_ms() == 95  # item 4 arrived at 45
    assert not batcher.ready(now_ms=94)
    assert batcher.ready(now_ms=95)
    assert batcher.take() == [4]


def test_zero_wait_flushes_every_item_at_once() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_batch=32, max_wait_ms=0)
    batcher.add(7, now_ms=5)
    assert batcher.ready(now_ms=5)


@pytest.mark.parametrize(("max_batch", "max_wait_ms"), [(0, 10), (-1, 10), (4, -1)])
def test_nonsense_settings_are_a_config_error(max_batch: int, max_wait_ms: float) -> None:
    with pytest.raises(ConfigError):
        MicroBatcher[int](max_batch=max_batch, max_wait_ms=max_wait_ms)


def test_in_flight_is_full_at_its_limit_and_frees_room_on_release() -> None:
    in_flight = InFlight(limit=4)
    assert (in_flight.full, in_flight.room) == (False, 4)
    in_flight.acquire(3)
    assert (in_flight.full, in_flight.room) == (False, 1)
    in_flight.acquire()
    assert (in_flight.full, in_flight.room) == (True, 0)
    in_flight.release(2)
    assert (in_flight.full, in_flight.room, in_flight.count) == (False, 2, 2)


def test_in_flight_may_overshoot_by_a_fetch_but_stays_full_until_released() -> None:
    in_flight = InFlight(limit=4)
    in_flight.acquire(10)  # a fetch already under way when the limit was reached
    assert in_flight.full and in_flight.room == 0
    in_flight.release(6)
    assert in_flight.full
    in_flight.release(1)
    assert not in_flight.full


def test_releasing_more_than_acquired_raises() -> None:
    in_flight = InFlight(limit=4)
    in_flight.acquire(1)
    with pytest.raises(ValueError, match="cannot release 2"):
        in_flight.release(2)
    assert in_flight.count == 1


def test_in_flight_limit_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        InFlight(limit=0)
