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


def test_printed_settings_hide_passwords_in_urls() -> None:
    settings = load_settings(env={"REDIS_URL": "redis://lookout:s3cret@redis:6379/0"})
    printed = str(as_dict(settings))
    assert "s3cret" not in printed and "redis://lookout:***@redis:6379/0" in printed
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"
