"""The live view's key names (stream_worker.live_keys): a dead frame's key never becomes a key name."""

from __future__ import annotations

import pytest

from stream_worker.live_keys import NO_KEY, LiveKeys, dead_frame_identity


def test_a_record_keyed_by_a_valid_source_id_counts_under_that_source() -> None:
    assert dead_frame_identity(b"cam-north") == "cam-north"
    assert LiveKeys("lookout").stats(dead_frame_identity(b"cam-north")) == "lookout:live:stats:cam-north"


@pytest.mark.parametrize(
    "key",
    [
        b"x" * 100_000,  # a megabyte-sized key would have become a megabyte-sized key name
        b"a" * 201,  # one character longer than a source id may be
        b"\xff\xfe not utf-8",
        b"has spaces and \n newlines",
        b"_looks-like-ours",
    ],
)
def test_any_other_key_counts_under_a_short_hash_of_itself(key: bytes) -> None:
    identity = dead_frame_identity(key)
    assert identity.startswith("_key:") and len(identity) == len("_key:") + 16
    assert identity == dead_frame_identity(bytes(key))  # the same key, the same counter
    assert identity != dead_frame_identity(key + b"!")


@pytest.mark.parametrize("key", [None, b""])
def test_a_record_without_a_key_counts_under_one_name(key: bytes | None) -> None:
    assert dead_frame_identity(key) == NO_KEY


def test_every_identity_fits_in_200_characters() -> None:
    for key in (b"a" * 200, b"b" * 10**6, b"\x00" * 300, None):
        assert len(dead_frame_identity(key)) <= 200
