"""One frozen settings tree, loaded once: defaults < YAML file < environment < flags.

Every option is declared once, with its type, env name, default, help text and the rule its
value must follow; the CLI builds its flags from these declarations, so ``--help`` always shows
the env fallback. Nothing else in lookout reads ``os.environ``. Secrets are read from files
(``*_file`` options) and are redacted whenever settings are printed.

Loading remembers where each value came from (:class:`Origin`: a flag, an environment
variable, a key of the YAML file, or the default) and checks the whole tree in one pass before
anything connects: each message names the setting as the user gave it and the form it must
take, and every mistake of one command line is reported at once, on one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import string
import textwrap
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml

from stream_worker.backends.cache import default_cache_dir
from stream_worker.calibration import Calibration
from stream_worker.counting import WindowSpec, parse_duration_ms
from stream_worker.errors import ConfigError
from stream_worker.sources import SourceLimits

REDACTED = "***"
HEADERS_ROOM_BYTES = 1_048_576
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
FAULT_STAGES = ("inference", "labels", "counts", "commit")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
"""The mechanisms a user name and a password file can log in with (aiokafka's others need more)."""
ENGINE_PRECISIONS = ("auto", "fp32", "int8")
"""``--precision``: the default engine's precision, or ``auto`` (stream_worker.backends.precision)."""
TEST_ONLY_SECTIONS = frozenset({"faults"})
"""Sections no operator sets: left out of ``--help`` and of ``stream-worker config``."""


@dataclass(frozen=True, slots=True)
class Rule:
    """What one option's value must be: the words for it and the test of it.

    ``problem(value)`` is None for a good value, else a detail for the message ("" when the
    words of ``expected`` say it all). The words also describe a value that cannot be read
    at all, so they name the type: "a whole number, 1 or more".
    """

    expected: str
    problem: Callable[[Any], str | None]


def _at_least(low: float, what: str = "a whole number") -> Rule:
    return Rule(f"{what}, {low:g} or more", lambda v: None if v >= low else "")


def _above(low: float, what: str = "a number") -> Rule:
    return Rule(f"{what} above {low:g}", lambda v: None if v > low else "")


def _between(low: float, high: float, what: str = "a number") -> Rule:
    return Rule(f"{what} from {low:g} to {high:g}", lambda v: None if low <= v <= high else "")


def _one_of(*choices: str, fold_case: bool = False) -> Rule:
    def problem(value: str) -> str | None:
        return None if (value.upper() if fold_case else value) in choices else ""

    return Rule(f"one of {', '.join(choices)}", problem)


def _topic_problem(name: str) -> str | None:
    return None if _TOPIC_NAME.fullmatch(name) and name not in (".", "..") else ""


def _topics_problem(names: list[str]) -> str | None:
    bad = [name for name in names if _topic_problem(name) is not None]
    return f"{bad[0]!r} is not a topic name" if bad else None


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as exc:
        return str(exc)
    return None


def _durations_problem(windows: list[str]) -> str | None:
    for window in windows:
        try:
            parse_duration_ms(window)
        except ConfigError:
            return f"{window!r} is not a duration"
    repeated = [w for i, w in enumerate(windows) if w in windows[:i]]
    return f"{repeated[0]!r} is given twice" if repeated else None


def _bootstrap_problem(bootstrap: str) -> str | None:
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f"{item.strip()!r} is not host:port"
    return None


def _redis_url_problem(url: str) -> str | None:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return ""
    if url_has_password(url):
        return (
            "lookout reads secrets only from files: put the password in a file and pass "
            "--redis-password-file / REDIS_PASSWORD_FILE, and the user as --redis-username"
        )
    return None


def _dead_letter_problem(template: str) -> str | None:
    """``--dlq-topic`` may name ``{topic}`` and nothing else in braces, and must give a topic name."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        example = template.format(topic="frames")
    except (ValueError, KeyError, IndexError):
        return ""
    if any(name != "topic" for name in fields) or _topic_problem(example) is not None:
        return ""
    return None


def _fault_problem(value: str) -> str | None:
    if not value:
        return None
    stage, _, nth = value.partition(":")
    return None if stage in FAULT_STAGES and nth.isdigit() and int(nth) >= 1 else ""


def _scores_problem(thresholds: dict[str, float]) -> str | None:
    bad = [label for label, score in thresholds.items() if not 0.0 <= score <= 1.0]
    return f"{bad[0]}={thresholds[bad[0]]:g} is out of range" if bad else None


SHARE = _between(0, 1)
PORT = _between(0, 65535, "a whole number")
TOPIC = Rule("a topic name (letters, digits, '.', '_' and '-', at most 249)", _topic_problem)
LABEL_THRESHOLDS_FORMAT = "label=score pairs, comma separated, scores from 0 to 1 (e.g. car=0.5,person=0.4)"


def opt(
    default: Any,
    env: str,
    doc: str,
    *,
    secret: bool = False,
    flag: bool = True,
    rule: Rule | None = None,
) -> Any:
    """Declare one option: its default, env variable, help text, whether it is secret, whether it
    has a flag (``flag=False``: environment and settings file only), and the rule of its value."""
    meta = {"env": env, "doc": doc, "secret": secret, "flag": flag, "rule": rule}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """How to reach the Kafka cluster."""

    bootstrap: str = opt(
        "127.0.0.1:9092",
        "KAFKA_BOOTSTRAP",
        "Kafka bootstrap servers, host:port[,host:port]",
        rule=Rule("host:port, or several comma separated", _bootstrap_problem),
    )
    security_protocol: str = opt(
        "PLAINTEXT",
        "KAFKA_SECURITY_PROTOCOL",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        rule=_one_of(*SECURITY_PROTOCOLS),
    )
    sasl_mechanism: str = opt(
        "SCRAM-SHA-512",
        "KAFKA_SASL_MECHANISM",
        "SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
        rule=_one_of(*SASL_MECHANISMS),
    )
    sasl_username: str = opt("", "KAFKA_SASL_USERNAME", "SASL user name")
    sasl_password_file: str = opt(
        "", "KAFKA_SASL_PASSWORD_FILE", "file holding the SASL password (never pass it inline)"
    )
    ssl_cafile: str = opt("", "KAFKA_SSL_CAFILE", "CA bundle that signed the brokers' certificates")
    ssl_certfile: str = opt("", "KAFKA_SSL_CERTFILE", "client certificate (mutual TLS)")
    ssl_keyfile: str = opt("", "KAFKA_SSL_KEYFILE", "client private key (mutual TLS)")
    client_id: str = opt("lookout", "LOOKOUT_CLIENT_ID", "Kafka client.id prefix")
    session_timeout_ms: int = opt(
        30000,
        "LOOKOUT_SESSION_TIMEOUT_MS",
        "consumer group session timeout",
        flag=False,
        rule=_above(1000, "a whole number of milliseconds"),
    )
    max_poll_interval_ms: int = opt(
        300000,
        "LOOKOUT_MAX_POLL_INTERVAL_MS",
        "consumer max.poll.interval.ms",
        flag=False,
        rule=_at_least(1, "a whole number of milliseconds"),
    )
    metadata_max_age_ms: int = opt(
        300000,
        "LOOKOUT_METADATA_MAX_AGE_MS",
        "how often topic metadata is refreshed: how soon a new topic matching --frames-pattern is read",
        flag=False,
        rule=_at_least(100, "a whole number of milliseconds"),
    )
    # Small fetches are cheaper per frame: aiokafka copies each fetch response twice in the event
    # loop (asyncio's StreamReader), and copies of tens of MB miss every cache and fault in fresh
    # pages. 26 MB / 52 MB cost 2.0 event-loop CPU-ms per 720p frame, 1 MiB / 4 MiB 1.0
    # (docs/BENCHMARKS.md). A record larger than either still comes, in a response of its own.
    max_partition_fetch_bytes: int = opt(
        1_048_576,
        "LOOKOUT_MAX_PARTITION_FETCH_BYTES",
        "consumer max.partition.fetch.bytes (a larger record still comes, alone)",
        flag=False,
        rule=_at_least(1024, "a whole number of bytes"),
    )
    fetch_max_bytes: int = opt(
        4_194_304,
        "LOOKOUT_FETCH_MAX_BYTES",
        "consumer fetch.max.bytes: the most one fetch response holds",
        flag=False,
        rule=_at_least(1024, "a whole number of bytes"),
    )


@dataclass(frozen=True, slots=True)
class TopicSettings:
    """Which topics the worker reads and writes."""

    frames_topic: list[str] = opt(
        ["frames"],
        "LOOKOUT_FRAMES_TOPIC",
        "frames topic(s), comma separated",
        rule=Rule("topic names, comma separated", _topics_problem),
    )
    frames_pattern: str = opt(
        "",
        "LOOKOUT_FRAMES_PATTERN",
        "regex of frames topics (instead of --frames-topic)",
        rule=Rule("a regular expression", _regex_problem),
    )
    labels_topic: str = opt("labels", "LOOKOUT_LABELS_TOPIC", "per-frame label records", rule=TOPIC)
    counts_topic: str = opt(
        "counts", "LOOKOUT_COUNTS_TOPIC", "compacted topic of absolute window counts", rule=TOPIC
    )
    dlq_topic: str = opt(
        "{topic}.dlq",
        "LOOKOUT_DLQ_TOPIC",
        "dead-letter topic; {topic} is the frame's topic",
        rule=Rule(
            "a topic name in which {topic} (the frame's topic) is the only field in braces, e.g. {topic}.dlq",
            _dead_letter_problem,
        ),
    )
    review_topic: str = opt(
        "review", "LOOKOUT_REVIEW_TOPIC", "low-confidence frames sampled for review", rule=TOPIC
    )
    group: str = opt(
        "lookout",
        "LOOKOUT_GROUP",
        "consumer group id",
        rule=Rule("a consumer group id (not empty)", lambda v: None if v.strip() else ""),
    )
    events_topic: str = opt(
        "events",
        "LOOKOUT_EVENTS_TOPIC",
        "compacted topic of camera-trap events, one record per event and species",
        rule=TOPIC,
    )
    topic_replication: int = opt(
        1,
        "LOOKOUT_TOPIC_REPLICATION",
        "replication factor of output topics the worker creates (use 3 in production)",
        rule=_at_least(1),
    )

    @classmethod
    def named_after(cls, frames_topic: str, **overrides: Any) -> TopicSettings:
        """Topics of one isolated pipeline: ``T`` in; ``T.labels``, ``.counts``, ``.review``, ``.events`` out.

        The one naming convention for per-run topics (tests, benchmarks, the demo), so that a
        harness never spells the suffixes itself.
        """
        return cls(
            frames_topic=[frames_topic],
            labels_topic=f"{frames_topic}.labels",
            counts_topic=f"{frames_topic}.counts",
            review_topic=f"{frames_topic}.review",
            events_topic=f"{frames_topic}.events",
            **overrides,
        )

    def output_topics(self) -> list[str]:
        """Every topic the worker produces to: labels, counts, review, events, and the dead-letter topic
        of each named frames topic (a ``frames_pattern``'s are only known as frames arrive)."""
        topics = [self.labels_topic, self.counts_topic, self.review_topic, self.events_topic]
        if not self.frames_pattern:
            topics += [self.dlq_topic.format(topic=topic) for topic in self.frames_topic]
        return list(dict.fromkeys(topics))


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where the counts live."""

    redis_url: str = opt(
        "redis://127.0.0.1:6379/0",
        "REDIS_URL",
        "Redis URL (rediss:// for TLS)",
        rule=Rule("a redis://, rediss:// or unix:// URL without a password", _redis_url_problem),
    )
    redis_username: str = opt("", "REDIS_USERNAME", "Redis ACL user")
    redis_password_file: str = opt("", "REDIS_PASSWORD_FILE", "file holding the Redis ACL password")
    redis_ca_file: str = opt("", "REDIS_CA_FILE", "CA for rediss://")
    key_prefix: str = opt("lookout", "LOOKOUT_KEY_PREFIX", "prefix of every Redis key lookout writes")
    counts_ttl_s: int = opt(
        7 * 86400,
        "LOOKOUT_COUNTS_TTL_S",
        "time-to-live of window count keys in Redis",
        rule=_at_least(1, "a whole number of seconds"),
    )


def _default_cache_dir() -> str:
    """The cache this machine uses: ``LOOKOUT_CACHE_DIR`` as the process started with it, else
    ``~/.cache/lookout`` (what ``scripts/services`` reads too).

    The default itself follows the variable, like ``HOME``: settings loaded with ``env={}``
    (tools, tests) still build engines where this machine keeps them.
    """
    return os.environ.get("LOOKOUT_CACHE_DIR") or str(default_cache_dir())


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Which engine classifies the frames."""

    engine: str = opt("", "LOOKOUT_ENGINE", "engine file; empty = the default CPU engine, built on first use")
    precision: str = opt(
        "auto",
        "LOOKOUT_PRECISION",
        "precision of the default CPU engine: auto (int8 where this CPU runs it at 1.3x fp32's "
        "speed or more and it publishes fp32's label on 98 percent of held-out frames, else "
        "fp32; decided at start-up and cached), fp32 or int8. With --engine the file decides",
        rule=_one_of(*ENGINE_PRECISIONS),
    )
    cache_dir: str = opt(_default_cache_dir(), "LOOKOUT_CACHE_DIR", "where default engines are cached")
    inference_threads: int = opt(
        0,
        "LOOKOUT_INFERENCE_THREADS",
        "intra-op threads of each ONNX Runtime session (0 = auto: the cores shared equally "
        "among the sessions)",
        rule=_at_least(0),
    )
    inference_sessions: int = opt(
        0,
        "LOOKOUT_INFERENCE_SESSIONS",
        "ONNX Runtime sessions classifying consecutive batches side by side, one thread each "
        "(0 = auto: 2, or 1 on one core; TensorRT engines always get 1)",
        rule=_at_least(0),
    )


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """Micro-batching and back-pressure."""

    max_batch: int = opt(
        16, "LOOKOUT_MAX_BATCH", "largest inference batch (capped at the engine's profile)", rule=_at_least(1)
    )
    max_wait_ms: float = opt(
        25.0,
        "LOOKOUT_MAX_WAIT_MS",
        "longest a frame waits for its batch to fill",
        rule=_at_least(0, "a number of milliseconds"),
    )
    max_in_flight: int = opt(
        256,
        "LOOKOUT_MAX_IN_FLIGHT",
        "frames consumed but not yet committed; partitions pause above it",
        rule=_at_least(1),
    )
    max_in_flight_bytes: int = opt(
        256 * 1024 * 1024,
        "LOOKOUT_MAX_IN_FLIGHT_BYTES",
        "bytes of frames consumed but not yet committed; partitions pause above it",
        rule=_at_least(1, "a whole number of bytes"),
    )
    decode_threads: int = opt(
        2, "LOOKOUT_DECODE_THREADS", "threads decoding and preprocessing frames", rule=_at_least(1)
    )
    max_frame_bytes: int = opt(
        20_000_000,
        "LOOKOUT_MAX_FRAME_BYTES",
        "frames larger than this go to the dead-letter topic",
        rule=_at_least(1, "a whole number of bytes"),
    )
    max_pixels: int = opt(
        50_000_000, "LOOKOUT_MAX_PIXELS", "width x height cap, read from the image header", rule=_at_least(1)
    )
    max_clock_skew_s: float = opt(
        3600.0,
        "LOOKOUT_MAX_CLOCK_SKEW_S",
        "frames whose captured-at is further than this ahead of their record's timestamp go to the "
        "dead-letter topic (one future-dated frame would otherwise move every window)",
        rule=_above(0, "a number of seconds"),
    )

    @property
    def output_record_bytes(self) -> int:
        """The largest record the worker writes: a kept frame plus 1 MiB for its headers.

        Dead-letter and review topics are created with this ``max.message.bytes``, whatever the
        broker's default (about 1 MiB on a stock broker).
        """
        return self.max_frame_bytes + HEADERS_ROOM_BYTES


@dataclass(frozen=True, slots=True)
class LabelSettings:
    """How raw classes become domain labels."""

    label_mode: str = opt(
        "single",
        "LOOKOUT_LABEL_MODE",
        "single (best label, rolled up) or multi",
        rule=_one_of("single", "multi"),
    )
    rollup_threshold: float = opt(
        0.4,
        "LOOKOUT_ROLLUP_THRESHOLD",
        "a leaf under this score rolls up to its parent; unset, a calibrated engine's fitted one",
        rule=SHARE,
    )
    label_thresholds: dict[str, float] = opt(
        {},
        "LOOKOUT_LABEL_THRESHOLDS",
        "multi mode: per-label thresholds, label=score,... (e.g. car=0.5,person=0.4)",
        flag=False,
        rule=Rule(LABEL_THRESHOLDS_FORMAT, _scores_problem),
    )
    default_label_threshold: float = opt(
        0.3,
        "LOOKOUT_DEFAULT_LABEL_THRESHOLD",
        "multi mode: threshold of labels not listed",
        rule=SHARE,
    )
    top_k: int = opt(5, "LOOKOUT_TOP_K", "raw classes kept in each label record", rule=_at_least(0))


@dataclass(frozen=True, slots=True)
class CountSettings:
    """Windows, camera-trap sequences, review sampling and drift."""

    windows: list[str] = opt(
        ["1m", "15m"],
        "LOOKOUT_WINDOWS",
        "tumbling count windows, comma separated",
        rule=Rule("durations like 30s, 1m, 15m, 1h or 1d, comma separated", _durations_problem),
    )
    event_gap_s: float = opt(
        60.0,
        "LOOKOUT_EVENT_GAP_S",
        "wildlife frames closer than this form one camera-trap sequence",
        rule=_above(0, "a number of seconds"),
    )
    review_threshold: float = opt(
        0.3,
        "LOOKOUT_REVIEW_THRESHOLD",
        "frames whose best score is under this may go to review; unset, a calibrated engine's fitted one",
        rule=SHARE,
    )
    review_sample_rate: float = opt(
        0.0,
        "LOOKOUT_REVIEW_SAMPLE_RATE",
        "share (0..1) of low-confidence frames sent to review",
        rule=SHARE,
    )
    drift_window_frames: int = opt(
        500,
        "LOOKOUT_DRIFT_WINDOW_FRAMES",
        "frames per source in the drift signal's sliding window",
        rule=_at_least(1),
    )
    thumbnail_ttl_s: int = opt(
        300,
        "LOOKOUT_THUMBNAIL_TTL_S",
        "life of each source's latest-frame thumbnail in Redis",
        rule=_at_least(1, "a whole number of seconds"),
    )
    thumbnail_rate: float = opt(
        20.0,
        "LOOKOUT_THUMBNAIL_RATE",
        "live-view thumbnails made a second at most, all sources together (each source's at "
        "most once a second, the stalest first; each is a reduced decode and a JPEG encode on "
        "the decode pool); 0 turns thumbnails off",
        rule=_at_least(0, "a number"),
    )
    max_tracked_sources: int = opt(
        10_000,
        "LOOKOUT_MAX_TRACKED_SOURCES",
        "sources whose drift window and thumbnail clock are held in memory; the least recently "
        "seen beyond it are forgotten",
        rule=_at_least(1),
    )
    source_idle_s: float = opt(
        86_400.0,
        "LOOKOUT_SOURCE_IDLE_S",
        "a source not seen for this long is forgotten: its drift window and its /metrics series",
        rule=_above(0, "a number of seconds"),
    )

    @property
    def source_limits(self) -> SourceLimits:
        """The limits of the worker's in-memory per-source state (drift, thumbnail clock)."""
        return SourceLimits(self.max_tracked_sources, self.source_idle_s * 1000)

    @property
    def window_specs(self) -> tuple[WindowSpec, ...]:
        """The configured windows, parsed (``1m`` -> 60,000 ms); the one place they are parsed."""
        return tuple(WindowSpec.parse(w) for w in self.windows)

    @property
    def event_gap_ms(self) -> int:
        """The camera-trap sequence gap in milliseconds."""
        return int(self.event_gap_s * 1000)


@dataclass(frozen=True, slots=True)
class OpsSettings:
    """Observability and lifecycle."""

    metrics_port: int = opt(
        9400, "LOOKOUT_METRICS_PORT", "port of /metrics, /healthz, /readyz (0 = off)", rule=PORT
    )
    metrics_host: str = opt("0.0.0.0", "LOOKOUT_METRICS_HOST", "address the metrics server binds")
    log_level: str = opt(
        "INFO",
        "LOOKOUT_LOG_LEVEL",
        "DEBUG, INFO, WARNING or ERROR",
        rule=_one_of(*LOG_LEVELS, fold_case=True),
    )
    log_format: str = opt("text", "LOOKOUT_LOG_FORMAT", "text or json", rule=_one_of("text", "json"))
    drain_deadline_s: float = opt(
        20.0,
        "LOOKOUT_DRAIN_DEADLINE_S",
        "on SIGTERM, finish in-flight batches within this",
        rule=_at_least(0, "a number of seconds"),
    )
    retry_max_s: float = opt(
        30.0,
        "LOOKOUT_RETRY_MAX_S",
        "longest backoff between retries of a failed sink write",
        rule=_above(0, "a number of seconds"),
    )
    trace_file: str = opt(
        "",
        "LOOKOUT_TRACE_FILE",
        "append one JSON line per batch with its stage timestamps, plus GC pauses and "
        "pause/resume, to this file (latency analysis: python -m bench.trace FILE); '' = off",
        flag=False,
    )
    max_metric_sources: int = opt(
        1_000,
        "LOOKOUT_MAX_METRIC_SOURCES",
        "sources with their own per-source /metrics series; the rest share the source label "
        "'_other' until a source idle for --source-idle-s makes room",
        rule=_at_least(1),
    )


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    """The live dashboard (``stream-worker dashboard``)."""

    port: int = opt(8080, "LOOKOUT_DASHBOARD_PORT", "port the dashboard listens on", rule=PORT)
    host: str = opt(
        "127.0.0.1", "LOOKOUT_DASHBOARD_HOST", "address to bind; beyond loopback a --token-file is required"
    )
    token_file: str = opt(
        "",
        "LOOKOUT_DASHBOARD_TOKEN_FILE",
        "file holding the login token (bearer token or basic-auth password)",
    )


@dataclass(frozen=True, slots=True)
class FaultSettings:
    """Fault injection for lookout's own fault tests (tests/faults); never set these in production."""

    fault_kill_at: str = opt(
        "",
        "LOOKOUT_FAULT_KILL_AT",
        "SIGKILL at STAGE:N (inference|labels|counts|commit)",
        flag=False,
        rule=Rule(
            f"STAGE:N, STAGE one of {', '.join(FAULT_STAGES)} and N a whole number, 1 or more",
            _fault_problem,
        ),
    )
    fault_infer_delay_ms: float = opt(
        0.0,
        "LOOKOUT_FAULT_INFER_DELAY_MS",
        "extra delay of every inference call",
        flag=False,
        rule=_at_least(0, "a number of milliseconds"),
    )


SECTIONS: dict[str, type[Any]] = {
    "kafka": KafkaSettings,
    "topics": TopicSettings,
    "redis": RedisSettings,
    "engine": EngineSettings,
    "batch": BatchSettings,
    "labels": LabelSettings,
    "counts": CountSettings,
    "ops": OpsSettings,
    "dashboard": DashboardSettings,
    "faults": FaultSettings,
}


OriginKind = Literal["flag", "env", "file", "engine", "default"]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where one option's value came from, and the name a message gives the setting there.

    ``name`` is the flag (``--windows``), the environment variable (``LOOKOUT_WINDOWS``), the key
    in the settings file (``counts.windows in /etc/lookout.yaml``), the engine whose calibration
    supplied it (:func:`with_engine_calibration`), or, for a default, the flag and variable that
    would set it. ``raw`` is the value as written there.
    """

    kind: OriginKind
    name: str
    raw: Any


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole tree; build it with :func:`load_settings`.

    ``origins`` maps ``section.option`` to where each value came from (every option
    :func:`load_settings` read; a tree built directly has none, and all is default).
    """

    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topics: TopicSettings = field(default_factory=TopicSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    labels: LabelSettings = field(default_factory=LabelSettings)
    counts: CountSettings = field(default_factory=CountSettings)
    ops: OpsSettings = field(default_factory=OpsSettings)
    dashboard: DashboardSettings = field(default_factory=DashboardSettings)
    faults: FaultSettings = field(default_factory=FaultSettings)
    origins: Mapping[str, Origin] = field(default_factory=dict, compare=False, repr=False)

    def origin(self, section: str, option: str) -> Origin:
        """Where ``section.option`` came from (a default when :func:`load_settings` did not read it)."""
        found = self.origins.get(f"{section}.{option}")
        if found is not None:
            return found
        return Origin("default", default_name(section, option), getattr(getattr(self, section), option))

    def where(self, section: str, option: str) -> str:
        """The name of ``section.option`` as the user gave it: flag, env variable or file key."""
        return self.origin(section, option).name


def _declared(section: str, option: str) -> dataclasses.Field[Any]:
    (found,) = (f for f in dataclasses.fields(SECTIONS[section]) if f.name == option)
    return found


def default_name(section: str, option: str) -> str:
    """How to name an option nobody set: its flag and env variable (the variable alone without a flag)."""
    meta = _declared(section, option).metadata
    return f"{flag_name(option)} / {meta['env']}" if meta["flag"] else str(meta["env"])


_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


def _convert(raw: Any, hint: Any) -> Any:
    """Coerce a raw value (string from env/flag, or YAML value) to the declared type.

    Raises ``ValueError`` or ``TypeError`` when it cannot; the caller says what was expected.
    """
    origin = getattr(hint, "__origin__", None)
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(raw)
    if hint is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(raw)
        return int(raw.strip() if isinstance(raw, str) else raw)
    if hint is float:
        if isinstance(raw, bool):
            raise ValueError(raw)
        number = float(raw)
        if not math.isfinite(number):
            raise ValueError(raw)
        return number
    if hint is str:
        if isinstance(raw, Mapping | list):
            raise TypeError(raw)
        return str(raw)
    if origin is list:
        items = raw if isinstance(raw, list) else str(raw).split(",")
        return [str(i).strip() for i in items if str(i).strip()]
    if origin is dict:
        pairs = raw.items() if isinstance(raw, Mapping) else _pairs(str(raw))
        converted = {str(k).strip(): _convert(v, float) for k, v in pairs}
        if any(not label for label in converted):
            raise ValueError(raw)
        return converted
    raise NotImplementedError(f"options of type {hint} cannot be read")  # a declaration to fix


def _pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        label, sep, score = item.partition("=")
        if not sep:
            raise ValueError(item)
        pairs.append((label, score))
    return pairs


def _options(section: type[Any]) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = get_type_hints(section)
    return [(f, hints[f.name]) for f in dataclasses.fields(section)]


def flag_name(option: str) -> str:
    """The CLI flag of an option: ``max_wait_ms`` -> ``--max-wait-ms``."""
    return "--" + option.replace("_", "-")


Uses = Mapping[str, Collection[str] | None]
"""The settings a command reads: section -> its options (None: every option of the section)."""


def _used(uses: Uses | None) -> list[tuple[str, dataclasses.Field[Any]]]:
    """(section, option) of every declared option ``uses`` selects, test-only sections left out."""
    selected = []
    for section_name, section in SECTIONS.items():
        if section_name in TEST_ONLY_SECTIONS or (uses is not None and section_name not in uses):
            continue
        wanted = None if uses is None else uses[section_name]
        selected += [
            (section_name, f) for f in dataclasses.fields(section) if wanted is None or f.name in wanted
        ]
    return selected


def _shown_default(f: dataclasses.Field[Any]) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
    if f.metadata["secret"]:
        return REDACTED
    if isinstance(default, list):
        return ",".join(default)
    if isinstance(default, dict):
        return ",".join(f"{k}={v}" for k, v in default.items()) or "none"
    return str(default)


def add_flags(
    parser: argparse.ArgumentParser, uses: Uses | None = None, *, accepts: Uses | None = None
) -> None:
    """Add one flag per declared option the command uses (``flag=True``), its env fallback in the help.

    ``uses`` selects the options (default: all). Options in ``accepts`` but not in ``uses`` take
    their flag without showing it in ``--help``: a command that accepts another command's line.
    """
    used = {(section, f.name) for section, f in _used(uses)}
    groups: dict[str, Any] = {}
    for section_name, f in _used(accepts if accepts is not None else uses):
        if not f.metadata["flag"]:
            continue
        shown = (section_name, f.name) in used
        if shown and section_name not in groups:
            groups[section_name] = parser.add_argument_group(section_name)
        target: Any = groups[section_name] if shown else parser
        target.add_argument(
            flag_name(f.name),
            dest=f.name,
            default=None,
            metavar=f.name.split("_")[-1].upper(),
            help=(
                f"{f.metadata['doc']} (env {f.metadata['env']}; default {_shown_default(f)})"
                if shown
                else argparse.SUPPRESS
            ),
        )


def env_only_help(uses: Uses | None = None, *, width: int = 79) -> str:
    """The ``--help`` epilog: settings the command uses that have no flag, by their env variable."""
    rows = [(str(f.metadata["env"]), f) for _, f in _used(uses) if not f.metadata["flag"]]
    if not rows:
        return ""
    lines = ["settings without a flag (environment variable, or the --config file):"]
    for env, f in rows:
        text = f"{f.metadata['doc']} (default {_shown_default(f)})"
        lines += textwrap.wrap(text, width, initial_indent=f"  {env}  ", subsequent_indent=" " * 6)
    return "\n".join(lines)


def load_settings(
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Build the settings tree: defaults < YAML file < environment < flags, then :func:`validate` it.

    ``env`` defaults to ``os.environ``; ``config_file`` defaults to ``$LOOKOUT_CONFIG`` when set.
    Unknown YAML keys are an error, not silently ignored. Every value that cannot be read or
    breaks its rule is reported in one ``ConfigError``, each naming where the value came from.
    """
    environ = os.environ if env is None else env
    flags = flags or {}
    path = config_file or environ.get("LOOKOUT_CONFIG") or None
    given_by = "--config" if config_file else "LOOKOUT_CONFIG"
    file_values = _read_settings_file(path, given_by) if path else {}

    built: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    problems: list[str] = []
    unreadable: set[str] = set()
    for section_name, section in SECTIONS.items():
        from_file = file_values.get(section_name)
        if from_file is None:
            from_file = {}
        if not isinstance(from_file, dict):
            problems.append(
                f"settings file {path}: section {section_name} must be a mapping of option: value"
            )
            from_file = {}
        known = {f.name for f in dataclasses.fields(section)}
        for key in sorted(set(from_file) - known):
            problems.append(
                f"settings file {path}: unknown key {key!r} in section {section_name}"
                + _did_you_mean(str(key), known)
            )
        values: dict[str, Any] = {}
        for f, hint in _options(section):
            key = f"{section_name}.{f.name}"
            if flags.get(f.name) is not None:
                origin = Origin("flag", flag_name(f.name), flags[f.name])
            elif f.metadata["env"] in environ:
                origin = Origin("env", f.metadata["env"], environ[f.metadata["env"]])
            elif f.name in from_file:
                origin = Origin("file", f"{key} in {path}", from_file[f.name])
            else:
                continue
            origins[key] = origin
            try:
                values[f.name] = _convert(origin.raw, hint)
            except (ValueError, TypeError):
                rule: Rule | None = f.metadata["rule"]
                expected = rule.expected if rule is not None else _TYPE_WORDS.get(hint, "a list")
                problems.append(_must_be(origin, expected))
                unreadable.add(key)
        built[section_name] = section(**values)
    settings = Settings(**built, origins=origins)
    _refuse(problems + problems_of(settings, skip=unreadable))
    return settings


def _read_settings_file(path: str | Path, given_by: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"settings file {path} does not exist: fix {given_by}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path} ({exc.strerror}): fix {given_by}") from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"settings file {path} is not valid YAML: {detail}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"settings file {path} must hold a mapping of sections ({', '.join(SECTIONS)})")
    unknown = sorted(str(s) for s in set(loaded) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"settings file {path}: unknown section(s) {unknown}{_did_you_mean(unknown[0], SECTIONS)}; "
            f"known: {', '.join(SECTIONS)}"
        )
    return loaded


def _did_you_mean(word: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _shown(raw: Any) -> str:
    """A value in a message: quoted as given, a URL's password hidden, always on one line."""
    if isinstance(raw, str) and "://" in raw:
        raw = redact_url(raw)
    return repr(raw)


def _must_be(origin: Origin, expected: str, detail: str = "") -> str:
    return f"{origin.name} must be {expected}, not {_shown(origin.raw)}" + (f" ({detail})" if detail else "")


def _refuse(problems: Sequence[str]) -> None:
    """One ``ConfigError`` for every problem found, on one line."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} settings are wrong: " + "; ".join(problems))


def validate(settings: Settings) -> None:
    """Reject settings that cannot work, with one line that says what to change (every problem)."""
    _refuse(problems_of(settings))


def problems_of(settings: Settings, *, skip: Collection[str] = ()) -> list[str]:
    """Everything wrong with ``settings``: each option against its rule, then the rules between them.

    ``skip`` lists ``section.option`` keys already reported (unreadable): they are neither
    checked again nor used to judge other options. Label thresholds are checked against the
    packaged taxonomy when no engine is named (a named engine's own taxonomy is only known from
    its sidecar: :func:`check_engine_labels`).
    """
    problems: list[str] = []
    bad = set(skip)
    for section_name, section in SECTIONS.items():
        values = getattr(settings, section_name)
        for f in dataclasses.fields(section):
            key = f"{section_name}.{f.name}"
            rule: Rule | None = f.metadata["rule"]
            if key in bad or rule is None:
                continue
            detail = rule.problem(getattr(values, f.name))
            if detail is not None:
                problems.append(_must_be(settings.origin(section_name, f.name), rule.expected, detail))
                bad.add(key)

    def ok(*keys: str) -> bool:
        return not bad.intersection(keys)

    where = settings.where
    b, k, t = settings.batch, settings.kafka, settings.topics
    if ok("batch.max_in_flight", "batch.max_batch") and b.max_in_flight < b.max_batch:
        problems.append(
            f"{where('batch', 'max_in_flight')} must be at least {where('batch', 'max_batch')} "
            f"({b.max_batch}), not {b.max_in_flight}"
        )
    if ok("batch.max_in_flight_bytes", "batch.max_frame_bytes") and b.max_in_flight_bytes < b.max_frame_bytes:
        problems.append(
            f"{where('batch', 'max_in_flight_bytes')} must be at least {where('batch', 'max_frame_bytes')} "
            f"({b.max_frame_bytes}), not {b.max_in_flight_bytes}: one frame of the largest allowed size "
            "must fit"
        )
    if ok("topics.frames_topic", "topics.frames_pattern") and not t.frames_topic and not t.frames_pattern:
        problems.append(
            f"{where('topics', 'frames_topic')} names no topic and {where('topics', 'frames_pattern')} "
            "is empty: give the frames topics (comma separated) or a pattern"
        )
    if ok(
        "topics.frames_topic",
        "topics.labels_topic",
        "topics.counts_topic",
        "topics.review_topic",
        "topics.events_topic",
        "topics.dlq_topic",
    ):
        outputs = [
            ("labels_topic", t.labels_topic),
            ("counts_topic", t.counts_topic),
            ("review_topic", t.review_topic),
            ("events_topic", t.events_topic),
        ]
        outputs += [("dlq_topic", t.dlq_topic.format(topic=topic)) for topic in t.frames_topic]
        for option, topic in outputs:
            if topic in t.frames_topic and not t.frames_pattern:
                problems.append(
                    f"{where('topics', option)} makes the worker write to its frames topic {topic!r}, "
                    "which it would then read again: give it a topic of its own"
                )
    if ok("kafka.security_protocol"):
        needed = []
        if k.security_protocol in ("SSL", "SASL_SSL"):
            needed.append(("ssl_cafile", "the CA bundle that signed the brokers' certificates"))
        if k.security_protocol.startswith("SASL"):
            needed += [
                ("sasl_username", "the SASL user"),
                ("sasl_password_file", "the file with its password"),
            ]
        missing = [f"{where('kafka', option)} ({what})" for option, what in needed if not getattr(k, option)]
        if missing:
            problems.append(
                f"{where('kafka', 'security_protocol')} is {k.security_protocol}, which needs "
                + (", ".join(missing[:-1]) + " and " if len(missing) > 1 else "")
                + missing[-1]
            )
    if ok("labels.label_thresholds") and settings.labels.label_thresholds and not settings.engine.engine:
        from stream_worker.taxonomy import declared_labels

        problems += _unknown_labels(settings, declared_labels(), "the packaged taxonomy")
    return problems


def _unknown_labels(settings: Settings, labels: Sequence[str], taxonomy: str) -> list[str]:
    where = settings.where("labels", "label_thresholds")
    problems = []
    for name in settings.labels.label_thresholds:
        if name not in labels:
            close = difflib.get_close_matches(name, labels, n=1)
            guess = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                f"{where} names {name!r}, which is no label of {taxonomy}: {guess}"
                f"its labels are {', '.join(labels)}"
            )
    return problems


def check_label_thresholds(settings: Settings, labels: Sequence[str], taxonomy: str) -> None:
    """Refuse label thresholds naming a label that ``taxonomy`` (with ``labels``) does not have."""
    _refuse(_unknown_labels(settings, labels, taxonomy))


def check_engine_labels(settings: Settings) -> None:
    """Check the label thresholds against the taxonomy of the named engine, from its sidecar.

    That engine may carry its own taxonomy (a model with its own labels), known only from the
    sidecar; this reads it without opening the engine, so a misspelt label is refused before
    anything connects. Nothing to do without thresholds or a named engine (:func:`validate` checks
    those against the packaged taxonomy), or when the engine file is not here (opening it says so).
    It imports the backends (and with them OpenCV): call it once the OpenCV environment is set.
    """
    engine = Path(settings.engine.engine) if settings.engine.engine else None
    if not settings.labels.label_thresholds or engine is None or not engine.is_file():
        return
    from stream_worker.backends.sidecar import read_sidecar
    from stream_worker.taxonomy import declared_labels

    sidecar = read_sidecar(engine)
    taxonomy = f"the taxonomy engine {engine} carries" if sidecar.taxonomy is not None else None
    check_label_thresholds(
        settings, declared_labels(sidecar.taxonomy), taxonomy or f"the packaged taxonomy engine {engine} uses"
    )


ENGINE_CALIBRATED = (("labels", "rollup_threshold"), ("counts", "review_threshold"))
"""The options an engine's calibration may supply when nobody set them."""


def with_engine_calibration(
    settings: Settings, calibration: Calibration, engine: str
) -> tuple[Settings, tuple[str, ...]]:
    """``settings`` with the engine's fitted thresholds where the user set none; and which those are.

    An option of :data:`ENGINE_CALIBRATED` whose value is the built-in default (no flag, no
    environment variable, no settings-file key) takes the value the engine's calibration carries,
    with an ``engine`` origin; a value the user set always wins. The returned names are the
    options taken from the engine, for the start-up log.
    """
    fitted = {"rollup_threshold": calibration.rollup_threshold}
    fitted["review_threshold"] = calibration.review_threshold
    origins = dict(settings.origins)
    changes: dict[str, dict[str, float]] = {}
    taken: list[str] = []
    for section, option in ENGINE_CALIBRATED:
        value = fitted[option]
        if value is None or settings.origin(section, option).kind != "default":
            continue
        changes.setdefault(section, {})[option] = value
        origins[f"{section}.{option}"] = Origin("engine", f"{option} fitted into engine {engine}", value)
        taken.append(option)
    if not taken:
        return settings, ()
    sections = {name: dataclasses.replace(getattr(settings, name), **kw) for name, kw in changes.items()}
    return dataclasses.replace(settings, **sections, origins=origins), tuple(taken)


def frame_topic_config(settings: Settings) -> dict[str, str]:
    """Topic config of an output topic that carries whole frames (dead letters, review samples)."""
    return {"max.message.bytes": str(settings.batch.output_record_bytes)}


def read_secret(path: str, what: str) -> str:
    """Read a secret from a file, stripped; a clear error when the file is unreadable."""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {what} from {path}: {exc.strerror}; check the mounted secret file"
        ) from exc


def as_dict(settings: Settings, *, redact: bool = True) -> dict[str, dict[str, Any]]:
    """The effective settings as plain data, secrets (and URL passwords) redacted.

    The test-only fault-injection section is left out: it is not a setting an operator has.
    """
    out: dict[str, dict[str, Any]] = {}
    for section_name in SECTIONS:
        if section_name in TEST_ONLY_SECTIONS:
            continue
        section = getattr(settings, section_name)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if redact and f.metadata["secret"] and value:
                value = REDACTED
            if redact and isinstance(value, str) and "://" in value:
                value = redact_url(value)
            values[f.name] = value
        out[section_name] = values
    return out


_PASSWORD_PARAMS = frozenset({"password", "pass", "passwd", "pwd"})


def _url_parts(url: str) -> tuple[str, str, str, str]:
    """(scheme://, userinfo, host and path, query) of a URL; parts absent are empty."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", url, ""
    head, _, query = rest.partition("?")
    userinfo, at, host = head.rpartition("@")
    return f"{scheme}://", userinfo if at else "", host, query


def _password_params(query: str) -> list[str]:
    return [
        p for p in query.split("&") if p.partition("=")[0].lower() in _PASSWORD_PARAMS and p.partition("=")[2]
    ]


def url_has_password(url: str) -> bool:
    """Whether a URL carries a password, as ``user:password@`` or a ``password=`` parameter."""
    _, userinfo, _, query = _url_parts(url)
    return bool(userinfo.partition(":")[2]) or bool(_password_params(query))


def redact_url(url: str) -> str:
    """Hide the password of a URL, in ``user:password@`` and in a ``password=`` parameter."""
    scheme, userinfo, host, query = _url_parts(url)
    if not url_has_password(url):
        return url
    user, _, password = userinfo.partition(":")
    auth = f"{user}:{REDACTED}@" if password else (f"{userinfo}@" if userinfo else "")
    params = [
        f"{p.partition('=')[0]}={REDACTED}" if p in _password_params(query) else p for p in query.split("&")
    ]
    return f"{scheme}{auth}{host}" + (f"?{'&'.join(params)}" if query else "")
