"""The RaftKV backup file: written by the engine (GET /v1/backup), read by `raftkv restore`.

Layout: the magic `RKVBKUP1\\n`, then a msgpack stream: a header map {"format": 1,
"created", "applied_index", "revision", "node"}, one array per key [key (bin),
value (bin), create_revision, mod_revision, version] in key order, and a trailer
map {"end": true, "count", "sha256"} where sha256 is the hex digest of every byte
before the trailer. Both sides stream: memory does not grow with the key count.
A reader checks everything it can (magic, format, record shapes, count, digest,
nothing after the trailer) and raises BackupError naming what is wrong.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

import msgpack

MAGIC = b"RKVBKUP1\n"
FORMAT = 1
READ_BLOCK = 1 << 16
# The largest object a reader accepts (a record with a 1 MiB value and its key
# fits many times over); a corrupt length prefix cannot make it allocate more.
MAX_OBJECT_BYTES = 64 << 20


class BackupError(Exception):
    """The file is not a complete, intact RaftKV backup; the message says why."""


@dataclass(frozen=True)
class BackupHeader:
    format: int
    created: float
    applied_index: int
    revision: int
    node: str


@dataclass(frozen=True, slots=True)
class BackupRecord:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int


RecordTuple = tuple[bytes, bytes, int, int, int]


class BackupEncoder:
    """Turns records into the file's bytes piece by piece, hashing as it goes (for streaming)."""

    def __init__(self, applied_index: int, revision: int, node: str, created: float | None = None) -> None:
        self.header = BackupHeader(FORMAT, time.time() if created is None else created,
                                   applied_index, revision, node)
        self.count = 0
        self._sha = hashlib.sha256()
        self._packer = msgpack.Packer(use_bin_type=True)

    def _out(self, data: bytes) -> bytes:
        self._sha.update(data)
        return data

    def begin(self) -> bytes:
        h = self.header
        return self._out(MAGIC + self._packer.pack({
            "format": h.format, "created": h.created, "applied_index": h.applied_index,
            "revision": h.revision, "node": h.node}))

    def records(self, records: Iterable[RecordTuple]) -> bytes:
        pack = self._packer.pack
        parts = []
        for key, value, create, mod, version in records:
            parts.append(pack([key, value, create, mod, version]))
        self.count += len(parts)
        return self._out(b"".join(parts))

    def end(self) -> bytes:
        return self._packer.pack({"end": True, "count": self.count, "sha256": self._sha.hexdigest()})


def encode(records: Iterable[RecordTuple], applied_index: int, revision: int, node: str,
           chunk_records: int = 1000, created: float | None = None) -> Iterator[bytes]:
    """The whole file as a stream of byte chunks of about `chunk_records` records each."""
    enc = BackupEncoder(applied_index, revision, node, created)
    yield enc.begin()
    batch: list[RecordTuple] = []
    for rec in records:
        batch.append(rec)
        if len(batch) >= chunk_records:
            yield enc.records(batch)
            batch = []
    if batch:
        yield enc.records(batch)
    yield enc.end()


def write(f: BinaryIO, records: Iterable[RecordTuple], applied_index: int, revision: int,
          node: str, created: float | None = None, chunk_records: int = 1000) -> int:
    """Writes a backup to a binary file; returns the number of records."""
    enc = BackupEncoder(applied_index, revision, node, created)
    f.write(enc.begin())
    batch: list[RecordTuple] = []
    for rec in records:
        batch.append(rec)
        if len(batch) >= chunk_records:
            f.write(enc.records(batch))
            batch = []
    f.write(enc.records(batch))
    f.write(enc.end())
    return enc.count


