"""Fetched record batches that aiokafka cannot parse: a header name that is not UTF-8.

The Kafka protocol makes a header name a UTF-8 string, but the broker does not check it and
librdkafka producers write whatever bytes they are given. aiokafka 0.14 decodes every name with
``bytes.decode("utf-8")`` while ``consumer.getmany`` lazily iterates a fetched batch
(``DefaultRecordBatch._read_msg`` in ``record/_crecords/default_records.pyx``; the pure-Python
parser wraps the same error in ``CorruptRecordException``). Catching that around ``getmany``
cannot be made safe (``Fetcher.fetched_records`` and ``FetchResult.getall`` in
``consumer/fetcher.py``):

* the records of the partitions drained earlier in the same call go down with the exception,
  but their positions have already moved past them: a consumer that carried on would lose them;
* the bad partition never gets past the record, nor hands out the records before it in its
  batch: every later call fetches the batch again and fails on the same record, and the
  exception says neither which partition nor which offset.

So the parse must not fail. aiokafka's fetcher builds each fetched partition's records through a
module global, ``aiokafka.consumer.fetcher.MemoryRecords``; :func:`tolerate_unreadable_header_names`
puts :class:`TolerantRecords` there. Every batch is still parsed by aiokafka's own (C) parser,
behind one Python call per record; only when it fails on a header name is the rest of that one
batch read by :func:`read_records`, which decodes header names with ``surrogateescape``. The
record then reaches lookout's header guard (:func:`stream_worker.codec.frame_from_record`), which
dead-letters it as ``header_name_not_utf8`` with its key, value and headers.

The hook is process-wide (every aiokafka consumer of the process reads such records instead of
dying on them) and rests on aiokafka internals, so installing it checks, on a batch made for the
purpose and through the fetcher's own ``PartitionRecords``, that it works, and refuses to start
otherwise (``tests/unit/test_record_batches.py`` runs the same check).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import aiokafka
from aiokafka import TopicPartition
from aiokafka.codec import gzip_decode, lz4_decode, snappy_decode, zstd_decode
from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecord, DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c

from stream_worker.errors import LookoutError

# Record batch v2 header (Kafka's DefaultRecordBatch): base offset, length, partition leader
# epoch, magic, CRC, attributes, last offset delta, first and max timestamp, producer id and
# epoch, base sequence, record count. The CRC covers everything from the attributes on.
_BATCH_HEADER = struct.Struct(">qiibIhiqqqhii")
_LENGTH_AT = 8  # the batch length field, the same in every magic
_LOG_OVERHEAD = 12  # base offset + length: the bytes the length does not count
_CRC_AT = 17
_ATTRIBUTES_AT = 21
_CODEC_MASK = 0x07
_LOG_APPEND_TIME = 0x08
_DECOMPRESS: dict[int, Callable[[bytes], bytes]] = {
    1: gzip_decode,
    2: snappy_decode,
    3: lz4_decode,
    4: zstd_decode,
}


# --- the fallback reader: pure ------------------------------------------------------------


def read_records(batch: bytes | memoryview, *, after_offset: int = -1) -> Iterator[Any]:
    """The records of one v2 record batch after ``after_offset``, as aiokafka's ``DefaultRecord``.

    Header names are decoded with ``surrogateescape``: a name that is not UTF-8 keeps its bytes
    (``name.encode("utf-8", "surrogateescape")`` gives them back) and cannot be mistaken for a
    valid one (lone surrogates cannot be encoded as UTF-8). Everything else is read as aiokafka
    reads it; a batch that is not well formed raises ``CorruptRecordException``.
    """
    data = bytes(batch)
    try:
        header = _BATCH_HEADER.unpack_from(data)
    except struct.error as exc:
        raise CorruptRecordException(f"record batch header: {exc}") from None
    base_offset, magic, attributes = header[0], header[3], header[5]
    first_timestamp, max_timestamp, count = header[7], header[8], header[12]
    if magic < 2:
        raise CorruptRecordException(f"record batch magic {magic}: headers need magic 2")
    body = data[_BATCH_HEADER.size :]
    codec = attributes & _CODEC_MASK
    if codec:
        if codec not in _DECOMPRESS:
            raise CorruptRecordException(f"record batch compression codec {codec} is unknown")
        body = _DECOMPRESS[codec](body)
    log_append = bool(attributes & _LOG_APPEND_TIME)
    pos = 0
    for _ in range(count):
        length, pos = _varint(body, pos)
        end = pos + length
        _, pos = _varint(body, pos)  # record attributes: unused
        timestamp_delta, pos = _varint(body, pos)
        offset_delta, pos = _varint(body, pos)
        offset = base_offset + offset_delta
        if offset <= after_offset:
            pos = end
            continue
        key, pos = _bytes(body, pos)
        value, pos = _bytes(body, pos)
        header_count, pos = _varint(body, pos)
        headers: list[tuple[str, bytes | None]] = []
        for _ in range(header_count):
            name, pos = _bytes(body, pos)
            if name is None:
                raise CorruptRecordException(f"record at offset {offset}: a header without a name")
            header_value, pos = _bytes(body, pos)
            headers.append((name.decode("utf-8", "surrogateescape"), header_value))
        if pos != end:
            raise CorruptRecordException(
                f"record at offset {offset}: {length} bytes announced, {length + pos - end} read"
            )
        timestamp = max_timestamp if log_append else first_timestamp + timestamp_delta
        yield DefaultRecord(offset, timestamp, int(log_append), key, value, headers)
    if pos != len(body):
        raise CorruptRecordException(f"{len(body) - pos} unconsumed bytes after all records")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A zig-zag varint at ``pos``: its value and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise CorruptRecordException(f"record batch: bad varint at byte {pos}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (value >> 1) ^ -(value & 1), pos
        shift += 7


def _bytes(data: bytes, pos: int) -> tuple[bytes | None, int]:
    """Length-prefixed bytes at ``pos`` (length -1: null)."""
    length, pos = _varint(data, pos)
    if length < 0:
        return None, pos
    if pos + length > len(data):
        raise CorruptRecordException(f"record batch: {length} bytes at byte {pos} run past its end")
    return data[pos : pos + length], pos + length


def _unreadable_header_name(exc: Exception) -> bool:
    """Whether aiokafka's parser failed on a name that is not UTF-8 (C: raised, Python: wrapped)."""
    if isinstance(exc, UnicodeDecodeError):
        return True
    return isinstance(exc, CorruptRecordException) and isinstance(exc.__cause__, UnicodeDecodeError)


