"""One frozen settings tree, loaded once: defaults < YAML file < environment < flags.

Every option is declared once, with its type, env name, default and help text; the CLI builds
its flags from these declarations, so ``--help`` always shows the env fallback. Nothing else
in lookout reads ``os.environ``. Secrets are read from files (``*_file`` options) and are
redacted whenever settings are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from stream_worker.backends.cache import default_cache_dir
from stream_worker.counting import WindowSpec
from stream_worker.errors import ConfigError
from stream_worker.sources import SourceLimits

REDACTED = "***"
HEADERS_ROOM_BYTES = 1_048_576
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
FAULT_STAGES = ("inference", "labels", "counts", "commit")


def opt(default: Any, env: str, doc: str, *, secret: bool = False, flag: bool = True) -> Any:
    """Declare one option: its default, env variable, help text, and whether it is secret."""
    meta = {"env": env, "doc": doc, "secret": secret, "flag": flag}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """How to reach the Kafka cluster."""

    bootstrap: str = opt(
        "127.0.0.1:9092", "KAFKA_BOOTSTRAP", "Kafka bootstrap servers, host:port[,host:port]"
    )
    security_protocol: str = opt(
        "PLAINTEXT", "KAFKA_SECURITY_PROTOCOL", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    sasl_mechanism: str = opt(
        "SCRAM-SHA-512", "KAFKA_SASL_MECHANISM", "SASL mechanism (SCRAM-SHA-512, PLAIN, ...)"
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
        30000, "LOOKOUT_SESSION_TIMEOUT_MS", "consumer group session timeout", flag=False
    )
    max_poll_interval_ms: int = opt(
        300000, "LOOKOUT_MAX_POLL_INTERVAL_MS", "consumer max.poll.interval.ms", flag=False
    )
    metadata_max_age_ms: int = opt(
        300000,
        "LOOKOUT_METADATA_MAX_AGE_MS",
        "how often topic metadata is refreshed: how soon a new topic matching --frames-pattern is read",
        flag=False,
    )


@dataclass(frozen=True, slots=True)
class TopicSettings:
    """Which topics the worker reads and writes."""

    frames_topic: list[str] = opt(["frames"], "LOOKOUT_FRAMES_TOPIC", "frames topic(s), comma separated")
    frames_pattern: str = opt(
        "", "LOOKOUT_FRAMES_PATTERN", "regex of frames topics (instead of --frames-topic)"
    )
    labels_topic: str = opt("labels", "LOOKOUT_LABELS_TOPIC", "per-frame label records")
    counts_topic: str = opt("counts", "LOOKOUT_COUNTS_TOPIC", "compacted topic of absolute window counts")
    dlq_topic: str = opt(
        "{topic}.dlq", "LOOKOUT_DLQ_TOPIC", "dead-letter topic; {topic} is the frame's topic"
    )
    review_topic: str = opt("review", "LOOKOUT_REVIEW_TOPIC", "low-confidence frames sampled for review")
    events_topic: str = opt(
        "events",
        "LOOKOUT_EVENTS_TOPIC",
        "compacted topic of camera-trap events, one record per event and species",
    )
    group: str = opt("lookout", "LOOKOUT_GROUP", "consumer group id")
    topic_replication: int = opt(
        1,
        "LOOKOUT_TOPIC_REPLICATION",
        "replication factor of output topics the worker creates (use 3 in production)",
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

    redis_url: str = opt("redis://127.0.0.1:6379/0", "REDIS_URL", "Redis URL (rediss:// for TLS)")
    redis_username: str = opt("", "REDIS_USERNAME", "Redis ACL user")
    redis_password_file: str = opt("", "REDIS_PASSWORD_FILE", "file holding the Redis ACL password")
    redis_ca_file: str = opt("", "REDIS_CA_FILE", "CA for rediss://")
    key_prefix: str = opt("lookout", "LOOKOUT_KEY_PREFIX", "prefix of every Redis key lookout writes")
    counts_ttl_s: int = opt(7 * 86400, "LOOKOUT_COUNTS_TTL_S", "time-to-live of window count keys in Redis")


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Which engine classifies the frames."""

    engine: str = opt("", "LOOKOUT_ENGINE", "engine file; empty = the default CPU engine, built on first use")
    cache_dir: str = opt(str(default_cache_dir()), "LOOKOUT_CACHE_DIR", "where default engines are cached")
    inference_threads: int = opt(
        0, "LOOKOUT_INFERENCE_THREADS", "intra-op threads for ONNX Runtime (0 = auto)"
    )


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """Micro-batching and back-pressure."""

    max_batch: int = opt(16, "LOOKOUT_MAX_BATCH", "largest inference batch (capped at the engine's profile)")
    max_wait_ms: float = opt(25.0, "LOOKOUT_MAX_WAIT_MS", "longest a frame waits for its batch to fill")
    max_in_flight: int = opt(
        256, "LOOKOUT_MAX_IN_FLIGHT", "frames consumed but not yet committed; partitions pause above it"
    )
    max_in_flight_bytes: int = opt(
        256 * 1024 * 1024,
        "LOOKOUT_MAX_IN_FLIGHT_BYTES",
        "bytes of frames consumed but not yet committed; partitions pause above it",
    )
    decode_threads: int = opt(2, "LOOKOUT_DECODE_THREADS", "threads decoding and preprocessing frames")
    max_frame_bytes: int = opt(
        20_000_000, "LOOKOUT_MAX_FRAME_BYTES", "frames larger than this go to the dead-letter topic"
    )
    max_pixels: int = opt(50_000_000, "LOOKOUT_MAX_PIXELS", "width x height cap, read from the image header")
    max_clock_skew_s: float = opt(
        3600.0,
        "LOOKOUT_MAX_CLOCK_SKEW_S",
        "frames whose captured-at is further than this ahead of their record's timestamp go to the "
        "dead-letter topic (one future-dated frame would otherwise move every window)",
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

    label_mode: str = opt("single", "LOOKOUT_LABEL_MODE", "single (best label, rolled up) or multi")
    rollup_threshold: float = opt(
        0.4, "LOOKOUT_ROLLUP_THRESHOLD", "a leaf under this score rolls up to its parent"
    )
    label_thresholds: dict[str, float] = opt(
        {}, "LOOKOUT_LABEL_THRESHOLDS", "multi mode: per-label thresholds, label=score,...", flag=False
    )
    default_label_threshold: float = opt(
        0.3, "LOOKOUT_DEFAULT_LABEL_THRESHOLD", "multi mode: threshold of labels not listed"
    )
    top_k: int = opt(5, "LOOKOUT_TOP_K", "raw classes kept in each label record")


@dataclass(frozen=True, slots=True)
class CountSettings:
    """Windows, camera-trap sequences, review sampling and drift."""

    windows: list[str] = opt(["1m", "15m"], "LOOKOUT_WINDOWS", "tumbling count windows, comma separated")
    event_gap_s: float = opt(
        60.0, "LOOKOUT_EVENT_GAP_S", "wildlife frames closer than this form one camera-trap sequence"
    )
    review_threshold: float = opt(
        0.3, "LOOKOUT_REVIEW_THRESHOLD", "frames whose best score is under this may go to review"
    )
    review_sample_rate: float = opt(
        0.0, "LOOKOUT_REVIEW_SAMPLE_RATE", "share (0..1) of low-confidence frames sent to review"
    )
    drift_window_frames: int = opt(
        500, "LOOKOUT_DRIFT_WINDOW_FRAMES", "frames per source in the drift signal's sliding window"
    )
    thumbnail_ttl_s: int = opt(
        300, "LOOKOUT_THUMBNAIL_TTL_S", "life of each source's latest-frame thumbnail in Redis"
    )
    max_tracked_sources: int = opt(
        10_000,
        "LOOKOUT_MAX_TRACKED_SOURCES",
        "sources whose drift window and thumbnail clock are held in memory; the least recently "
        "seen beyond it are forgotten",
    )
    source_idle_s: float = opt(
        86_400.0,
        "LOOKOUT_SOURCE_IDLE_S",
        "a source not seen for this long is forgotten: its drift window and its /metrics series",
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

    metrics_port: int = opt(9400, "LOOKOUT_METRICS_PORT", "port of /metrics, /healthz, /readyz (0 = off)")
    metrics_host: str = opt("0.0.0.0", "LOOKOUT_METRICS_HOST", "address the metrics server binds")
    log_level: str = opt("INFO", "LOOKOUT_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = opt("text", "LOOKOUT_LOG_FORMAT", "text or json")
    drain_deadline_s: float = opt(
        20.0, "LOOKOUT_DRAIN_DEADLINE_S", "on SIGTERM, finish in-flight batches within this"
    )
    retry_max_s: float = opt(
        30.0, "LOOKOUT_RETRY_MAX_S", "longest backoff between retries of a failed sink write"
    )
    max_metric_sources: int = opt(
        1_000,
        "LOOKOUT_MAX_METRIC_SOURCES",
        "sources with their own per-source /metrics series; the rest share the source label "
        "'_other' until a source idle for --source-idle-s makes room",
    )


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    """The live dashboard (``stream-worker dashboard``)."""

    port: int = opt(8080, "LOOKOUT_DASHBOARD_PORT", "port the dashboard listens on")
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
    )
    fault_infer_delay_ms: float = opt(
        0.0, "LOOKOUT_FAULT_INFER_DELAY_MS", "extra delay of every inference call", flag=False
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


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole tree; build it with :func:`load_settings`."""

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


def _convert(raw: Any, hint: Any, name: str, source: str) -> Any:
    """Coerce a raw value (string from env/flag, or YAML value) to the declared type."""
    origin = getattr(hint, "__origin__", None)
    try:
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
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is str:
            return str(raw)
        if origin is list:
            items = raw if isinstance(raw, list) else [p for p in str(raw).split(",")]
            return [str(i).strip() for i in items if str(i).strip()]
        if origin is dict:
            if isinstance(raw, Mapping):
                return {str(k): float(v) for k, v in raw.items()}
            pairs = [p.split("=", 1) for p in str(raw).split(",") if p.strip()]
            return {k.strip(): float(v) for k, v in pairs}
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{name} from {source}: cannot read {raw!r} as {getattr(hint, '__name__', hint)}"
        ) from exc
    raise ConfigError(f"{name}: unsupported option type {hint}")


def _options(section: type[Any]) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = get_type_hints(section)
    return [(f, hints[f.name]) for f in dataclasses.fields(section)]


def flag_name(option: str) -> str:
    """The CLI flag of an option: ``max_wait_ms`` -> ``--max-wait-ms``."""
    return "--" + option.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, sections: Sequence[str] | None = None) -> None:
    """Add one flag per declared option (``flag=True``), with its env fallback in the help."""
    for section_name, section in SECTIONS.items():
        if sections is not None and section_name not in sections:
            continue
        group = parser.add_argument_group(section_name)
        for f, _hint in _options(section):
            if not f.metadata["flag"]:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
            shown = ",".join(default) if isinstance(default, list) else default
            if f.metadata["secret"]:
                shown = REDACTED
            group.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=None,
                metavar=f.name.split("_")[-1].upper(),
                help=f"{f.metadata['doc']} (env {f.metadata['env']}; default {shown!s})",
            )


def load_settings(
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Build the settings tree: defaults < YAML file < environment < flags.

    ``env`` defaults to ``os.environ``; ``config_file`` defaults to ``$LOOKOUT_CONFIG`` when set.
    Unknown YAML keys are an error, not silently ignored.
    """
    environ = os.environ if env is None else env
    flags = flags or {}
    path = config_file or environ.get("LOOKOUT_CONFIG") or None
    file_values: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"settings file {path} does not exist: fix --config or LOOKOUT_CONFIG") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"settings file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"settings file {path} must hold a mapping of sections")
        file_values = loaded
    unknown_sections = set(file_values) - set(SECTIONS)
    if unknown_sections:
        raise ConfigError(
            f"settings file {path}: unknown section(s) {sorted(unknown_sections)}; known: {list(SECTIONS)}"
        )

    built: dict[str, Any] = {}
    for section_name, section in SECTIONS.items():
        from_file = file_values.get(section_name) or {}
        known = {f.name for f in dataclasses.fields(section)}
        unknown = set(from_file) - known
        if unknown:
            raise ConfigError(
                f"settings file {path}: unknown key(s) {sorted(unknown)} in section {section_name}"
            )
        values: dict[str, Any] = {}
        for f, hint in _options(section):
            if flags.get(f.name) is not None:
                values[f.name] = _convert(flags[f.name], hint, f.name, "flag " + flag_name(f.name))
            elif f.metadata["env"] in environ:
                values[f.name] = _convert(
                    environ[f.metadata["env"]], hint, f.name, "env " + f.metadata["env"]
                )
            elif f.name in from_file:
                values[f.name] = _convert(from_file[f.name], hint, f.name, f"{path}")
        built[section_name] = section(**values)
    settings = Settings(**built)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    """Reject settings that cannot work, with a message that says what to change."""
    b = settings.batch
    if b.max_batch < 1:
        raise ConfigError("--max-batch must be at least 1")
    if b.max_wait_ms < 0:
        raise ConfigError("--max-wait-ms must not be negative")
    if b.max_in_flight < b.max_batch:
        raise ConfigError("--max-in-flight must be at least --max-batch")
    if b.max_in_flight_bytes < b.max_frame_bytes:
        raise ConfigError(
            f"--max-in-flight-bytes ({b.max_in_flight_bytes}) must be at least --max-frame-bytes "
            f"({b.max_frame_bytes}): one frame of the largest allowed size must fit"
        )
    if b.decode_threads < 1:
        raise ConfigError("--decode-threads must be at least 1")
    if settings.kafka.metadata_max_age_ms < 100:
        raise ConfigError("LOOKOUT_METADATA_MAX_AGE_MS must be at least 100 (milliseconds)")
    if b.max_clock_skew_s <= 0:
        raise ConfigError("--max-clock-skew-s must be positive (LOOKOUT_MAX_CLOCK_SKEW_S)")
    if settings.counts.max_tracked_sources < 1:
        raise ConfigError("--max-tracked-sources must be at least 1 (LOOKOUT_MAX_TRACKED_SOURCES)")
    if settings.counts.source_idle_s <= 0:
        raise ConfigError("--source-idle-s must be positive (LOOKOUT_SOURCE_IDLE_S)")
    if settings.ops.max_metric_sources < 1:
        raise ConfigError("--max-metric-sources must be at least 1 (LOOKOUT_MAX_METRIC_SOURCES)")
    if settings.labels.label_mode not in ("single", "multi"):
        raise ConfigError("--label-mode must be 'single' or 'multi'")
    if not 0.0 <= settings.counts.review_sample_rate <= 1.0:
        raise ConfigError("--review-sample-rate must be between 0 and 1")
    if settings.kafka.security_protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        raise ConfigError("--security-protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    if not settings.topics.frames_topic and not settings.topics.frames_pattern:
        raise ConfigError("give --frames-topic or --frames-pattern")
    if settings.topics.frames_pattern:
        try:
            re.compile(settings.topics.frames_pattern)
        except re.error as exc:
            raise ConfigError(
                f"--frames-pattern {settings.topics.frames_pattern!r} is not a regular expression ({exc}): "
                "fix --frames-pattern / LOOKOUT_FRAMES_PATTERN"
            ) from exc
    if settings.faults.fault_kill_at:
        stage, _, nth = settings.faults.fault_kill_at.partition(":")
        if stage not in FAULT_STAGES or not nth.isdigit() or int(nth) < 1:
            raise ConfigError(
                f"LOOKOUT_FAULT_KILL_AT must be STAGE:N with STAGE one of {', '.join(FAULT_STAGES)}"
            )
    if settings.ops.log_format not in ("text", "json"):
        raise ConfigError("--log-format must be 'text' or 'json'")
    if settings.ops.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(
            f"--log-level {settings.ops.log_level!r} is not a log level: use one of "
            f"{', '.join(LOG_LEVELS)} (LOOKOUT_LOG_LEVEL)"
        )
    if url_has_password(settings.redis.redis_url):
        raise ConfigError(
            f"--redis-url / REDIS_URL carries a password ({redact_url(settings.redis.redis_url)}): "
            "lookout reads secrets only from files: put the password in a file and pass "
            "--redis-password-file / REDIS_PASSWORD_FILE (and the user as --redis-username)"
        )
    _check_dead_letter_template(settings.topics.dlq_topic)


def _check_dead_letter_template(template: str) -> None:
    """``--dlq-topic`` may name ``{topic}`` and nothing else in braces, and must give a topic name."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        example = template.format(topic="frames")
    except (ValueError, KeyError, IndexError) as exc:
        fields, example = ["?"], f"({exc})"
    if any(name != "topic" for name in fields) or not _TOPIC_NAME.fullmatch(example):
        raise ConfigError(
            f"--dlq-topic {template!r} is not a dead-letter topic template: use a topic name in which "
            "{topic} (the frame's topic) is the only field in braces, e.g. {topic}.dlq "
            "(LOOKOUT_DLQ_TOPIC)"
        )


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
        if section_name == "faults":
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
