"""Start-up checks of the engine's LevelDB directory: refuse, naming the file, rather than start wrong.

LevelDB opened the way the store opens it (create_if_missing, no paranoid checks) does three
silent things on a damaged directory, each of which would make this node serve wrong data:
- without a CURRENT file it creates a new, empty database over the old files (and later
  deletes them as obsolete);
- it skips a corrupt record in the middle of its write-ahead log and keeps the records after
  it; the applied raft index is stored in the same batch as the data, so the stored index then
  claims entries whose data is gone, and the sidecar never resends them;
- an iterator over a table file that does not open (truncated, overwritten) just ends early
  (plyvel does not surface the error), so the store would load part of its data.

`check_engine_data_dir` runs before the store opens the database. It checks CURRENT, the
manifest it names and every table file's footer and index block itself (so the message can
name the file), then opens the database once with paranoid checks (a corrupt log record is
refused instead of skipped; a torn tail, which a crash leaves, is still accepted) and reads
every block with checksums verified. Missing or empty directory: a fresh store, which is
safe: the sidecar fills it from the Raft log or a snapshot.
"""
from __future__ import annotations

import logging
import os
import re
import struct
import time
from dataclasses import dataclass

import plyvel

log = logging.getLogger(__name__)

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5           # 1 byte compression type + 4 bytes masked crc32c
NO_COMPRESSION, SNAPPY = 0, 1
_CRC_MASK_DELTA = 0xA282EAD8
_CURRENT_RE = re.compile(rb"^MANIFEST-(\d+)\n$")
_FILE_RE = re.compile(r"(\d{6,}\.(?:log|ldb|sst)|MANIFEST-\d+)")
_DATA_FILE_RE = re.compile(r"^(\d+\.(log|ldb|sst)|MANIFEST-\d+|CURRENT)$")
# How much pure-Python checksumming the search for a bad data block may do (it only runs after
# LevelDB already found one; it only decides which file to name).
LOCATE_BUDGET_SECONDS = 60.0

RECOVERY = ("The engine's data cannot be trusted. Recovery: stop this node, move {path} aside (keep it "
            "for inspection), and start the node again with its Raft data dir intact: the sidecar "
            "rebuilds the engine from the Raft log or a snapshot. If the Raft data is gone too: "
            "/leave the node, wipe both, start it with -join (docs/recovery.md).")


class EngineDataDirError(Exception):
    """The engine's data directory must not be opened; the message names the file."""


@dataclass(frozen=True)
class DataDirReport:
    path: str
    fresh: bool         # no database yet (the sidecar fills it)
    tables: int = 0
    keys: int = 0       # records read by the verification scan
    seconds: float = 0.0


def check_engine_data_dir(path: str, scan: bool = True) -> DataDirReport:
    """Refuses (EngineDataDirError) a LevelDB directory that would open wrong; see the module doc.

    `scan` reads every record with checksums verified (the only way to find a corrupt data
    block before serving from it); it costs about one extra load of the store."""
    started = time.monotonic()
    target = path
    if not os.path.lexists(path) and os.path.isdir(path + ".old"):
        target = path + ".old"  # an interrupted snapshot restore; the store moves it back
    if not os.path.lexists(target):
        return DataDirReport(path, fresh=True)
    if not os.path.isdir(target):
        raise EngineDataDirError(f"engine data dir {target} exists but is not a directory; refusing to start")
    try:
        names = sorted(os.listdir(target))
    except OSError as exc:
        raise EngineDataDirError(f"cannot list the engine data dir {target}: {exc}; refusing to start") from None
    data_files = [n for n in names if _DATA_FILE_RE.match(n)]
    if not data_files:
        return DataDirReport(path, fresh=True)
    manifest = _check_current(target, names, data_files)
    tables = [os.path.join(target, n) for n in names if n.endswith((".ldb", ".sst"))]
    for table in tables:
        _check_table(table)
    logs = [n for n in names if n.endswith(".log")]
    keys = _open_and_scan(target, manifest, logs, tables, scan)
    report = DataDirReport(path, fresh=False, tables=len(tables), keys=keys,
                           seconds=time.monotonic() - started)
    log.info("engine data dir %s checked: %d table files, %d records verified in %.2fs",
             target, report.tables, report.keys, report.seconds)
    return report


