"""storage_engine.datadir: a damaged LevelDB dir is refused naming the file; a healthy, missing,
empty or crash-torn one is accepted. Real LevelDB directories, no processes."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import plyvel
import pytest

from storage_engine.datadir import (EngineDataDirError, check_engine_data_dir, crc32c, snappy_decompress)


def build(path: Path, n: int, compact: bool) -> Path:
    db = plyvel.DB(str(path), create_if_missing=True)
    for i in range(n):
        db.put(b"d/k%06d" % i, os.urandom(40) + b"v" * 60)
    if compact:
        db.compact_range()
    db.close()
    return path


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("tables") / "db", 20000, compact=True)


@pytest.fixture(scope="module")
def wal(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("wal") / "db", 5000, compact=False)


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "kv.db"
    shutil.copytree(src, dst)
    return dst


def one(db: Path, pattern: str) -> Path:
    return sorted(p for p in db.glob(pattern) if p.stat().st_size > 0)[-1]


def garble_mid(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 3
    data[mid:mid + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


def test_missing_and_empty_dirs_are_fresh(tmp_path: Path) -> None:
    assert check_engine_data_dir(str(tmp_path / "nope")).fresh
    (tmp_path / "empty").mkdir()
    assert check_engine_data_dir(str(tmp_path / "empty")).fresh


def test_healthy_stores_pass_and_every_record_is_read(tables: Path, wal: Path, tmp_path: Path) -> None:
    assert check_engine_data_dir(str(copy(tables, tmp_path / "a"))).keys == 20000
    assert check_engine_data_dir(str(copy(wal, tmp_path / "b"))).keys == 5000


def test_a_torn_log_tail_is_what_a_crash_leaves_and_is_accepted(wal: Path, tmp_path: Path) -> None:
    db = copy(wal, tmp_path)
    log = one(db, "*.log")
    log.write_bytes(log.read_bytes()[:-20])
    assert check_engine_data_dir(str(db)).keys == 4999


@pytest.mark.parametrize("damage, source, pattern, words", [
    ("log-mid", "wal", "*.log", "checksum mismatch"),
    ("ldb-truncated", "tables", "*.ldb", "bad magic number"),
    ("ldb-empty", "tables", "*.ldb", "shorter than a table footer"),
    ("ldb-random", "tables", "*.ldb", "bad magic number"),
    ("ldb-mid", "tables", "*.ldb", "fails its checksum"),
    ("manifest-garbage", "wal", "MANIFEST-*", "manifest"),
    ("manifest-empty", "wal", "MANIFEST-*", "is empty"),
    ("current-garbage", "wal", "CURRENT", "CURRENT is corrupt"),
    ("current-missing", "tables", "CURRENT", "CURRENT is missing"),
    ("ldb-missing", "tables", "*.ldb", "missing files"),
])
def test_damage_is_refused_naming_the_file(request, damage: str, source: str, pattern: str, words: str,
                                           tmp_path: Path) -> None:
    db = copy(request.getfixturevalue(source), tmp_path)
    target = db / "CURRENT" if pattern == "CURRENT" else one(db, pattern)
    if damage == "log-mid" or damage == "ldb-mid":
        garble_mid(target)
    elif damage == "ldb-truncated":
        target.write_bytes(target.read_bytes()[:-20])
    elif damage == "ldb-empty" or damage == "manifest-empty":
        target.write_bytes(b"")
    elif damage == "ldb-random":
        target.write_bytes(os.urandom(target.stat().st_size))
    elif damage == "manifest-garbage":
        target.write_bytes(b"\x00garbage" * 20)
    elif damage == "current-garbage":
        target.write_bytes(b"nonsense")
    else:
        target.unlink()
    with pytest.raises(EngineDataDirError) as err:
        check_engine_data_dir(str(db))
    text = str(err.value)
    assert str(target) in text and words in text and "refusing to start" in text, text


def test_a_file_in_place_of_the_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kv.db").write_text("x")
    with pytest.raises(EngineDataDirError, match="not a directory"):
        check_engine_data_dir(str(tmp_path / "kv.db"))


def test_crc32c_and_snappy_match_their_references() -> None:
    assert crc32c(b"123456789") == 0xE3069283                   # the CRC-32C check value
    # snappy: varint length 11, literal "abcd", copy(offset 4, length 7) -> "abcdabcdabc"
    assert snappy_decompress(bytes([11, 3 << 2]) + b"abcd" + bytes([((7 - 4) << 2) | 1, 4])) == b"abcdabcdabc"
    with pytest.raises(ValueError):
        snappy_decompress(bytes([5, 0]) + b"a" + bytes([((4 - 4) << 2) | 1, 9]))
