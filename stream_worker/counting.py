"""Counts, camera-trap events and the drift signal: pure functions over labelled frames.

Time is always passed in (the frame's ``captured_at_ms``); nothing here reads a clock or
talks to Redis. The worker applies a partition-batch with ``sinks/counts.lua``, which computes
the same deltas inside Redis, gated on the partition's offset watermark in the same atomic
call, so a replayed batch changes nothing; ``stream-worker verify`` recomputes them here,
independently of Redis.

Frame counts
    Tumbling event-time windows: a frame captured at ``t`` belongs to the window starting at
    ``t - t % size``. Per window a frame counts once under its leaf label and once under each
    ancestor (``cat`` → ``cat``, ``mammal``, ``animal``); ``unknown`` counts only as
    ``unknown``; and once under :data:`FRAMES_FIELD`, so that "every frame counted once" is
    checkable (the labels themselves sum to more than the frames, because of the roll-up).

Camera-trap events (Camtrap DP event-level observations)
    For ``wildlife`` sources, frames of one source less than ``gap_ms`` apart form one
    sequence; each species (a leaf label under ``animal``) counts once per sequence, in the
    windows of the sequence's first frame. The state that must survive between batches is one
    small JSON-able dict per source (:class:`SequenceState`), so it can live in Redis next to
    the counts and be advanced by the same atomic call.

    Frames arrive in partition order and a source is keyed to one partition, so frames of one
    source are seen in the order they were produced; their ``captured_at`` may still run
    backwards (camera clocks, retransmissions). A frame within ``gap_ms`` of the current
    sequence's span, on either side, joins it and widens the span. A frame more than
    ``gap_ms`` *before* the span belongs to a sequence that has already been closed and whose
    state is gone: it is not counted as an event (counting it could count a species twice)
    and is reported in :attr:`EventUpdate.late_frames` instead. Its frame counts are kept.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

from stream_worker.errors import ConfigError
from stream_worker.frames import LabelScore, SourceKind
from stream_worker.sources import RecentSources, SourceLimits

UNKNOWN = "unknown"
ANIMAL = "animal"
FRAMES_FIELD = "_frames"
DEFAULT_PARENT_LABELS = frozenset({"vehicle", "animal", "mammal"})

WindowKey = tuple[str, str, int]  # (source_id, window name, window start in epoch ms)
Deltas = dict[WindowKey, dict[str, int]]

_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """A tumbling window: its name as configured (``1m``) and its length."""

    name: str = "1m"
    size_ms: int = 60_000

    @classmethod
    def parse(cls, text: str) -> WindowSpec:
        """Parse ``30s``, ``1m``, ``15m``, ``1h``, ``1d`` or ``500ms``; the text is kept as the name."""
        return cls(name=text.strip(), size_ms=parse_duration_ms(text))


def parse_duration_ms(text: str) -> int:
    """Milliseconds in a duration such as ``30s`` or ``15m``; raises ConfigError on anything else."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ConfigError(f"{text!r} is not a duration like 30s, 1m, 15m, 1h or 1d")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def window_start(ts_ms: int, size_ms: int) -> int:
    """Start of the tumbling window of length ``size_ms`` that contains ``ts_ms`` (epoch-aligned)."""
    return ts_ms - ts_ms % size_ms


@dataclass(frozen=True, slots=True)
class CountedFrame:
    """One classified frame's contribution to the counts."""

    offset: int
    source_id: str
    captured_at_ms: int
    labels: tuple[str, ...]
    event_labels: tuple[str, ...] | None
    event_scores: tuple[float, ...] = ()
    """The score of each of ``event_labels`` (for the camera-trap event records)."""


@dataclass(frozen=True, slots=True)
class SpeciesEvent:
    """A camera-trap event of one species: a sequence of a source's frames and what it showed.

    ``start_ms`` anchors the sequence (its first frame; the event id), ``first_ms`` and
    ``last_ms`` span it; ``closed`` once a later frame of the source started the next one.
    """

    source_id: str
    species: str
    start_ms: int
    first_ms: int
    last_ms: int
    frames: int
    species_frames: int
    best_score: float
    closed: bool
    key: str = ""

    @property
    def event_id(self) -> str:
        """Stable across replays: the same frames make the same id."""
        return f"{self.source_id}|{self.start_ms}|{self.species}"


