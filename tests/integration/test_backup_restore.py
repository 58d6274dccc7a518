"""Backup and restore from the user's side, at size: 100,000 keys.

A 3-node cluster is loaded through txns, saved with `raftkv backup FILE`, restored with
`raftkv restore FILE` into a fresh 3-node cluster, and both are compared by a checksum over
a full scan. Then damaged copies of the file (a flipped bit, a cut-off end, a wrong magic,
bytes after the trailer, a wrong count) are refused with a clear error and change nothing.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest

import raftkv
from raftkv import backup as backup_format
from raftkv import cli
from tests.cluster import ROOT, Cluster

pytestmark = pytest.mark.timeout(900)

KEYS = 100_000
TXN = 500


def raftkv_cli(c: Cluster, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTKV_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "raftkv", *args,
                           "--nodes", ",".join(n.http_url for n in c.nodes),
                           "--mgmt", ",".join(n.mgmt_url for n in c.nodes)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def client(c: Cluster) -> raftkv.Client:
    return raftkv.Client([n.http_url for n in c.nodes], [n.mgmt_url for n in c.nodes])


def checksum(kv: raftkv.Client) -> tuple[int, str]:
    """(keys, sha256 over every key and value in scan order), framed so that no two
    different contents hash alike."""
    h = hashlib.sha256()
    n = 0
    for page in kv.scan_pages(page_size=10000):
        for item in page.kvs:
            h.update(len(item.key).to_bytes(4, "big") + item.key)
            h.update(len(item.value).to_bytes(4, "big") + item.value)
            n += 1
    return n, h.hexdigest()


def load(kv: raftkv.Client, keys: int) -> None:
    def txn(start: int) -> None:
        kv.txn([raftkv.PutOp(f"user/{i:07d}".encode(),
                             hashlib.blake2b(str(i).encode(), digest_size=16).digest() + b"-" + str(i).encode() * 3)
                for i in range(start, min(start + TXN, keys))])
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(txn, range(0, keys, TXN)))
    # Binary keys and values, an empty value, a large one.
    kv.put(b"\x00\xff\xfe binary key", bytes(range(256)))
    kv.put(b"empty", b"")
    kv.put(b"large", os.urandom(200_000))


def test_backup_100k_keys_restore_into_a_fresh_cluster(cluster_factory, tmp_path: Path):
    src = cluster_factory(3, name="source")
    kv = client(src)
    t0 = time.monotonic()
    load(kv, KEYS)
    t_load = time.monotonic() - t0
    source_sum = checksum(kv)
    assert source_sum[0] == KEYS + 3

    f = tmp_path / "cluster.rkvb"
    t0 = time.monotonic()
    b = raftkv_cli(src, "backup", str(f), cwd=tmp_path)
    t_backup = time.monotonic() - t0
    assert b.returncode == 0, b.stderr
    assert b.stdout.startswith(f"wrote {f}: {KEYS + 3:,} keys"), b.stdout
    header, count = backup_format.verify(str(f))
    assert count == KEYS + 3 and header.revision >= KEYS // TXN

    dst = cluster_factory(3, name="fresh")
    t0 = time.monotonic()
    r = raftkv_cli(dst, "restore", str(f), cwd=tmp_path)
    t_restore = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert f"restored {KEYS + 3:,} keys" in r.stdout and f"now holds {KEYS + 3:,} keys" in r.stdout, r.stdout
    restored = client(dst)
    assert checksum(restored) == source_sum, "the restored cluster differs from the source"
    # Every node of the new cluster holds the data (its own copy, no barrier).
    for n in dst.nodes:
        with raftkv.Client([n.http_url]) as one:
            assert one.get(b"user/0099999", consistency="leader").value.endswith(b"99999" * 3)
    print(f"\n{b.stdout.strip()}\n{r.stdout.strip()}")
    print(f"{KEYS:,} keys: load {t_load:.1f} s, backup {t_backup:.1f} s "
          f"({f.stat().st_size / 1e6:.1f} MB), restore {t_restore:.1f} s (incl. verification)")

    # -- damaged files: refused with a clear error, nothing written (--force: emptiness is
    # not what stops them) --------------------------------------------------------------------
    data = f.read_bytes()
    trailer_at = len(data) - len(msgpack.packb({"end": True, "count": count,
                                                "sha256": hashlib.sha256(data[:1]).hexdigest()}))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    wrong_count = data[:trailer_at] + msgpack.packb(
        {"end": True, "count": count + 1, "sha256": hashlib.sha256(data[:trailer_at]).hexdigest()})
    assert backup_format.MAGIC == data[:len(backup_format.MAGIC)]
    cases = {
        "flipped bit": (bytes(flipped), "sha256 mismatch|corrupt|bad record"),
        "cut off": (data[: len(data) * 2 // 3], "truncated|corrupt"),
        "wrong magic": (b"NOTABKUP\n" + data[9:], "not a RaftKV backup"),
        "trailing bytes": (data + b"\x00", "trailing bytes"),
        "wrong count": (wrong_count, "count mismatch"),
        "empty file": (b"", "not a RaftKV backup"),
    }
    for name, (content, expect) in cases.items():
        bad = tmp_path / f"bad-{name.replace(' ', '-')}.rkvb"
        bad.write_bytes(content)
        p = raftkv_cli(dst, "restore", str(bad), "--force", cwd=tmp_path)
        assert p.returncode == cli.EXIT_BACKUP, f"{name}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
        assert p.stderr.startswith("raftkv restore: bad backup file: "), f"{name}: {p.stderr}"
        assert re.search(expect, p.stderr), f"{name}: {p.stderr}"
        assert p.stdout == ""
    assert checksum(restored) == source_sum, "a refused restore changed the cluster"
    kv.close()
    restored.close()