class BackupReader:
    """Reads and verifies a backup from a binary stream, record by record.

    The header is read (and checked) on construction; iterate for BackupRecords.
    The count and digest can only be checked at the trailer, so a consumer must
    iterate to the end before trusting what it read (restore writes as it reads,
    then reports a corrupt file as an error)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._sha = hashlib.sha256()
        self._buf = bytearray()      # bytes read but not yet hashed (the object being parsed)
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_OBJECT_BYTES,
                                          strict_map_key=True)
        self._fed = 0                # bytes fed to the unpacker
        self._hashed = 0             # offset (in the unpacker's stream) hashed so far
        self.count = 0
        self.trailer: dict | None = None
        magic = _read_exact(f, len(MAGIC))
        if magic != MAGIC:
            raise BackupError(f"not a RaftKV backup: bad magic {magic[:16]!r} (expected {MAGIC!r})")
        self._sha.update(magic)
        header = self._next("the header")
        if not isinstance(header, dict):
            raise BackupError(f"bad header: expected a map, got {type(header).__name__}")
        fmt = header.get("format")
        if fmt != FORMAT:
            raise BackupError(f"unsupported backup format {fmt!r} (this reader knows format {FORMAT})")
        try:
            self.header = BackupHeader(FORMAT, float(header["created"]), int(header["applied_index"]),
                                       int(header["revision"]), str(header["node"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BackupError(f"bad header: missing or ill-typed field {exc}") from None

    def _next(self, what: str) -> object:
        """The next msgpack object, with the bytes before it hashed; EOF -> BackupError."""
        while True:
            try:
                obj = self._unpacker.unpack()
            except msgpack.OutOfData:
                block = self._f.read(READ_BLOCK)
                if not block:
                    raise BackupError(f"truncated: the file ends before {what} "
                                      f"(after {self.count} records; no trailer)") from None
                try:
                    self._unpacker.feed(block)
                except msgpack.BufferFull:
                    raise BackupError(f"corrupt data reading {what} after {self.count} records: an object "
                                      f"larger than {MAX_OBJECT_BYTES} bytes") from None
                self._buf += block
                self._fed += len(block)
                continue
            except (ValueError, msgpack.UnpackException) as exc:
                raise BackupError(f"corrupt data reading {what} after {self.count} records: {exc}") from None
            end = self._unpacker.tell()
            self._pending = end   # where this object ends; hashed once known not to be the trailer
            return obj

    def _hash_through_pending(self) -> None:
        n = self._pending - self._hashed
        self._sha.update(memoryview(self._buf)[:n])
        del self._buf[:n]
        self._hashed = self._pending

    def __iter__(self) -> Iterator[BackupRecord]:
        self._hash_through_pending()  # the header
        while True:
            obj = self._next(f"record {self.count + 1} or the trailer")
            if isinstance(obj, dict):
                self._check_trailer(obj)
                return
            self._hash_through_pending()
            if not (isinstance(obj, list) and len(obj) == 5 and isinstance(obj[0], bytes)
                    and isinstance(obj[1], bytes) and all(type(x) is int and x >= 0 for x in obj[2:])):
                raise BackupError(f"bad record {self.count + 1}: expected [key (bin), value (bin), "
                                  f"create_revision, mod_revision, version], got {_describe(obj)}")
            self.count += 1
            yield BackupRecord(obj[0], obj[1], obj[2], obj[3], obj[4])

    def _check_trailer(self, t: dict) -> None:
        if t.get("end") is not True:
            raise BackupError(f"bad trailer after {self.count} records: {_describe(t)}")
        digest = self._sha.hexdigest()
        if t.get("count") != self.count:
            raise BackupError(f"count mismatch: the trailer says {t.get('count')!r} records, "
                              f"the file holds {self.count}")
        if t.get("sha256") != digest:
            raise BackupError(f"sha256 mismatch: the trailer says {t.get('sha256')!r}, "
                              f"the content hashes to {digest}")
        extra = self._fed - self._unpacker.tell()
        if extra == 0:
            extra = len(self._f.read(1))
        if extra:
            raise BackupError("trailing bytes after the trailer")
        self.trailer = t


def read(f: BinaryIO) -> tuple[BackupHeader, Iterator[BackupRecord]]:
    """The header, and the records (verified at the end of the iteration)."""
    r = BackupReader(f)
    return r.header, iter(r)


def verify(path: str) -> tuple[BackupHeader, int]:
    """Reads a whole backup file; returns its header and record count, or raises BackupError."""
    with open(path, "rb") as f:
        r = BackupReader(f)
        for _ in r:
            pass
        return r.header, r.count


def _read_exact(f: BinaryIO, n: int) -> bytes:
    out = b""
    while len(out) < n:
        block = f.read(n - len(out))
        if not block:
            break
        out += block
    return out


def _describe(obj: object) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."