# -- CURRENT and the manifest -----------------------------------------------------------------
def _check_current(target: str, names: list[str], data_files: list[str]) -> str:
    """Returns the path of the manifest CURRENT names."""
    current = os.path.join(target, "CURRENT")
    if "CURRENT" not in names:
        raise EngineDataDirError(
            f"{current} is missing but {target} holds LevelDB files ({', '.join(data_files[:6])}): LevelDB "
            f"would start an empty database over them; refusing to start. " + RECOVERY.format(path=target))
    try:
        with open(current, "rb") as f:
            raw = f.read(256)
    except OSError as exc:
        raise EngineDataDirError(f"cannot read {current}: {exc}; refusing to start") from None
    m = _CURRENT_RE.match(raw)
    if m is None:
        raise EngineDataDirError(f"{current} is corrupt (holds {raw[:40]!r}, expected 'MANIFEST-<number>\\n'); "
                                 f"refusing to start. " + RECOVERY.format(path=target))
    manifest = os.path.join(target, raw[:-1].decode())
    if not os.path.isfile(manifest) or os.path.getsize(manifest) == 0:
        state = "missing" if not os.path.exists(manifest) else "empty"
        raise EngineDataDirError(f"{manifest} (named by {current}) is {state}; refusing to start. "
                                 + RECOVERY.format(path=target))
    return manifest