# --- the hook -------------------------------------------------------------------------------


class TolerantBatch:
    """One fetched v2 batch: aiokafka's parser, and :func:`read_records` for the rest once it fails.

    Everything but iteration is aiokafka's own batch object.
    """

    __slots__ = ("_batch", "_data", "_end", "_last_offset", "_rest", "_start")

    def __init__(self, batch: Any, data: bytes, start: int, end: int) -> None:
        self._batch = batch
        self._data = data
        self._start, self._end = start, end
        self._last_offset = -1
        self._rest: Iterator[Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def __iter__(self) -> TolerantBatch:
        iter(self._batch)  # decompresses
        return self

    def __next__(self) -> Any:
        rest = self._rest
        if rest is None:
            try:
                record = next(self._batch)
            except (UnicodeDecodeError, CorruptRecordException) as exc:
                if not _unreadable_header_name(exc):
                    raise
                batch = memoryview(self._data)[self._start : self._end]
                self._rest = rest = read_records(batch, after_offset=self._last_offset)
            else:
                self._last_offset = record.offset
                return record
        return next(rest)


class TolerantRecords:
    """aiokafka's ``MemoryRecords`` (one fetched partition's bytes) whose v2 batches are tolerant."""

    __slots__ = ("_data", "_pos", "_records")

    def __init__(self, data: bytes, records_type: Callable[[bytes], Any] = MemoryRecords) -> None:
        self._records = records_type(data)
        self._data = data
        self._pos = 0

    def size_in_bytes(self) -> int:
        """The fetched bytes."""
        return int(self._records.size_in_bytes())

    def has_next(self) -> bool:
        """Whether another whole batch follows."""
        return bool(self._records.has_next())

    def next_batch(self) -> Any:
        """The next batch (None: none left); v2 batches wrapped in :class:`TolerantBatch`."""
        batch = self._records.next_batch()
        if batch is None:
            return None
        start = self._pos
        (length,) = struct.unpack_from(">i", self._data, start + _LENGTH_AT)
        self._pos = start + _LOG_OVERHEAD + length
        if batch.magic < 2:
            return batch  # v0 and v1 records have no headers
        return TolerantBatch(batch, self._data, start, self._pos)


def batch_with_raw_header_name(raw_name: bytes) -> bytes:
    """A v2 batch of three records whose middle one has a header named ``raw_name`` (any bytes)."""
    stand_in = "?" * len(raw_name)
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    builder.append(0, 0, b"k", b"before", [("h", b"1")])
    builder.append(1, 0, b"k", b"unreadable", [(stand_in, b"2")])
    builder.append(2, 0, b"k", b"after", [("h", b"3")])
    buffer = builder.build()
    at = buffer.index(stand_in.encode())
    buffer[at : at + len(raw_name)] = raw_name
    struct.pack_into(">I", buffer, _CRC_AT, calc_crc32c(bytes(buffer[_ATTRIBUTES_AT:])))
    return bytes(buffer)


def check_fetcher_reads_unreadable_header_names() -> None:
    """Raise ``LookoutError`` unless aiokafka's fetcher reads a batch with a non-UTF-8 header name.

    Goes through the fetcher's own ``MemoryRecords`` global and ``PartitionRecords``, with the
    worker's isolation level and CRC checks, so it fails when aiokafka's internals move.
    """
    raw_name = b"cam\xe9ra"
    data = batch_with_raw_header_name(raw_name)
    try:
        partition = fetcher.PartitionRecords(
            tp=TopicPartition("lookout-self-check", 0),
            records=fetcher.MemoryRecords(data),
            aborted_transactions=None,
            fetch_offset=0,
            key_deserializer=None,
            value_deserializer=None,
            check_crcs=True,
            isolation_level=fetcher.READ_COMMITTED,
        )
        records = list(partition)
        got = [(r.offset, r.value, [name for name, _ in r.headers]) for r in records]
    except Exception as exc:
        problem = f"{exc.__class__.__name__}: {exc}"
    else:
        wanted = [
            (0, b"before", ["h"]),
            (1, b"unreadable", [raw_name.decode("utf-8", "surrogateescape")]),
            (2, b"after", ["h"]),
        ]
        if got == wanted:
            return
        problem = f"read {got!r}"
    raise LookoutError(
        f"aiokafka {aiokafka.__version__}: lookout's reader of records with a header name that is "
        f"not UTF-8 does not fit this aiokafka ({problem}); without it one such record stops every "
        "worker of the group: use aiokafka 0.14, which it was written for, or update "
        "stream_worker/record_batches.py"
    )


_installed = False


def tolerate_unreadable_header_names() -> None:
    """Install :class:`TolerantRecords` in aiokafka's fetcher (once per process) and check it works.

    Raises ``LookoutError`` when it does not (the fetcher's internals changed), before any frame
    is consumed.
    """
    global _installed
    if _installed:
        return
    original = fetcher.MemoryRecords
    fetcher.MemoryRecords = TolerantRecords
    try:
        check_fetcher_reads_unreadable_header_names()
    except LookoutError:
        fetcher.MemoryRecords = original
        raise
    _installed = True


__all__ = [
    "TolerantBatch",
    "TolerantRecords",
    "batch_with_raw_header_name",
    "check_fetcher_reads_unreadable_header_names",
    "read_records",
    "tolerate_unreadable_header_names",
]
