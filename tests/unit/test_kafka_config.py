"""Kafka client options from settings: addresses, security, one-line mistakes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stream_worker.errors import ConfigError
from stream_worker.kafka import bootstrap_addresses, client_kwargs, frames_subscription
from stream_worker.settings import KafkaSettings, load_settings


def test_bootstrap_lists_parse_including_ipv6() -> None:
    assert bootstrap_addresses("a:9092, [::1]:9093") == [("a", 9092), ("::1", 9093)]
    with pytest.raises(ConfigError, match="is not host:port"):
        bootstrap_addresses("kafka")


def test_sasl_needs_credentials_and_reads_the_password_from_its_file(tmp_path: Path) -> None:
    # Refused as the settings are loaded, before any client is made, naming what is missing...
    with pytest.raises(
        ConfigError, match=r"^KAFKA_SECURITY_PROTOCOL is SASL_SSL, which needs --ssl-cafile / "
    ):
        load_settings(env={"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})
    with pytest.raises(ConfigError) as refused:
        load_settings(env={"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "lookout"})
    assert str(refused.value) == (
        "KAFKA_SECURITY_PROTOCOL is SASL_PLAINTEXT, which needs --sasl-password-file / "
        "KAFKA_SASL_PASSWORD_FILE (the file with its password)"
    )
    # ... and by a client made from settings built in code.
    with pytest.raises(ConfigError, match="--ssl-cafile"):
        client_kwargs(KafkaSettings(security_protocol="SASL_SSL"))
    with pytest.raises(ConfigError, match="--sasl-username and --sasl-password-file"):
        client_kwargs(KafkaSettings(security_protocol="SASL_PLAINTEXT"))
    with pytest.raises(ConfigError, match=f"cannot read the CA bundle {tmp_path / 'no-ca.pem'}"):
        client_kwargs(KafkaSettings(security_protocol="SSL", ssl_cafile=str(tmp_path / "no-ca.pem")))
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    env = {
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_USERNAME": "lookout",
        "KAFKA_SASL_PASSWORD_FILE": str(secret),
    }
    kwargs = client_kwargs(load_settings(env=env).kafka)
    assert kwargs["sasl_plain_password"] == "s3cret" and kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    env["KAFKA_SASL_PASSWORD_FILE"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="cannot read the Kafka SASL password"):
        client_kwargs(load_settings(env=env).kafka)


@pytest.mark.parametrize(
    ("dlq", "excluded"),
    [("{topic}.dlq", "cams-1.dlq"), ("dead.{topic}", "dead.cams-1"), ("all-dead", "all-dead")],
)
def test_a_frames_pattern_never_subscribes_to_the_workers_own_output_topics(dlq: str, excluded: str) -> None:
    settings = load_settings(
        flags={"frames_pattern": "cams-.*|dead.*|all.*", "labels_topic": "cams-labels", "dlq_topic": dlq},
        env={},
    )
    pattern = re.compile(frames_subscription(settings.topics))
    assert pattern.match("cams-1") and pattern.match("cams-labels-archive")
    for own in ("cams-labels", excluded, dlq.format(topic=excluded)):
        assert not pattern.match(own), own
    assert not pattern.match("other-cams")  # the user's pattern still decides the rest


def test_topic_ids_are_read_from_a_metadata_v12_response() -> None:
    from io import BytesIO

    from stream_worker.topic_ids import MetadataResponse_v12, TopicIdsRequest, parse_topic_ids

    request = TopicIdsRequest(["frames"]).build(TopicIdsRequest._CLASSES[0])
    assert request.API_VERSION == 12 and request.FLEXIBLE_VERSION
    assert request.encode()[:1] == b"\x02"  # one topic (compact array length + 1)
    topic_id = "36919f67-c314-4a7b-907f-91b4495c579b"
    partition = (0, 0, 1, 0, [1], [1], [], {})
    wire = MetadataResponse_v12(
        0,
        [(1, "localhost", 9092, None, {})],
        "cluster",
        1,
        [
            (0, "frames", topic_id, False, [partition], 0, {}),
            (3, "gone", "00000000-0000-0000-0000-000000000000", False, [], 0, {}),
        ],
        {},
    ).encode()
    assert parse_topic_ids(MetadataResponse_v12.decode(BytesIO(wire))) == {"frames": topic_id}