@dataclass(frozen=True, slots=True)
class WindowCounts:
    """Absolute counts of one source in one window."""

    source_id: str
    window: str
    start_ms: int
    frames: int
    labels: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    key: str = ""


@dataclass(frozen=True, slots=True)
class Observation:
    """What counting needs of one labelled frame."""

    source_id: str
    source_kind: SourceKind
    captured_at_ms: int
    labels: tuple[LabelScore, ...]


def counted_labels(labels: Iterable[LabelScore]) -> frozenset[str]:
    """Every label a frame counts under: each label and each of its ancestors, once.

    ``path`` may or may not end with the label itself; both work. A frame with no label, or
    only ``unknown``, counts as ``unknown`` alone.
    """
    names: set[str] = set()
    for label in labels:
        if label.label == UNKNOWN:
            continue
        names.add(label.label)
        names.update(ancestor for ancestor in label.path if ancestor and ancestor != UNKNOWN)
    return frozenset(names) if names else frozenset({UNKNOWN})


def count_deltas(observations: Iterable[Observation], windows: Sequence[WindowSpec]) -> Deltas:
    """Per (source, window, window start): how much each label's count grows for these frames."""
    deltas: Deltas = {}
    for obs in observations:
        names = counted_labels(obs.labels)
        for window in windows:
            key = (obs.source_id, window.name, window_start(obs.captured_at_ms, window.size_ms))
            counts = deltas.setdefault(key, {})
            counts[FRAMES_FIELD] = counts.get(FRAMES_FIELD, 0) + 1
            for name in names:
                counts[name] = counts.get(name, 0) + 1
    return deltas


# --- camera-trap events -------------------------------------------------------------------


class SequenceState(TypedDict):
    """A source's open camera-trap sequence; JSON-able, a few dozen bytes.

    ``start_ms`` anchors the sequence's windows and never moves; ``lo_ms`` and ``hi_ms`` are
    the span of frame times seen so far; ``species`` are those already counted (sorted).
    """

    start_ms: int
    lo_ms: int
    hi_ms: int
    species: list[str]


@dataclass(frozen=True, slots=True)
class EventUpdate:
    """The result of :func:`event_updates`: new state per touched source and the event deltas."""

    state_by_source: dict[str, SequenceState]
    deltas: Deltas
    late_frames: dict[str, int] = field(default_factory=dict)


def species_of(
    labels: Iterable[LabelScore], parent_labels: frozenset[str] = DEFAULT_PARENT_LABELS
) -> set[str]:
    """Leaf labels under ``animal``: the species of a frame (a roll-up to ``mammal`` is none)."""
    return {
        label.label
        for label in labels
        if label.label not in parent_labels and label.label != UNKNOWN and ANIMAL in label.path
    }


def event_updates(
    state_by_source: Mapping[str, SequenceState],
    frames: Iterable[Observation],
    *,
    gap_ms: int,
    windows: Sequence[WindowSpec],
    parent_labels: frozenset[str] = DEFAULT_PARENT_LABELS,
) -> EventUpdate:
    """Advance camera-trap sequences over ``frames`` (in partition order); count new species.

    Only ``wildlife`` frames are considered. ``state_by_source`` is not modified; the result
    holds the new state of every source these frames touched (others are unchanged), and
    per (source, window, window start of the sequence) how many events each species adds.
    """
    if gap_ms <= 0:
        raise ConfigError(f"the camera-trap sequence gap must be positive, got {gap_ms} ms")
    states: dict[str, SequenceState] = {}
    deltas: Deltas = {}
    late: dict[str, int] = {}
    for obs in frames:
        if obs.source_kind is not SourceKind.WILDLIFE:
            continue
        source, ts = obs.source_id, obs.captured_at_ms
        current = states.get(source) or state_by_source.get(source)
        if current is not None and ts <= current["lo_ms"] - gap_ms:
            late[source] = late.get(source, 0) + 1
            continue
        if current is None or ts >= current["hi_ms"] + gap_ms:
            state = SequenceState(start_ms=ts, lo_ms=ts, hi_ms=ts, species=[])
        else:
            state = SequenceState(
                start_ms=current["start_ms"],
                lo_ms=min(current["lo_ms"], ts),
                hi_ms=max(current["hi_ms"], ts),
                species=list(current["species"]),
            )
        new_species = species_of(obs.labels, parent_labels).difference(state["species"])
        if new_species:
            state["species"] = sorted(new_species.union(state["species"]))
            for window in windows:
                key = (source, window.name, window_start(state["start_ms"], window.size_ms))
                counts = deltas.setdefault(key, {})
                for name in new_species:
                    counts[name] = counts.get(name, 0) + 1
        states[source] = state
    return EventUpdate(states, deltas, late)


