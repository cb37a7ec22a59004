"""Windows, hierarchical counts, camera-trap events and drift (stream_worker.counting)."""

from __future__ import annotations

import json

import pytest

from stream_worker.counting import (
    FRAMES_FIELD,
    Deltas,
    DriftSnapshot,
    DriftTracker,
    Observation,
    SequenceState,
    WindowSpec,
    count_deltas,
    counted_labels,
    event_updates,
    parse_duration_ms,
    window_start,
)
from stream_worker.errors import ConfigError
from stream_worker.frames import LabelScore, SourceKind
from stream_worker.sources import SourceLimits

MINUTE = WindowSpec("1m", 60_000)
QUARTER = WindowSpec("15m", 900_000)
LIMITS = SourceLimits(max_sources=100, idle_ms=60_000)
QUARTER_START = 1_700_000_100_000  # a multiple of 15 minutes since the epoch
T0 = QUARTER_START + 60_000  # a whole minute, one minute into that quarter hour

CAR = LabelScore("car", 0.9, ("vehicle", "car"))
TRUCK = LabelScore("truck", 0.6, ("vehicle",))  # a path without the leaf itself works too
CAT = LabelScore("cat", 0.8, ("animal", "mammal", "cat"))
DEER = LabelScore("deer", 0.7, ("animal", "mammal", "deer"))
FOX = LabelScore("fox", 0.7, ("animal", "mammal", "fox"))
BIRD = LabelScore("bird", 0.9, ("animal", "bird"))
MAMMAL = LabelScore("mammal", 0.4, ("animal", "mammal"))  # rolled up: not a species
UNKNOWN = LabelScore("unknown", 0.1, ())


def obs(
    ts: int, *labels: LabelScore, source: str = "cam-1", kind: SourceKind = SourceKind.WILDLIFE
) -> Observation:
    return Observation(source, kind, ts, labels)


