"""Per-source state that forgets (stream_worker.sources), with the clock passed in."""

from __future__ import annotations

import pytest

from stream_worker.errors import ConfigError
from stream_worker.sources import RecentSources, SourceLimits


def test_a_stream_of_new_sources_never_holds_more_than_the_limit_after_each_forget() -> None:
    table: RecentSources[int] = RecentSources(SourceLimits(max_sources=50, idle_ms=3_600_000))
    for i in range(10_000):
        table.touch(f"cam-{i}", now_ms=i, make=lambda: 0)
        table.forget(now_ms=i)
        assert len(table) <= 50
    # The 50 most recently seen are the ones kept.
    assert list(table) == [f"cam-{i}" for i in range(9_950, 10_000)]


def test_the_least_recently_seen_go_first_and_are_returned_to_remove_their_traces() -> None:
    table: RecentSources[str] = RecentSources(SourceLimits(max_sources=2, idle_ms=1_000_000))
    for t, source in enumerate(["a", "b", "c"]):
        table.touch(source, now_ms=t, make=lambda s=source: s.upper())
    table.touch("a", now_ms=3, make=lambda: "new")  # seen again: now the most recent
    assert table.get("a") == "A"  # touching a held source keeps its value
    assert table.forget(now_ms=3) == [("b", "B")]
    assert list(table) == ["c", "a"]


def test_touch_never_forgets_so_a_batch_can_read_all_its_sources() -> None:
    table: RecentSources[int] = RecentSources(SourceLimits(max_sources=2, idle_ms=10))
    for source in ("a", "b", "c", "d"):
        table.touch(source, now_ms=100, make=lambda: 1)
    assert len(table) == 4  # one batch's overshoot, until forget
    assert [s for s, _ in table.forget(now_ms=100)] == ["a", "b"]


def test_a_source_idle_for_the_idle_time_is_forgotten_and_one_seen_since_is_kept() -> None:
    table: RecentSources[int] = RecentSources(SourceLimits(max_sources=100, idle_ms=1_000))
    table.touch("quiet", now_ms=0, make=lambda: 1)
    table.touch("busy", now_ms=0, make=lambda: 2)
    table.touch("busy", now_ms=600, make=lambda: 2)
    assert table.forget(now_ms=999) == []
    assert table.forget(now_ms=1_000) == [("quiet", 1)]
    assert list(table) == ["busy"] and table.last_seen_ms("busy") == 600
    assert table.forget(now_ms=1_600) == [("busy", 2)]
    assert table.get("busy") is None and table.last_seen_ms("busy") is None


def test_admit_refuses_new_sources_at_the_limit_until_one_is_forgotten() -> None:
    table: RecentSources[int] = RecentSources(SourceLimits(max_sources=2, idle_ms=1_000))
    assert table.admit("a", now_ms=0, make=lambda: 1) == 1
    assert table.admit("b", now_ms=500, make=lambda: 2) == 2
    assert table.admit("c", now_ms=600, make=lambda: 3) is None
    assert "c" not in table and len(table) == 2
    assert table.admit("a", now_ms=700, make=lambda: 9) == 1  # a held source is always admitted
    assert table.forget(now_ms=1_500) == [("b", 2)]  # idle since 500
    assert table.admit("c", now_ms=1_500, make=lambda: 3) == 3


@pytest.mark.parametrize(("max_sources", "idle_ms"), [(0, 1.0), (1, 0.0), (1, -5.0)])
def test_limits_that_would_hold_nothing_are_refused(max_sources: int, idle_ms: float) -> None:
    with pytest.raises(ConfigError):
        SourceLimits(max_sources, idle_ms)
