"""The micro-batcher's size and deadline rules, and the in-flight bound (stream_worker.batching)."""

from __future__ import annotations

import pytest

from stream_worker.batching import BatchPolicy, InFlight
from stream_worker.errors import ConfigError


def test_an_empty_batch_is_never_due_and_the_loop_waits_the_idle_interval() -> None:
    policy = BatchPolicy(max_batch=4, max_wait_ms=20)
    assert not policy.due(0, opened_at_ms=0, now_ms=1_000)
    assert policy.wait_ms(0, opened_at_ms=0, now_ms=1_000, idle_ms=100) == 100


def test_the_deadline_counts_from_the_first_frame() -> None:
    policy = BatchPolicy(max_batch=8, max_wait_ms=20)
    assert not policy.due(3, opened_at_ms=1_000, now_ms=1_019)
    assert policy.wait_ms(3, opened_at_ms=1_000, now_ms=1_005, idle_ms=100) == 15
    assert policy.due(3, opened_at_ms=1_000, now_ms=1_020)
    assert policy.wait_ms(3, opened_at_ms=1_000, now_ms=1_030, idle_ms=100) == 0


def test_a_full_batch_is_due_before_its_deadline() -> None:
    policy = BatchPolicy(max_batch=3, max_wait_ms=1_000)
    assert not policy.due(2, opened_at_ms=0, now_ms=1)
    assert policy.due(3, opened_at_ms=0, now_ms=1)
    assert policy.wait_ms(3, opened_at_ms=0, now_ms=1, idle_ms=100) == 0


def test_the_wait_never_exceeds_the_idle_interval() -> None:
    policy = BatchPolicy(max_batch=32, max_wait_ms=5_000)
    assert policy.wait_ms(1, opened_at_ms=0, now_ms=0, idle_ms=100) == 100


def test_zero_wait_flushes_every_frame_at_once() -> None:
    policy = BatchPolicy(max_batch=32, max_wait_ms=0)
    assert policy.due(1, opened_at_ms=5, now_ms=5)


@pytest.mark.parametrize(("max_batch", "max_wait_ms"), [(0, 10), (-1, 10), (4, -1)])
def test_nonsense_settings_are_a_config_error(max_batch: int, max_wait_ms: float) -> None:
    with pytest.raises(ConfigError):
        BatchPolicy(max_batch=max_batch, max_wait_ms=max_wait_ms)


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


def test_a_few_large_frames_fill_the_byte_budget_long_before_the_record_budget() -> None:
    in_flight = InFlight(limit=256, byte_limit=50_000_000)
    in_flight.acquire(2, 40_000_000)  # two 20 MB frames
    assert not in_flight.full and in_flight.room == 254
    in_flight.acquire(1, 20_000_000)
    assert in_flight.full and in_flight.room == 0 and in_flight.bytes == 60_000_000
    in_flight.release(2, 40_000_000)
    assert not in_flight.full and (in_flight.count, in_flight.bytes) == (1, 20_000_000)


def test_releasing_more_than_acquired_raises() -> None:
    in_flight = InFlight(limit=4)
    in_flight.acquire(1)
    with pytest.raises(ValueError, match="cannot release 2"):
        in_flight.release(2)
    assert in_flight.count == 1


def test_in_flight_limit_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        InFlight(limit=0)
