"""Record batches that aiokafka's producer refuses to write: header names that are not UTF-8.

librdkafka producers (C, Go, .NET clients) write header names as raw bytes and the broker
accepts them; aiokafka's builders encode every name as UTF-8. These helpers build a real v2
record batch with an ASCII placeholder of the same length in each such name's place, then put
the raw bytes there and recompute the batch CRC, so the broker stores exactly what a librdkafka
producer would have sent.
"""

from __future__ import annotations

import secrets
import string
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.codec import gzip_encode
from aiokafka.record.default_records import DefaultRecordBase, DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c

MAGIC_V2 = 2
NO_COMPRESSION = 0
LENGTH_AT = 8  # the batch length field, after the base offset


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record; a header whose name is ``bytes`` is written with exactly those bytes."""

    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str | bytes, bytes | None]] = ()


Headers = list[tuple[str, bytes | None]]


def _placeholders(records: Sequence[RawRecord]) -> tuple[list[Headers], dict[str, bytes]]:
    """Headers with an ASCII stand-in for every raw name, and the stand-ins' raw names."""
    raw_names: dict[str, bytes] = {}
    headers: list[Headers] = []
    for record in records:
        out: Headers = []
        for name, value in record.headers:
            if isinstance(name, bytes):
                # Long enough that the stand-in cannot also occur in a frame's bytes by chance.
                if len(name) < 8:
                    raise ValueError(f"raw header name {name!r} must have at least 8 bytes")
                stand_in = "".join(secrets.choice(string.ascii_letters) for _ in name)
                raw_names[stand_in] = name
                name = stand_in
            out.append((name, value))
        headers.append(out)
    return headers, raw_names


def put_raw_names(buffer: bytearray, raw_names: dict[str, bytes]) -> None:
    """Replace each stand-in name in a built, uncompressed v2 batch by its raw bytes; fix the CRC."""
    for stand_in, raw in raw_names.items():
        needle = stand_in.encode()
        at = buffer.find(needle)
        if at < 0 or buffer.find(needle, at + 1) >= 0:
            raise ValueError(f"header name stand-in {stand_in!r} not found exactly once in the batch")
        buffer[at : at + len(raw)] = raw
    fix_crc(buffer)


def fix_crc(buffer: bytearray) -> None:
    """Recompute a v2 batch's CRC-32C (it covers everything from the attributes on)."""
    crc = calc_crc32c(bytes(buffer[DefaultRecordBase.ATTRIBUTES_OFFSET :]))
    struct.pack_into(">I", buffer, DefaultRecordBase.CRC_OFFSET, crc)


def batch_bytes(
    records: Sequence[RawRecord], *, base_offset: int = 0, base_timestamp_ms: int = 1_790_000_000_000
) -> bytes:
    """One uncompressed v2 record batch, as a broker returns it in a fetch."""
    headers, raw_names = _placeholders(records)
    builder = DefaultRecordBatchBuilder(MAGIC_V2, NO_COMPRESSION, 0, -1, -1, -1, 1 << 30)
    for offset, (record, record_headers) in enumerate(zip(records, headers, strict=True)):
        builder.append(offset, base_timestamp_ms + offset, record.key, record.value, record_headers)
    buffer = builder.build()
    put_raw_names(buffer, raw_names)
    struct.pack_into(">q", buffer, 0, base_offset)  # the broker's to set; outside the CRC
    return bytes(buffer)


def gzipped(batch: bytes) -> bytes:
    """``batch`` (uncompressed, v2) with its records gzip-compressed, as a compressing producer sends it."""
    header = bytearray(batch[: DefaultRecordBase.HEADER_STRUCT.size])
    body = gzip_encode(batch[len(header) :])
    (attributes,) = struct.unpack_from(">h", header, DefaultRecordBase.ATTRIBUTES_OFFSET)
    struct.pack_into(
        ">h", header, DefaultRecordBase.ATTRIBUTES_OFFSET, attributes | DefaultRecordBase.CODEC_GZIP
    )
    # Length counts the bytes after itself (after base offset and length).
    struct.pack_into(">i", header, LENGTH_AT, len(header) + len(body) - DefaultRecordBase.AFTER_LEN_OFFSET)
    out = header + body
    fix_crc(out)
    return bytes(out)


async def produce_batch(bootstrap: str, topic: str, partition: int, records: Sequence[RawRecord]) -> None:
    """Produce ``records`` to one partition as ONE record batch, raw header names included."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, max_batch_size=30_000_000, max_request_size=30_000_000
    )
    await producer.start()
    try:
        batch = producer.create_batch()
        headers, raw_names = _placeholders(records)
        for record, record_headers in zip(records, headers, strict=True):
            if (
                batch.append(timestamp=None, key=record.key, value=record.value, headers=record_headers)
                is None
            ):
                raise ValueError("the records do not fit in one batch")
        # The producer sends the buffer it built here (it is built once, then cached).
        put_raw_names(batch._build(), raw_names)
        await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()
