"""The backup file format (raftkv/backup.py): round trips, and every kind of damage
a reader must refuse with a BackupError that names the problem."""
from __future__ import annotations

import hashlib
import io

import msgpack
import pytest

from raftkv import backup
from raftkv.backup import MAGIC, BackupError, BackupReader

RECORDS = [
    (b"", b"empty key", 1, 1, 1),
    (b"\x00\xff binary", b"\x00\x01\xff", 2, 9, 4),
    ("ключ".encode(), "значение".encode(), 3, 3, 1),
    (b"empty-value", b"", 5, 5, 1),
    (b"k" * 300, b"v" * 100_000, 7, 8, 2),
]


def encoded(records=RECORDS, **kw) -> bytes:
    return b"".join(backup.encode(records, kw.pop("applied_index", 42), kw.pop("revision", 9),
                                  kw.pop("node", "node-1"), created=1700000000.5, **kw))


def read_all(data: bytes) -> tuple[backup.BackupHeader, list[tuple]]:
    header, records = backup.read(io.BytesIO(data))
    return header, [(r.key, r.value, r.create_revision, r.mod_revision, r.version) for r in records]


def with_trailer(body: bytes, count: int | None = None, sha: str | None = None, **extra) -> bytes:
    """`body` (magic + header + records) with a trailer computed for it, optionally wrong."""
    trailer = {"end": True, "count": count, "sha256": sha or hashlib.sha256(body).hexdigest(), **extra}
    return body + msgpack.packb(trailer)


def body_of(header: dict, records: list) -> bytes:
    return MAGIC + msgpack.packb(header) + b"".join(msgpack.packb(list(r)) for r in records)


HEADER = {"format": 1, "created": 1.0, "applied_index": 3, "revision": 4, "node": "n"}


# -- round trips -----------------------------------------------------------------------------

def test_round_trip_of_header_and_records():
    header, records = read_all(encoded())
    assert header == backup.BackupHeader(1, 1700000000.5, 42, 9, "node-1")
    assert records == RECORDS


def test_layout_is_magic_header_records_trailer():
    data = encoded()
    assert data.startswith(b"RKVBKUP1\n")
    objs = list(msgpack.Unpacker(io.BytesIO(data[len(MAGIC):]), raw=False))
    assert objs[0] == {"format": 1, "created": 1700000000.5, "applied_index": 42, "revision": 9, "node": "node-1"}
    assert [tuple(o) for o in objs[1:-1]] == RECORDS
    trailer = objs[-1]
    assert trailer["end"] is True and trailer["count"] == len(RECORDS)
    assert trailer["sha256"] == hashlib.sha256(data[: len(data) - len(msgpack.packb(trailer))]).hexdigest()


def test_empty_backup():
    header, records = read_all(encoded([]))
    assert records == [] and header.revision == 9


def test_many_records_in_chunks_stream_and_read_in_small_blocks(monkeypatch):
    recs = [(b"key-%06d" % i, b"x" * (i % 50), i + 1, i + 1, 1) for i in range(5000)]
    chunks = list(backup.encode(recs, 1, 5000, "n", chunk_records=1000))
    assert len(chunks) == 1 + 5 + 1          # header, 5 record chunks, trailer
    monkeypatch.setattr(backup, "READ_BLOCK", 7)   # objects split across reads
    _, got = read_all(b"".join(chunks))
    assert got == recs


def test_write_to_a_file_and_verify(tmp_path):
    path = tmp_path / "b.rkv"
    with open(path, "wb") as f:
        assert backup.write(f, RECORDS, 42, 9, "node-1", created=1.0, chunk_records=2) == len(RECORDS)
    header, count = backup.verify(str(path))
    assert count == len(RECORDS) and header.applied_index == 42
    assert path.read_bytes() == b"".join(backup.encode(RECORDS, 42, 9, "node-1", chunk_records=2, created=1.0))


def test_encoder_pieces_match_encode():
    enc = backup.BackupEncoder(42, 9, "node-1", created=1700000000.5)
    data = enc.begin() + enc.records(RECORDS[:2]) + enc.records(RECORDS[2:]) + enc.end()
    assert data == encoded() and enc.count == len(RECORDS)


