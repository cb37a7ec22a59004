"""Kafka topic IDs: the identity that tells a recreated topic from the one it replaced.

A topic deleted and created again under the same name starts its offsets at 0 again, and the
consumer group's committed offsets are gone with it. Anything remembered per partition (the
Redis offset watermark) must therefore be tied to the topic's incarnation, not its name. Kafka
has named incarnations since 2.8 (KIP-516): every topic has a random UUID, reported by the
Metadata API from version 10 on. aiokafka speaks Metadata only up to version 5, so the request
and response of version 12 (Kafka 3.1+; 4.x speaks 12 and 13) are written out here with
aiokafka's own protocol types.

A broker that does not speak Metadata v12 gives no IDs (``{}``); callers then fall back to
binding by name alone and say so.
"""

from __future__ import annotations

import logging
import uuid
from io import BytesIO
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import IncompatibleBrokerVersion, KafkaError
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    AbstractType,
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from stream_worker.kafka import client_kwargs, kafka_failure
from stream_worker.settings import KafkaSettings

log = logging.getLogger("lookout.kafka")

NO_TOPIC_ID = "00000000-0000-0000-0000-000000000000"


class Uuid(AbstractType[str]):  # type: ignore[misc]
    """Kafka's UUID type: 16 raw bytes (the all-zero UUID means "none")."""

    @classmethod
    def encode(cls, value: str) -> bytes:
        return uuid.UUID(value).bytes

    @classmethod
    def decode(cls, data: BytesIO) -> str:
        raw = data.read(16)
        if len(raw) != 16:
            raise ValueError("Buffer underrun decoding UUID")
        return str(uuid.UUID(bytes=raw))


class MetadataResponse_v12(Response):  # type: ignore[misc]
    """Metadata response v12 (KIP-516 topic IDs; see Kafka's MetadataResponse.json)."""

    API_KEY = 3
    API_VERSION = 12
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            CompactArray(
                ("node_id", Int32),
                ("host", CompactString("utf-8")),
                ("port", Int32),
                ("rack", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("cluster_id", CompactString("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            CompactArray(
                ("error_code", Int16),
                ("name", CompactString("utf-8")),
                ("topic_id", Uuid),
                ("is_internal", Boolean),
                (
                    "partitions",
                    CompactArray(
                        ("error_code", Int16),
                        ("partition_index", Int32),
                        ("leader_id", Int32),
                        ("leader_epoch", Int32),
                        ("replica_nodes", CompactArray(Int32)),
                        ("isr_nodes", CompactArray(Int32)),
                        ("offline_replicas", CompactArray(Int32)),
                        ("tags", TaggedFields),
                    ),
                ),
                ("topic_authorized_operations", Int32),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class MetadataRequest_v12(RequestStruct):  # type: ignore[misc]
    """Metadata request v12: topics by name, no auto-creation."""

    FLEXIBLE_VERSION = True
    API_KEY = 3
    API_VERSION = 12
    RESPONSE_TYPE = MetadataResponse_v12
    SCHEMA = Schema(
        (
            "topics",
            CompactArray(
                ("topic_id", Uuid),
                ("name", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("allow_auto_topic_creation", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class TopicIdsRequest(Request[MetadataRequest_v12]):  # type: ignore[misc]
    """Asks for the IDs of named topics (never creates one)."""

    API_KEY = 3

    def __init__(self, topics: list[str]) -> None:
        self._topics = topics

    def build(self, request_struct_class: type[MetadataRequest_v12]) -> MetadataRequest_v12:
        return request_struct_class([(NO_TOPIC_ID, name, {}) for name in self._topics], False, False, {})


def parse_topic_ids(response: Any) -> dict[str, str]:
    """Topic name -> ID from a v12 response; topics with an error or no ID are left out."""
    ids: dict[str, str] = {}
    for error_code, name, topic_id, *_ in response.topics:
        if not error_code and name and topic_id != NO_TOPIC_ID:
            ids[name] = topic_id
    return ids


class TopicIds:
    """Looks up topic IDs over one admin connection, opened on first use."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self._kafka = kafka
        self._admin: AIOKafkaAdminClient | None = None
        self._unsupported = False

    async def lookup(self, topics: list[str]) -> dict[str, str]:
        """The current ID of each topic; ``{}`` where the broker cannot say (logged once)."""
        if not topics or self._unsupported:
            return {}
        try:
            if self._admin is None:
                admin = AIOKafkaAdminClient(
                    **client_kwargs(self._kafka), client_id=f"{self._kafka.client_id}-admin"
                )
                try:
                    await admin.start()
                except KafkaError:
                    await admin.close()  # what start() opened
                    raise
                self._admin = admin
            response = await self._admin._send_request(TopicIdsRequest(sorted(set(topics))))
        except (IncompatibleBrokerVersion, NotImplementedError):
            self._unsupported = True
            log.warning(
                "the Kafka broker reports no topic IDs (Metadata v12, Kafka 3.1+): a deleted and "
                "recreated frames topic cannot be told from the old one; offsets below the old "
                "Redis watermark would be skipped"
            )
            return {}
        except KafkaError as exc:
            raise kafka_failure(exc, "looking up topic IDs") from exc
        return parse_topic_ids(response)

    async def close(self) -> None:
        """Close the admin connection, if one was opened."""
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                await admin.close()
            except KafkaError as exc:  # closing is best effort
                log.debug("closing the topic-ID admin client failed: %s", exc)