# --- windows --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("30s", 30_000),
        ("1m", 60_000),
        ("15m", 900_000),
        ("1h", 3_600_000),
        ("1d", 86_400_000),
        ("250ms", 250),
        (" 2h ", 7_200_000),
    ],
)
def test_durations_parse(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms
    assert WindowSpec.parse(text) == WindowSpec(text.strip(), ms)


@pytest.mark.parametrize("text", ["", "1", "m", "0m", "1.5m", "-1m", "1 m", "1w", "1M"])
def test_bad_durations_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration_ms(text)


def test_window_start_is_epoch_aligned_and_half_open() -> None:
    assert window_start(T0, 60_000) == T0
    assert window_start(T0 + 59_999, 60_000) == T0
    assert window_start(T0 + 60_000, 60_000) == T0 + 60_000
    assert window_start(T0 + 1, 900_000) == QUARTER_START
    assert window_start(-1, 60_000) == -60_000  # before 1970 still floors, never rounds to 0


# --- frame counts ------------------------------------------------------------------------------


def test_counted_labels_roll_up_to_every_ancestor_once() -> None:
    assert counted_labels([CAT]) == {"cat", "mammal", "animal"}
    assert counted_labels([CAR, TRUCK]) == {"car", "truck", "vehicle"}  # multi-label: vehicle once
    assert counted_labels([MAMMAL]) == {"mammal", "animal"}
    assert counted_labels([UNKNOWN]) == {"unknown"}
    assert counted_labels([]) == {"unknown"}


def test_count_deltas_per_source_window_and_label() -> None:
    frames = [
        obs(T0 + 1_000, CAR, kind=SourceKind.TRAFFIC),
        obs(T0 + 2_000, CAR, kind=SourceKind.TRAFFIC),
        obs(T0 + 61_000, CAT, kind=SourceKind.TRAFFIC),
        obs(T0 + 3_000, UNKNOWN, source="cam-2", kind=SourceKind.TRAFFIC),
    ]
    deltas = count_deltas(frames, [MINUTE, QUARTER])
    assert deltas == {
        ("cam-1", "1m", T0): {FRAMES_FIELD: 2, "car": 2, "vehicle": 2},
        ("cam-1", "1m", T0 + 60_000): {FRAMES_FIELD: 1, "cat": 1, "mammal": 1, "animal": 1},
        ("cam-1", "15m", QUARTER_START): {
            FRAMES_FIELD: 3,
            "car": 2,
            "vehicle": 2,
            "cat": 1,
            "mammal": 1,
            "animal": 1,
        },
        ("cam-2", "1m", T0): {FRAMES_FIELD: 1, "unknown": 1},
        ("cam-2", "15m", QUARTER_START): {FRAMES_FIELD: 1, "unknown": 1},
    }


def test_frames_field_sums_to_the_number_of_frames_in_every_window_spec() -> None:
    frames = [obs(T0 + i * 7_919, [CAR, CAT, UNKNOWN, MAMMAL][i % 4]) for i in range(200)]
    deltas = count_deltas(frames, [MINUTE, QUARTER])
    for spec in (MINUTE, QUARTER):
        assert sum(c[FRAMES_FIELD] for (_, name, _), c in deltas.items() if name == spec.name) == 200


# --- camera-trap events ------------------------------------------------------------------------

GAP = 30_000


def events(state: dict[str, SequenceState], *frames: Observation) -> tuple[dict[str, SequenceState], Deltas]:
    update = event_updates(state, frames, gap_ms=GAP, windows=[MINUTE])
    return {**state, **update.state_by_source}, update.deltas


def test_each_species_counts_once_per_sequence() -> None:
    _, deltas = events(
        {}, obs(T0, DEER), obs(T0 + 5_000, DEER), obs(T0 + 10_000, DEER, FOX), obs(T0 + 12_000, DEER)
    )
    assert deltas == {("cam-1", "1m", T0): {"deer": 1, "fox": 1}}


def test_a_gap_of_at_least_gap_ms_starts_a_new_sequence() -> None:
    _, deltas = events({}, obs(T0, DEER), obs(T0 + GAP - 1, DEER), obs(T0 + 2 * GAP - 1, DEER))
    assert deltas == {("cam-1", "1m", T0): {"deer": 2}}


def test_event_is_counted_in_the_window_of_the_sequence_start() -> None:
    # One sequence from 50 s to 1 min 10 s: the fox seen after the minute boundary still
    # belongs to the event that started in the first minute.
    _, deltas = events({}, obs(T0 + 50_000, DEER), obs(T0 + 70_000, FOX))
    assert deltas == {("cam-1", "1m", T0): {"deer": 1, "fox": 1}}


def test_sequences_continue_across_batch_boundaries_through_json_state() -> None:
    first_state, first = events({}, obs(T0, DEER), obs(T0 + 10_000, DEER))
    # The state is stored as JSON (in Redis) between batches.
    restored = json.loads(json.dumps(first_state))
    second_state, second = events(restored, obs(T0 + 20_000, DEER, FOX), obs(T0 + 60_000, DEER))
    assert first == {("cam-1", "1m", T0): {"deer": 1}}
    assert second == {("cam-1", "1m", T0): {"fox": 1}, ("cam-1", "1m", T0 + 60_000): {"deer": 1}}
    assert second_state["cam-1"] == {
        "start_ms": T0 + 60_000,
        "lo_ms": T0 + 60_000,
        "hi_ms": T0 + 60_000,
        "species": ["deer"],
    }


def test_batching_does_not_change_the_event_counts() -> None:
    frames = [
        obs(T0 + ts, label)
        for ts, label in [
            (0, DEER),
            (9_000, FOX),
            (50_000, DEER),
            (61_000, BIRD),
            (100_000, BIRD),
            (101_000, DEER),
            (200_000, FOX),
        ]
    ]
    _, whole = events({}, *frames)
    state: dict[str, SequenceState] = {}
    total: Deltas = {}
    for frame in frames:
        state, deltas = events(state, frame)
        for key, counts in deltas.items():
            for name, n in counts.items():
                total.setdefault(key, {}).setdefault(name, 0)
                total[key][name] += n
    assert total == whole


def test_rolled_up_unknown_and_non_animal_labels_are_not_species() -> None:
    _, deltas = events(
        {}, obs(T0, MAMMAL), obs(T0 + 1_000, UNKNOWN), obs(T0 + 2_000, CAR), obs(T0 + 3_000, BIRD)
    )
    assert deltas == {("cam-1", "1m", T0): {"bird": 1}}


def test_only_wildlife_sources_have_events() -> None:
    update = event_updates({}, [obs(T0, DEER, kind=SourceKind.TRAFFIC)], gap_ms=GAP, windows=[MINUTE])
    assert update.deltas == {} and update.state_by_source == {}


def test_sources_have_independent_sequences() -> None:
    _, deltas = events(
        {}, obs(T0, DEER, source="a"), obs(T0 + 1_000, DEER, source="b"), obs(T0 + 2_000, DEER, source="a")
    )
    assert deltas == {("a", "1m", T0): {"deer": 1}, ("b", "1m", T0): {"deer": 1}}


def test_slightly_out_of_order_frame_joins_the_open_sequence() -> None:
    state, deltas = events({}, obs(T0 + 10_000, DEER), obs(T0 + 2_000, DEER, FOX))
    assert deltas == {("cam-1", "1m", T0): {"deer": 1, "fox": 1}}
    assert (state["cam-1"]["lo_ms"], state["cam-1"]["hi_ms"]) == (T0 + 2_000, T0 + 10_000)


def test_frame_from_a_closed_sequence_is_late_and_not_counted_again() -> None:
    state, _ = events({}, obs(T0, DEER), obs(T0 + 100_000, DEER))
    update = event_updates(state, [obs(T0 + 1_000, DEER, FOX)], gap_ms=GAP, windows=[MINUTE])
    assert update.deltas == {}
    assert update.late_frames == {"cam-1": 1}
    assert update.state_by_source == {}


def test_input_state_is_not_modified() -> None:
    state: dict[str, SequenceState] = {
        "cam-1": {"start_ms": T0, "lo_ms": T0, "hi_ms": T0, "species": ["deer"]}
    }
    snapshot = json.dumps(state)
    event_updates(state, [obs(T0 + 1_000, FOX)], gap_ms=GAP, windows=[MINUTE])
    assert json.dumps(state) == snapshot


def test_gap_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        event_updates({}, [], gap_ms=0, windows=[MINUTE])


# --- drift ------------------------------------------------------------------------------------


def test_drift_tracks_the_last_n_frames_per_source() -> None:
    tracker = DriftTracker(window=4, low_confidence=0.5, limits=LIMITS)
    for label, score in [("car", 0.9), ("car", 0.8), ("bus", 0.3), ("car", 0.9)]:
        tracker.observe("cam-1", label, score, now_ms=0)
    tracker.observe("cam-2", "deer", 0.2, now_ms=0)
    assert tracker.snapshot("cam-1").low_confidence_share == 0.25
    assert tracker.snapshot("cam-1").label_share == {"bus": 0.25, "car": 0.75}
    # The camera is knocked askew: everything after is unknown and low-confidence.
    for _ in range(3):
        tracker.observe("cam-1", "unknown", 0.1, now_ms=0)
    snapshot = tracker.snapshot("cam-1")
    assert snapshot.frames == 4
    assert snapshot.low_confidence_share == 0.75
    assert snapshot.label_share == {"car": 0.25, "unknown": 0.75}
    assert tracker.snapshot("cam-2").low_confidence_share == 1.0


def test_drift_of_an_unseen_source_is_empty() -> None:
    assert DriftTracker(500, 0.5, limits=LIMITS).snapshot("nobody").frames == 0


def test_drift_window_must_hold_a_frame() -> None:
    with pytest.raises(ConfigError):
        DriftTracker(window=0, low_confidence=0.5, limits=LIMITS)


def test_drift_holds_at_most_the_limit_of_sources_and_forgets_idle_ones() -> None:
    tracker = DriftTracker(500, 0.5, limits=SourceLimits(max_sources=50, idle_ms=60_000))
    for i in range(5_000):
        tracker.observe(f"cam-{i}", "car", 0.9, now_ms=i)
        tracker.forget(now_ms=i)
        assert len(tracker) <= 50
    assert tracker.snapshot("cam-0").frames == 0  # the least recently seen went first
    assert tracker.snapshot("cam-4999").frames == 1
    assert len(tracker.forget(now_ms=4_999 + 60_000)) == 50  # a minute later, all idle
    assert len(tracker) == 0


def test_a_forgotten_source_that_comes_back_starts_a_fresh_window() -> None:
    tracker = DriftTracker(4, 0.5, limits=SourceLimits(max_sources=10, idle_ms=1_000))
    for _ in range(4):
        tracker.observe("cam-1", "unknown", 0.1, now_ms=0)
    assert tracker.forget(now_ms=1_000) == ["cam-1"]
    tracker.observe("cam-1", "car", 0.9, now_ms=1_000)
    assert tracker.snapshot("cam-1") == DriftSnapshot(1, 0.0, {"car": 1.0})