# --- drift ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DriftSnapshot:
    """A source's recent frames: how many, the share under the confidence bar, the label mix."""

    frames: int
    low_confidence_share: float
    label_share: dict[str, float]


class _SourceDrift:
    """One source's sliding window: ``label id * 2 + is_low`` per frame, oldest first (small ints,
    not tuples: 8 bytes a frame), the label ids' counts and how many frames are low."""

    __slots__ = ("labels", "low", "recent")

    def __init__(self) -> None:
        self.recent: deque[int] = deque()
        self.labels: dict[int, int] = {}
        self.low = 0


class DriftTracker:
    """Per source, the last ``window`` frames' low-confidence share and label mix.

    A camera knocked out of alignment shows as a jump in the low-confidence share and a
    label mix that no longer looks like its past. Each update is O(1). Sources are held in a
    :class:`~stream_worker.sources.RecentSources`: the caller calls :meth:`forget` after each
    batch, and a source idle or least recently seen beyond the limits starts a fresh window
    when it comes back.
    """

    def __init__(self, window: int, low_confidence: float, *, limits: SourceLimits) -> None:
        if window < 1:
            raise ConfigError(f"the drift window must hold at least one frame, got {window}")
        self.window = window
        self.low_confidence = low_confidence
        self._sources: RecentSources[_SourceDrift] = RecentSources(limits)
        # Labels come from the taxonomy, a few dozen names: one id each, shared by all sources.
        self._label_ids: dict[str, int] = {}
        self._label_names: list[str] = []

    def __len__(self) -> int:
        return len(self._sources)

    def observe(self, source_id: str, label: str, best_score: float, *, now_ms: float) -> None:
        """Record one frame's top label and best score, seen at ``now_ms`` (a monotonic clock)."""
        state = self._sources.touch(source_id, now_ms, _SourceDrift)
        label_id = self._label_ids.get(label)
        if label_id is None:
            label_id = self._label_ids[label] = len(self._label_names)
            self._label_names.append(label)
        if len(state.recent) == self.window:
            old = state.recent.popleft()
            left = state.labels[old >> 1] - 1
            if left:
                state.labels[old >> 1] = left
            else:
                del state.labels[old >> 1]
            state.low -= old & 1
        is_low = int(best_score < self.low_confidence)
        state.recent.append(label_id << 1 | is_low)
        state.labels[label_id] = state.labels.get(label_id, 0) + 1
        state.low += is_low

    def snapshot(self, source_id: str) -> DriftSnapshot:
        """The source's current window (zero frames when it is not held)."""
        state = self._sources.get(source_id)
        if state is None or not state.recent:
            return DriftSnapshot(0, 0.0, {})
        n, names = len(state.recent), self._label_names
        shares = {names[i]: count / n for i, count in state.labels.items()}
        return DriftSnapshot(n, state.low / n, dict(sorted(shares.items())))

    def forget(self, now_ms: float) -> list[str]:
        """Forget sources idle or beyond the limit (the rule in ``stream_worker.sources``)."""
        return [source for source, _ in self._sources.forget(now_ms)]


def merge(a: WindowCounts, b: WindowCounts) -> WindowCounts:
    """Sum two partial counts of the same source and window (a source spread over partitions)."""
    labels = dict(a.labels)
    for k, v in b.labels.items():
        labels[k] = labels.get(k, 0) + v
    events = dict(a.events)
    for k, v in b.events.items():
        events[k] = events.get(k, 0) + v
    return WindowCounts(a.source_id, a.window, a.start_ms, a.frames + b.frames, labels, events, a.key)