# -- damage ------------------------------------------------------------------------------------

def expect_error(data: bytes, words: str) -> None:
    with pytest.raises(BackupError, match=words):
        read_all(data)


@pytest.mark.parametrize("data", [b"", b"RKVBKUP", b"RKVBKUP2\n" + encoded()[9:], b"PK\x03\x04 a zip file"])
def test_bad_magic(data):
    expect_error(data, "not a RaftKV backup")


def test_unknown_format():
    expect_error(with_trailer(body_of({**HEADER, "format": 2}, []), 0), "unsupported backup format 2")
    expect_error(with_trailer(body_of({k: v for k, v in HEADER.items() if k != "format"}, []), 0),
                 "unsupported backup format None")


def test_header_missing_a_field_or_not_a_map():
    expect_error(with_trailer(body_of({k: v for k, v in HEADER.items() if k != "revision"}, []), 0),
                 "bad header.*revision")
    expect_error(MAGIC + msgpack.packb([1, 2]), "bad header: expected a map")


def test_count_mismatch():
    body = body_of(HEADER, RECORDS)
    expect_error(with_trailer(body, len(RECORDS) + 1), f"count mismatch.*{len(RECORDS) + 1}.*{len(RECORDS)}")
    expect_error(with_trailer(body, None), "count mismatch")


def test_sha256_mismatch():
    body = body_of(HEADER, RECORDS)
    expect_error(with_trailer(body, len(RECORDS), sha="0" * 64), "sha256 mismatch")


def test_every_truncation_is_detected():
    data = encoded(RECORDS[:4])
    for size in range(len(data)):
        with pytest.raises(BackupError):
            read_all(data[:size])


def test_truncation_at_a_record_boundary_names_the_missing_trailer():
    data = body_of(HEADER, RECORDS)
    expect_error(data, "truncated.*5 records; no trailer")


def test_every_single_byte_flip_is_detected():
    data = encoded(RECORDS[:4])
    for i in range(len(data)):
        corrupt = bytearray(data)
        corrupt[i] ^= 0x41
        with pytest.raises(BackupError):
            read_all(bytes(corrupt))


def test_bytes_after_the_trailer():
    expect_error(encoded() + b"\x00", "trailing bytes after the trailer")
    expect_error(encoded() + encoded(), "trailing bytes after the trailer")


@pytest.mark.parametrize("record, words", [
    ([b"k", b"v", 1, 1], "bad record 1"),
    ([b"k", b"v", 1, 1, 1, 1], "bad record 1"),
    (["str key", b"v", 1, 1, 1], "bad record 1"),
    ([b"k", b"v", -1, 1, 1], "bad record 1"),
    ([b"k", b"v", 1.5, 1, 1], "bad record 1"),
    ([b"k", b"v", True, 1, 1], "bad record 1"),
    (b"just bytes", "bad record 1"),
])
def test_ill_formed_records(record, words):
    body = MAGIC + msgpack.packb(HEADER) + msgpack.packb(record, use_bin_type=True)
    expect_error(with_trailer(body, 1), words)


def test_a_map_that_is_not_a_trailer():
    body = body_of(HEADER, RECORDS[:1])
    expect_error(body + msgpack.packb({"count": 1}), "bad trailer after 1 records")


def test_records_are_yielded_before_the_end_is_verified():
    """Streaming: a consumer sees records as they come; damage at the end still raises."""
    body = body_of(HEADER, RECORDS)
    reader = BackupReader(io.BytesIO(with_trailer(body, 99)))
    seen = []
    with pytest.raises(BackupError, match="count mismatch"):
        for r in reader:
            seen.append(r.key)
    assert seen == [r[0] for r in RECORDS]


def test_an_absurd_length_prefix_is_refused_not_allocated():
    # a bin32 claiming 4 GiB
    body = MAGIC + msgpack.packb(HEADER) + b"\x95\xc6\xff\xff\xff\xff"
    expect_error(body + b"\x00" * (backup.READ_BLOCK * 2), "truncated|corrupt")