# -- table files ------------------------------------------------------------------------------------
def _check_table(table: str) -> None:
    """Footer magic, block handles in range, index block checksum: a table that fails these would
    be skipped silently by an iteration."""
    try:
        with open(table, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < FOOTER_SIZE:
                raise _bad(table, f"only {size} bytes, shorter than a table footer (truncated)")
            f.seek(size - FOOTER_SIZE)
            footer = f.read(FOOTER_SIZE)
            (magic,) = struct.unpack_from("<Q", footer, FOOTER_SIZE - 8)
            if magic != TABLE_MAGIC:
                raise _bad(table, "bad magic number at its end (truncated or overwritten)")
            try:
                meta_off, pos = _varint(footer, 0)
                meta_len, pos = _varint(footer, pos)
                index_off, pos = _varint(footer, pos)
                index_len, pos = _varint(footer, pos)
            except IndexError:
                raise _bad(table, "unreadable footer") from None
            limit = size - FOOTER_SIZE
            for what, off, ln in (("metaindex", meta_off, meta_len), ("index", index_off, index_len)):
                if off + ln + BLOCK_TRAILER_SIZE > limit:
                    raise _bad(table, f"{what} block at {off}+{ln} lies past the end of the file (truncated)")
            _read_block(f, table, index_off, index_len, "index")
    except OSError as exc:
        raise EngineDataDirError(f"cannot read {table}: {exc}; refusing to start") from None


def _bad(table: str, what: str) -> EngineDataDirError:
    target = os.path.dirname(table)
    return EngineDataDirError(f"LevelDB table {table} is corrupt: {what}; refusing to start. "
                              + RECOVERY.format(path=target))


def _read_block(f, table: str, offset: int, length: int, what: str) -> bytes:
    """The block's contents (decompressed), after verifying its checksum."""
    f.seek(offset)
    raw = f.read(length + BLOCK_TRAILER_SIZE)
    if len(raw) != length + BLOCK_TRAILER_SIZE:
        raise _bad(table, f"{what} block at offset {offset} is cut short")
    kind = raw[length]
    (stored,) = struct.unpack_from("<I", raw, length + 1)
    if _unmask(stored) != crc32c(raw[:length + 1]):
        raise _bad(table, f"{what} block at offset {offset} fails its checksum")
    if kind == NO_COMPRESSION:
        return raw[:length]
    if kind == SNAPPY:
        try:
            return snappy_decompress(raw[:length])
        except (ValueError, IndexError):
            raise _bad(table, f"{what} block at offset {offset} does not decompress") from None
    raise _bad(table, f"{what} block at offset {offset} has unknown compression type {kind}")


def _block_handles(index: bytes) -> list[tuple[int, int]]:
    """The (offset, size) values of an index block's entries."""
    if len(index) < 4:
        raise ValueError("index block too short")
    (restarts,) = struct.unpack_from("<I", index, len(index) - 4)
    end = len(index) - 4 - 4 * restarts
    handles, pos = [], 0
    while pos < end:
        _shared, pos = _varint(index, pos)
        non_shared, pos = _varint(index, pos)
        value_len, pos = _varint(index, pos)
        pos += non_shared
        off, p = _varint(index, pos)
        ln, _ = _varint(index, p)
        handles.append((off, ln))
        pos += value_len
    return handles


def locate_bad_block(tables: list[str], budget: float = LOCATE_BUDGET_SECONDS) -> str | None:
    """'<file>: data block at offset N fails its checksum' for the first bad block, or None
    (not found within `budget` seconds)."""
    deadline = time.monotonic() + budget
    for table in sorted(tables, key=lambda t: -os.path.getmtime(t) if os.path.exists(t) else 0):
        try:
            with open(table, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(size - FOOTER_SIZE)
                footer = f.read(FOOTER_SIZE)
                _, pos = _varint(footer, 0)
                _, pos = _varint(footer, pos)
                index_off, pos = _varint(footer, pos)
                index_len, _ = _varint(footer, pos)
                for off, ln in _block_handles(_read_block(f, table, index_off, index_len, "index")):
                    if time.monotonic() > deadline:
                        return None
                    _read_block(f, table, off, ln, "data")
        except EngineDataDirError as exc:
            return str(exc).split("; refusing", 1)[0]
        except (OSError, ValueError, IndexError, struct.error) as exc:
            return f"LevelDB table {table} is unreadable: {exc!r}"
    return None


# -- opening ----------------------------------------------------------------------------------------
def _open_and_scan(target: str, manifest: str, logs: list[str], tables: list[str], scan: bool) -> int:
    log_file = os.path.join(target, "LOG")
    try:
        db = plyvel.DB(target, create_if_missing=False, paranoid_checks=True)
    except plyvel.Error as exc:
        reason = _reason(exc)
        if "lock" in reason.lower():
            raise EngineDataDirError(f"the engine data dir {target} is in use by another process ({reason}); "
                                     f"refusing to start") from None
        involved = _files_from_leveldb_log(log_file)
        if "descriptor" in reason or "manifest" in reason.lower():
            where = f" in the manifest {manifest}"
        elif involved:
            where = f" (LevelDB's log: {'; '.join(involved)})"
        else:  # LevelDB names no file: its recovery reads the manifest first, then the logs
            where = f" in the manifest {manifest} or the write-ahead logs {logs}"
        raise EngineDataDirError(f"LevelDB refused to open {target}: {reason}{where}; refusing to start. "
                                 + RECOVERY.format(path=target)) from None
    keys = 0
    try:
        if scan:
            try:
                for _ in db.iterator(include_value=False, verify_checksums=True, fill_cache=False):
                    keys += 1
            except plyvel.Error as exc:
                where = locate_bad_block(tables) or f"one of the table files {[os.path.basename(t) for t in tables]}"
                raise EngineDataDirError(f"LevelDB store {target} is corrupt ({_reason(exc)}): {where}; "
                                         f"refusing to start. " + RECOVERY.format(path=target)) from None
    finally:
        db.close()
    return keys


def _reason(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else exc
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)


def _files_from_leveldb_log(log_file: str) -> list[str]:
    """Lines of LevelDB's own LOG (rewritten at every open) that name a file and a problem."""
    try:
        with open(log_file, "r", errors="replace") as f:
            lines = f.read().splitlines()[-200:]
    except OSError:
        return []
    out = []
    for line in lines:
        if _FILE_RE.search(line) and ("orrupt" in line or "error" in line.lower() or "dropping" in line):
            text = line.split(" ", 2)[-1].strip()   # drop LevelDB's timestamp and thread id
            if text not in out:
                out.append(text)
    return out[:5]


# -- formats ----------------------------------------------------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), the checksum LevelDB uses; pure Python (~12 MB/s), used on small blocks."""
    table = _CRC_TABLE
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _unmask(masked: int) -> int:
    rot = (masked - _CRC_MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def snappy_decompress(buf: bytes) -> bytes:
    """Raw snappy (no framing), as LevelDB compresses its blocks."""
    n, pos = _varint(buf, 0)
    out = bytearray()
    size = len(buf)
    while pos < size:
        tag = buf[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:
            ln = tag >> 2
            if ln >= 60:
                extra = ln - 59
                ln = int.from_bytes(buf[pos:pos + extra], "little")
                pos += extra
            ln += 1
            if pos + ln > size:
                raise ValueError("literal past the end")
            out += buf[pos:pos + ln]
            pos += ln
            continue
        if kind == 1:
            ln = ((tag >> 2) & 7) + 4
            off = ((tag >> 5) << 8) | buf[pos]
            pos += 1
        elif kind == 2:
            ln = (tag >> 2) + 1
            off = int.from_bytes(buf[pos:pos + 2], "little")
            pos += 2
        else:
            ln = (tag >> 2) + 1
            off = int.from_bytes(buf[pos:pos + 4], "little")
            pos += 4
        if off == 0 or off > len(out):
            raise ValueError("copy offset out of range")
        if off >= ln:
            start = len(out) - off
            out += out[start:start + ln]
        else:
            for _ in range(ln):
                out.append(out[-off])
    if len(out) != n:
        raise ValueError(f"decompressed {len(out)} bytes, expected {n}")
    return bytes(out)
