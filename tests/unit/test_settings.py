"""One settings tree: defaults < file < env < flags, typed, validated, secrets redacted."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from stream_worker.errors import ConfigError
from stream_worker.settings import add_flags, as_dict, load_settings, redact_url


def test_precedence_is_defaults_then_file_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "lookout.yaml"
    config.write_text("batch:\n  max_batch: 8\n  max_wait_ms: 40\ntopics:\n  labels_topic: from-file\n")
    settings = load_settings(
        flags={"max_wait_ms": "5"},
        env={"LOOKOUT_MAX_BATCH": "12", "LOOKOUT_WINDOWS": "30s, 1h"},
        config_file=config,
    )
    assert settings.batch.max_batch == 12  # env beats file
    assert settings.batch.max_wait_ms == 5.0  # flag beats file
    assert settings.topics.labels_topic == "from-file"  # file beats default
    assert settings.counts.windows == ["30s", "1h"]
    assert settings.topics.group == "lookout"  # default


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOOKOUT_MAX_BATCH": "many"}, "cannot read 'many' as int"),
        ({"LOOKOUT_MAX_BATCH": "0"}, "--max-batch must be at least 1"),
        ({"LOOKOUT_LABEL_MODE": "fuzzy"}, "--label-mode must be"),
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "--security-protocol must be"),
        ({"LOOKOUT_MAX_IN_FLIGHT": "4"}, "--max-in-flight must be at least --max-batch"),
        ({"LOOKOUT_FAULT_KILL_AT": "lunch:1"}, "STAGE:N"),
        ({"LOOKOUT_FRAMES_PATTERN": "cams-["}, "--frames-pattern 'cams-\\[' is not a regular expression"),
    ],
)
def test_bad_values_are_one_line_errors_that_name_the_option(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(env=env)
    assert "\n" not in str(caught.value)


def test_unknown_keys_in_the_file_are_errors_not_silently_ignored(tmp_path: Path) -> None:
    config = tmp_path / "lookout.yaml"
    config.write_text("batch:\n  max_bach: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['max_bach'\] in section batch"):
        load_settings(env={}, config_file=config)
    config.write_text("batches: {}\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_settings(env={}, config_file=config)


def test_every_flag_shows_its_env_fallback_in_help() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    help_text = " ".join(parser.format_help().split())
    for flag, env in (
        ("--max-batch", "LOOKOUT_MAX_BATCH"),
        ("--bootstrap", "KAFKA_BOOTSTRAP"),
        ("--redis-url", "REDIS_URL"),
        ("--sasl-password-file", "KAFKA_SASL_PASSWORD_FILE"),
    ):
        assert flag in help_text and f"env {env}" in help_text


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://lookout:s3cret@redis:6379/0", "redis://lookout:***@redis:6379/0"),
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://redis:6379/0?password=s3cret&db=1", "redis://redis:6379/0?password=***&db=1"),
        ("rediss://lookout@redis/0?Password=s3cret", "rediss://lookout@redis/0?Password=***"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
    ],
)
def test_every_form_of_url_password_is_redacted(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    "url", ["redis://lookout:s3cret@redis:6379/0", "redis://redis:6379/0?password=s3cret"]
)
def test_a_password_written_into_the_redis_url_is_refused_without_printing_it(url: str) -> None:
    # redis-py would use it; lookout reads secrets only from files.
    with pytest.raises(ConfigError) as refused:
        load_settings(env={"REDIS_URL": url})
    message = str(refused.value)
    assert "s3cret" not in message and "--redis-password-file" in message


def test_printed_settings_keep_the_url_without_a_password() -> None:
    settings = load_settings(env={"REDIS_URL": "redis://lookout@redis:6379/0"})
    assert as_dict(settings)["redis"]["redis_url"] == "redis://lookout@redis:6379/0"


@pytest.mark.parametrize("template", ["{topic}.{partition}", "{0}.dlq", "{topic.dlq", "dead letters"])
def test_a_dead_letter_template_with_other_fields_is_refused_at_start_up(template: str) -> None:
    with pytest.raises(ConfigError, match="--dlq-topic"):
        load_settings(env={"LOOKOUT_DLQ_TOPIC": template})


def test_per_source_limits_have_bounded_defaults_and_come_from_flags_env_and_file(tmp_path: Path) -> None:
    defaults = load_settings(env={})
    assert defaults.counts.max_tracked_sources == 10_000
    assert defaults.counts.source_idle_s == 86_400
    assert defaults.ops.max_metric_sources == 1_000
    assert defaults.counts.source_limits.idle_ms == 86_400_000
    config = tmp_path / "lookout.yaml"
    config.write_text("counts:\n  max_tracked_sources: 50\nops:\n  max_metric_sources: 20\n")
    settings = load_settings(
        flags={"source_idle_s": "90"}, env={"LOOKOUT_MAX_METRIC_SOURCES": "30"}, config_file=config
    )
    assert (settings.counts.max_tracked_sources, settings.counts.source_idle_s) == (50, 90.0)
    assert settings.ops.max_metric_sources == 30


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOOKOUT_MAX_TRACKED_SOURCES": "0"}, "--max-tracked-sources must be at least 1"),
        ({"LOOKOUT_SOURCE_IDLE_S": "0"}, "--source-idle-s must be positive"),
        ({"LOOKOUT_MAX_METRIC_SOURCES": "-1"}, "--max-metric-sources must be at least 1"),
    ],
)
def test_per_source_limits_that_would_hold_nothing_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)
