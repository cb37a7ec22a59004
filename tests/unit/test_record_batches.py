"""Fetched record batches with a header name that is not UTF-8 (stream_worker.record_batches).

No broker: the batches are the bytes a broker returns in a fetch, made with aiokafka's own
builder and a raw name put in afterwards, read the way aiokafka's fetcher reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException, KafkaError
from aiokafka.record import memory_records
from aiokafka.record.default_records import _DefaultRecordBatchPy
from aiokafka.record.memory_records import MemoryRecords, _MemoryRecordsPy

from stream_worker.record_batches import (
    TolerantRecords,
    check_fetcher_reads_unreadable_header_names,
    read_records,
    tolerate_unreadable_header_names,
)
from tests.support.raw_records import RawRecord, batch_bytes, gzipped

RAW_NAME = b"cam\xe9ra-name"  # "caméra-name" in Latin-1
READ_NAME = RAW_NAME.decode("utf-8", "surrogateescape")


@pytest.fixture(params=["c", "python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Callable[[bytes], Any]:
    """aiokafka's C parser (the default), or its pure-Python one (AIOKAFKA_NO_EXTENSIONS=1)."""
    records: Callable[[bytes], Any] = MemoryRecords
    if request.param == "python":
        monkeypatch.setattr(memory_records, "DefaultRecordBatch", _DefaultRecordBatchPy)
        records = _MemoryRecordsPy
    return records


def good(n: int) -> RawRecord:
    return RawRecord(b"cam-1", f"frame {n}".encode(), [("frame-id", f"f{n}".encode()), ("caméra", None)])


BAD = RawRecord(b"cam-1", b"frame with an unreadable header", [("frame-id", b"bad"), (RAW_NAME, b"north")])


def fetch(*batches: bytes) -> bytes:
    """Several batches back to back, as in one partition's fetch response."""
    return b"".join(batches)


def read_all(records: Any) -> list[Any]:
    """Every record of every batch, as the fetcher's PartitionRecords iterates them."""
    out: list[Any] = []
    while records.has_next():
        out.extend(records.next_batch())
    return out


# --- what aiokafka does alone --------------------------------------------------------------


def test_aiokafka_alone_still_cannot_read_it(parser: Callable[[bytes], Any]) -> None:
    # If this fails, aiokafka has changed how it reads header names: see whether
    # stream_worker/record_batches.py is still needed, and what the check below says.
    with pytest.raises((UnicodeDecodeError, CorruptRecordException)) as caught:
        read_all(parser(batch_bytes([good(0), BAD, good(2)])))
    error = caught.value
    # The C parser raises it as such (no KafkaError: the worker died), the Python one wraps it.
    assert isinstance(error if isinstance(error, UnicodeDecodeError) else error.__cause__, UnicodeDecodeError)


def test_the_fetcher_reads_it_once_the_hook_is_installed() -> None:
    # The start-up check, through aiokafka's own PartitionRecords: it fails when the fetcher's
    # internals move (a module global renamed, PartitionRecords' arguments changed, ...).
    tolerate_unreadable_header_names()
    assert fetcher.MemoryRecords is TolerantRecords
    check_fetcher_reads_unreadable_header_names()
    tolerate_unreadable_header_names()  # a second install changes nothing
    assert fetcher.MemoryRecords is TolerantRecords


# --- the tolerant reader -------------------------------------------------------------------


@pytest.mark.parametrize("compress", [bytes, gzipped], ids=["plain", "gzip"])
def test_every_record_of_the_fetch_is_read_in_order_and_the_bad_name_keeps_its_bytes(
    parser: Callable[[bytes], Any], compress: Callable[[bytes], bytes]
) -> None:
    data = fetch(
        compress(batch_bytes([good(0), good(1)], base_offset=0)),
        compress(batch_bytes([good(2), BAD, good(4), good(5)], base_offset=2)),
        compress(batch_bytes([good(6)], base_offset=6)),
    )
    records = read_all(TolerantRecords(data, parser))

    assert [r.offset for r in records] == list(range(7))
    assert [r.value for r in records] == [
        *(f"frame {n}".encode() for n in range(3)),
        BAD.value,
        *(f"frame {n}".encode() for n in range(4, 7)),
    ]
    bad = records[3]
    assert (bad.key, bad.headers) == (b"cam-1", [("frame-id", b"bad"), (READ_NAME, b"north")])
    assert READ_NAME.encode("utf-8", "surrogateescape") == RAW_NAME
    assert all(
        r.headers == [("frame-id", f"f{r.offset}".encode()), ("caméra", None)]
        for r in records
        if r is not bad
    )


@pytest.mark.parametrize("compress", [bytes, gzipped], ids=["plain", "gzip"])
def test_the_fallback_reads_a_batch_exactly_as_aiokafka_does(compress: Callable[[bytes], bytes]) -> None:
    records = [
        good(0),
        RawRecord(None, None, []),
        RawRecord(b"", b"", [("a", b""), ("a", None), ("ü", b"\xff")]),
        good(3),
    ]
    data = compress(batch_bytes(records, base_offset=40, base_timestamp_ms=1_790_000_000_000))

    def fields(record: Any) -> tuple[Any, ...]:
        return (
            record.offset,
            record.timestamp,
            record.timestamp_type,
            record.key,
            record.value,
            record.headers,
        )

    expected = [fields(r) for r in read_all(MemoryRecords(data))]
    assert [fields(r) for r in read_records(data)] == expected
    assert [fields(r) for r in read_records(data, after_offset=41)] == expected[2:]


def test_a_batch_broken_otherwise_is_still_aiokafkas_error() -> None:
    # Only an unreadable name is read past; anything else stays a KafkaError for the worker.
    data = bytearray(batch_bytes([good(0), good(1)]))
    data[-3:] = b"\xff\xff\xff"  # the last record's header value runs past the batch
    with pytest.raises(KafkaError):
        read_all(TolerantRecords(bytes(data)))
    with pytest.raises(CorruptRecordException):
        list(read_records(bytes(data)))
