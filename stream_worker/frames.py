"""The values that flow through the pipeline: frozen, slotted, free of I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class SourceKind(StrEnum):
    """What a feed watches; decides which counts are kept for it."""

    TRAFFIC = "traffic"
    WILDLIFE = "wildlife"
    FLEET = "fleet"


@dataclass(frozen=True, slots=True)
class Frame:
    """One encoded image as it arrived from Kafka, with its parsed headers."""

    topic: str
    partition: int
    offset: int
    source_id: str
    source_kind: SourceKind
    frame_id: str
    captured_at_ms: int
    content_type: str
    data: bytes
    site: str | None = None
    lat: float | None = None
    lon: float | None = None
    headers: tuple[tuple[str, bytes], ...] = field(default=())
    key: bytes | None = None
    """The record's own key, kept so a dead letter carries it unchanged."""


@dataclass(frozen=True, slots=True)
class LabelScore:
    """A domain label with its score and its path from the root of the taxonomy."""

    label: str
    score: float
    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClassScore:
    """One raw model class (an ImageNet class) and its probability."""

    index: int
    name: str
    score: float


@dataclass(frozen=True, slots=True)
class FrameLabels:
    """What the taxonomy says about one frame's probabilities."""

    labels: tuple[LabelScore, ...]
    top_k: tuple[ClassScore, ...]
    best_score: float


@dataclass(frozen=True, slots=True)
class Prediction:
    """A classified frame, ready for the sinks."""

    frame: Frame
    result: FrameLabels
    processed_at_ms: int
    latency_ms: float
