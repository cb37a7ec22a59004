"""One settings tree: defaults < file < env < flags, typed, validated, secrets redacted."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from stream_worker.backends.sidecar import Sidecar, sidecar_path
from stream_worker.errors import ConfigError
from stream_worker.settings import add_flags, as_dict, check_engine_labels, load_settings, redact_url


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
        ({"LOOKOUT_MAX_BATCH": "many"}, "LOOKOUT_MAX_BATCH must be a whole number, 1 or more, not 'many'"),
        ({"LOOKOUT_MAX_BATCH": "0"}, "LOOKOUT_MAX_BATCH must be a whole number, 1 or more, not '0'"),
        ({"LOOKOUT_LABEL_MODE": "fuzzy"}, "LOOKOUT_LABEL_MODE must be one of single, multi, not 'fuzzy'"),
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL must be one of PLAINTEXT, SSL, "),
        (
            {"LOOKOUT_MAX_IN_FLIGHT": "4"},
            "LOOKOUT_MAX_IN_FLIGHT must be at least --max-batch / LOOKOUT_MAX_BATCH",
        ),
        ({"LOOKOUT_FAULT_KILL_AT": "lunch:1"}, "LOOKOUT_FAULT_KILL_AT must be STAGE:N"),
        (
            {"LOOKOUT_FRAMES_PATTERN": "cams-["},
            "LOOKOUT_FRAMES_PATTERN must be a regular expression, not 'cams-\\['",
        ),
        ({"REDIS_URL": "http://redis:6379"}, "REDIS_URL must be a redis://, rediss:// or unix:// URL"),
        (
            {"LOOKOUT_EVENT_GAP_S": "inf"},
            "LOOKOUT_EVENT_GAP_S must be a number of seconds above 0, not 'inf'",
        ),
        ({"LOOKOUT_DLQ_TOPIC": "{topic}"}, "LOOKOUT_DLQ_TOPIC makes the worker write to its frames topic"),
    ],
)
def test_bad_values_are_one_line_errors_that_name_the_option(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(env=env)
    assert "\n" not in str(caught.value)


def test_unknown_keys_in_the_file_are_errors_not_silently_ignored(tmp_path: Path) -> None:
    config = tmp_path / "lookout.yaml"
    config.write_text("batch:\n  max_bach: 8\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'max_bach' in section batch \(did you mean 'max_batch'\?\)"
    ):
        load_settings(env={}, config_file=config)
    config.write_text("batches: {}\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_settings(env={}, config_file=config)
    config.write_text("batch: 8\n")  # a section must be a mapping (before: a TypeError traceback)
    with pytest.raises(ConfigError, match="section batch must be a mapping of option: value"):
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
    with pytest.raises(ConfigError, match=r"^LOOKOUT_DLQ_TOPIC must be a topic name in which \{topic\}"):
        load_settings(env={"LOOKOUT_DLQ_TOPIC": template})
    with pytest.raises(ConfigError, match=r"^--dlq-topic must be a topic name in which \{topic\}"):
        load_settings(flags={"dlq_topic": template}, env={})


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
        (
            {"LOOKOUT_MAX_TRACKED_SOURCES": "0"},
            "LOOKOUT_MAX_TRACKED_SOURCES must be a whole number, 1 or more",
        ),
        ({"LOOKOUT_SOURCE_IDLE_S": "0"}, "LOOKOUT_SOURCE_IDLE_S must be a number of seconds above 0"),
        (
            {"LOOKOUT_MAX_METRIC_SOURCES": "-1"},
            "LOOKOUT_MAX_METRIC_SOURCES must be a whole number, 1 or more",
        ),
    ],
)
def test_per_source_limits_that_would_hold_nothing_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)


# --- one validation pass: every message names the setting as given, and the expected format ---

# The command line, one bad value at a time: (option, bad value, words of the expected form).
BAD_VALUES = [
    ("windows", "5x", "durations like 30s, 1m, 15m, 1h or 1d"),
    ("rollup_threshold", "5", "a number from 0 to 1"),
    ("top_k", "-3", "a whole number, 0 or more"),
    ("event_gap_s", "-1", "a number of seconds above 0"),
]
SECTION_OF = {"windows": "counts", "rollup_threshold": "labels", "top_k": "labels", "event_gap_s": "counts"}
ENV_OF = {
    "windows": "LOOKOUT_WINDOWS",
    "rollup_threshold": "LOOKOUT_ROLLUP_THRESHOLD",
    "top_k": "LOOKOUT_TOP_K",
    "event_gap_s": "LOOKOUT_EVENT_GAP_S",
}


@pytest.mark.parametrize(("option", "bad", "expected"), BAD_VALUES)
@pytest.mark.parametrize("given_by", ["flag", "env", "file"])
def test_a_bad_value_names_the_flag_env_or_yaml_key_it_came_from_and_the_expected_format(
    tmp_path: Path, option: str, bad: str, expected: str, given_by: str
) -> None:
    config = tmp_path / "lookout.yaml"
    config.write_text(f"{SECTION_OF[option]}:\n  {option}: '{bad}'\n")
    sources: dict[str, Any] = {
        "flag": {"flags": {option: bad}, "env": {}},
        "env": {"env": {ENV_OF[option]: bad}},
        "file": {"env": {}, "config_file": config},
    }[given_by]
    named = {
        "flag": "--" + option.replace("_", "-"),
        "env": ENV_OF[option],
        "file": f"{SECTION_OF[option]}.{option} in {config}",
    }[given_by]
    with pytest.raises(ConfigError) as refused:
        load_settings(**sources)
    message = str(refused.value)
    assert message.startswith(f"{named} must be {expected}"), message
    assert repr(bad) in message and "\n" not in message
    others = {"--" + option.replace("_", "-"), ENV_OF[option], f"{SECTION_OF[option]}.{option}"}
    assert not any(other in message for other in others if other not in named), message


def test_every_bad_value_of_one_command_line_is_reported_at_once_on_one_line() -> None:
    flags = {"windows": "5x", "rollup_threshold": "5", "top_k": "-3", "event_gap_s": "-1"}
    with pytest.raises(ConfigError) as refused:
        load_settings(flags=flags, env={})
    message = str(refused.value)
    assert "\n" not in message and message.startswith("4 settings are wrong: ")
    for flag in ("--windows", "--rollup-threshold", "--top-k", "--event-gap-s"):
        assert f"{flag} must be" in message, message


def test_a_misspelt_label_in_the_thresholds_is_refused_naming_it_and_the_closest_label() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(env={"LOOKOUT_LABEL_THRESHOLDS": "car=0.5,carr=0.2"})
    message = str(refused.value)
    assert message.startswith("LOOKOUT_LABEL_THRESHOLDS names 'carr'"), message
    assert "did you mean 'car'?" in message and "bicycle" in message  # the known labels


def test_label_thresholds_in_another_format_are_refused_with_the_expected_format() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(env={"LOOKOUT_LABEL_THRESHOLDS": "car:0.5"})
    message = str(refused.value)
    assert message.startswith("LOOKOUT_LABEL_THRESHOLDS must be label=score pairs"), message
    assert "e.g. car=0.5,person=0.4" in message and "'car:0.5'" in message


def test_a_threshold_out_of_range_names_its_label() -> None:
    with pytest.raises(ConfigError, match=r"^--label-thresholds|^LOOKOUT_LABEL_THRESHOLDS") as refused:
        load_settings(env={"LOOKOUT_LABEL_THRESHOLDS": "car=1.5"})
    assert "scores from 0 to 1" in str(refused.value)


def _engine_with_taxonomy(tmp_path: Path, taxonomy: dict[str, Any] | None) -> Path:
    """An engine file with a sidecar that carries ``taxonomy`` (nothing here runs it)."""
    engine = tmp_path / "pets.onnx"
    engine.write_bytes(b"not run by these tests")
    sidecar = Sidecar(
        backend="onnxruntime", precision="fp32", min_batch=1, opt_batch=1, max_batch=1,
        onnx_path="pets.onnx", onnx_sha256="0", engine_sha256="0", runtime_version="0",
        model_name="pets", model_version="1", input_name="images", output_name="probabilities",
        preprocess={}, class_names=("tabby", "Chihuahua"), taxonomy_version="pets-1", taxonomy=taxonomy,
    )  # fmt: skip
    sidecar_path(engine).write_text(sidecar.to_json())
    return engine


PETS = {
    "version": "pets-1",
    "labels": [{"label": "feline", "parent": "pet"}, {"label": "pet", "parent": None}],
    "mapping": {"feline": {"classes": [[0, "tabby"]]}, "pet": {"classes": [[1, "Chihuahua"]]}},
}


def test_label_thresholds_are_checked_against_the_taxonomy_of_the_named_engine(tmp_path: Path) -> None:
    engine = _engine_with_taxonomy(tmp_path, PETS)
    ok = load_settings(env={"LOOKOUT_ENGINE": str(engine), "LOOKOUT_LABEL_THRESHOLDS": "feline=0.4"})
    check_engine_labels(ok)  # a label of the engine's own taxonomy
    wrong = load_settings(env={"LOOKOUT_ENGINE": str(engine), "LOOKOUT_LABEL_THRESHOLDS": "car=0.4"})
    with pytest.raises(ConfigError) as refused:
        check_engine_labels(wrong)  # a label of the packaged taxonomy only
    message = str(refused.value)
    assert message.startswith("LOOKOUT_LABEL_THRESHOLDS names 'car'") and "feline, pet" in message
    assert str(engine) in message


def test_the_tests_build_into_the_checkouts_scratch_cache_not_the_users() -> None:
    from tests.conftest import TEST_CACHE, TOOLS_CACHE

    # Every worker, bench and CLI the tests start inherits this (tests/conftest.py).
    assert load_settings().engine.cache_dir == str(TEST_CACHE)
    assert load_settings(flags={}, env={}).engine.cache_dir == str(TEST_CACHE)
    assert Path(TOOLS_CACHE) != TEST_CACHE
