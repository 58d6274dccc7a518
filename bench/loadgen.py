"""Closed-loop asyncio/aiohttp load generator for RaftKV, etcd (v3 JSON gateway) and the trivial server.

N clients each send one request, wait for the answer, verify it, and send the next,
for a warm-up and then D measured seconds. Every answer is checked:

- writes: HTTP 200 and body `ok` (RaftKV) / a JSON answer with a `header` (etcd);
- reads (`read` workload): HTTP 200 and the value equals the one preloaded for that key
  (nothing writes during a read run, so the check is exact);
- reads (`mixed` workload): the value must be one some client wrote to that key (or the
  preloaded one); for linearizable reads also not stale: no write W2 to that key may have
  completed before the read began while starting after the write of the returned value
  had completed (a necessary condition of linearizability, checked per read).

    python -m bench.loadgen --backend raftkv --url http://127.0.0.1:8080 --workload write -c 16 -d 10
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import itertools
import json
import math
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import aiohttp
import msgpack

# -- values --------------------------------------------------------------------------------------------


def key_name(i: int) -> str:
    return f"bench-key-{i:06d}"


def make_value(tag: str, size: int) -> str:
    """A `size`-byte ASCII value that starts with `tag` (which makes it unique)."""
    head = f"{tag}|"
    if len(head) >= size:
        return head          # never cut the unique tag
    filler = "abcdefghijklmnopqrstuvwxyz0123456789"
    reps = (size - len(head)) // len(filler) + 1
    return head + (filler * reps)[: size - len(head)]


def preload_value(key: str, size: int, generation: int = 0) -> str:
    return make_value(f"pre{generation}:{key}", size)


# -- backends -----------------------------------------------------------------------------------------

_DIGITS = re.compile(r"\d+")


def _kind(prefix: str, status: int | None, body: str = "") -> str:
    """An error kind: digits blurred so that similar messages group together."""
    text = _DIGITS.sub("#", body.strip().replace("\n", " "))[:90]
    return f"{prefix} {status}: {text}" if status is not None else f"{prefix}: {text}"


class OpError(Exception):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind)
        self.kind = kind
        self.detail = detail


class NotFound(Exception):
    pass


class RaftKVBackend:
    """The original's API: POST /insert-val (msgpack SET), GET /get-val?key=K&consistency=C."""

    name = "raftkv"
    consistencies = ("linearizable", "leader", "local")

    async def write(self, session: aiohttp.ClientSession, url: str, key: str, value: str) -> None:
        body = msgpack.packb({"op": "SET", "key": key, "value": value})
        async with session.post(f"{url}/insert-val", data=body,
                                headers={"Content-Type": "application/msgpack"}) as resp:
            text = await resp.text()
            if resp.status != 200 or text != "ok":
                raise OpError(_kind("write", resp.status, text), text[:300])

    async def read(self, session: aiohttp.ClientSession, url: str, key: str, consistency: str) -> str:
        async with session.get(f"{url}/get-val", params={"key": key, "consistency": consistency}) as resp:
            text = await resp.text()
            if resp.status == 200:
                return text
            if resp.status == 404 and text == "Key Not Found":
                raise NotFound()
            raise OpError(_kind("read", resp.status, text), text[:300])


class EtcdBackend:
    """etcd's v3 JSON gateway: POST /v3/kv/put and /v3/kv/range with base64 keys and values."""

    name = "etcd"
    consistencies = ("linearizable", "local")   # local = serializable range

    @staticmethod
    def _b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    async def write(self, session: aiohttp.ClientSession, url: str, key: str, value: str) -> None:
        doc = {"key": self._b64(key), "value": self._b64(value)}
        async with session.post(f"{url}/v3/kv/put", json=doc) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise OpError(_kind("write", resp.status, text), text[:300])
            try:
                ok = "header" in json.loads(text)
            except ValueError:
                ok = False
            if not ok:
                raise OpError(_kind("write bad answer", resp.status, text), text[:300])

    async def read(self, session: aiohttp.ClientSession, url: str, key: str, consistency: str) -> str:
        if consistency not in self.consistencies:
            raise ValueError(f"etcd has no {consistency!r} read")
        doc: dict = {"key": self._b64(key)}
        if consistency == "local":
            doc["serializable"] = True
        async with session.post(f"{url}/v3/kv/range", json=doc) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise OpError(_kind("read", resp.status, text), text[:300])
            try:
                kvs = json.loads(text).get("kvs") or []
            except ValueError:
                raise OpError(_kind("read bad answer", resp.status, text), text[:300]) from None
            if not kvs:
                raise NotFound()
            return base64.b64decode(kvs[0].get("value", "")).decode()


BACKENDS = {"raftkv": RaftKVBackend, "etcd": EtcdBackend, "trivial": RaftKVBackend}


def backend_for(name: str):
    return BACKENDS[name]()


# -- results ------------------------------------------------------------------------------------------


def percentile(sorted_ms: list[float], p: float) -> float | None:
    if not sorted_ms:
        return None
    idx = max(0, math.ceil(p / 100.0 * len(sorted_ms)) - 1)
    return sorted_ms[idx]


@dataclass
class OpStats:
    ok: int = 0
    latencies_ms: list = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)

    def summary(self, duration: float) -> dict:
        lat = sorted(self.latencies_ms)
        return {
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            "ops_per_s": round(self.ok / duration, 1) if duration > 0 else None,
            "p50_ms": _r(percentile(lat, 50)),
            "p99_ms": _r(percentile(lat, 99)),
            "max_ms": _r(lat[-1] if lat else None),
            "over_1s": sum(1 for x in lat if x > 1000.0),
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


@dataclass
class LoadSpec:
    workload: str = "write"              # write | read | mixed
    concurrency: int = 16
    duration: float = 10.0
    warmup: float = 2.0
    keys: int = 1000
    value_size: int = 100
    read_ratio: float = 0.5              # mixed: share of reads
    consistency: str = "linearizable"    # linearizable | leader | local
    timeout: float = 10.0
    seed: int = 1


# -- the history check for mixed runs -------------------------------------------------------------


class History:
    """Per key: every value written (with start/end times) and the completed writes in
    completion order, with the running maximum of their start times."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, tuple[float, float | None]]] = {}
        self.acked_end: dict[str, list[float]] = {}
        self.acked_prefmax_start: dict[str, list[float]] = {}

    def known(self, key: str, value: str) -> None:
        self.values.setdefault(key, {})[value] = (-math.inf, -math.inf)

    def started(self, key: str, value: str, t: float) -> None:
        self.values.setdefault(key, {})[value] = (t, None)

    def acked(self, key: str, value: str, t: float) -> None:
        start = self.values[key][value][0]
        self.values[key][value] = (start, t)
        ends = self.acked_end.setdefault(key, [])
        pm = self.acked_prefmax_start.setdefault(key, [])
        ends.append(t)                       # acks are recorded in time order (one event loop)
        pm.append(max(start, pm[-1]) if pm else start)

    def check_read(self, key: str, value: str, t0: float, t1: float, linearizable: bool) -> str | None:
        w = self.values.get(key, {}).get(value)
        if w is None:
            return "verify: read a value never written to that key"
        w_start, w_end = w
        if w_start > t1:
            return "verify: read a value whose write started after the read ended"
        if linearizable and w_end is not None:
            ends = self.acked_end.get(key, [])
            i = bisect.bisect_left(ends, t0)        # writes acknowledged before the read began
            if i > 0 and self.acked_prefmax_start[key][i - 1] > w_end:
                return "verify: stale linearizable read (a newer write had completed before the read began)"
        return None


# -- the generator --------------------------------------------------------------------------------


async def preload(backend_name: str, urls: list[str], keys: int, value_size: int, concurrency: int = 32,
                  generation: int = 0, timeout: float = 15.0, tries: int = 5) -> dict[str, str]:
    """Writes a known value to every key (retrying failures); returns key -> value."""
    backend = backend_for(backend_name)
    expected = {key_name(i): preload_value(key_name(i), value_size, generation) for i in range(keys)}
    todo = list(expected)
    rr = itertools.count()
    failures: Counter = Counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def worker():
            while todo:
                key = todo.pop()
                for attempt in range(tries):
                    try:
                        await backend.write(session, urls[next(rr) % len(urls)], key, expected[key])
                        break
                    except (OpError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                        failures[getattr(exc, "kind", type(exc).__name__)] += 1
                        if attempt == tries - 1:
                            raise RuntimeError(f"preload of {key} failed {tries} times: {failures}") from exc
                        await asyncio.sleep(0.2 * (attempt + 1))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return expected


async def run_load(backend_name: str, urls: list[str], spec: LoadSpec,
                   expected: dict[str, str] | None = None) -> dict:
    """Runs one closed-loop load and returns its summary (see module docstring)."""
    if spec.workload not in ("write", "read", "mixed"):
        raise ValueError(spec.workload)
    backend = backend_for(backend_name)
    if spec.workload != "write" and spec.consistency not in backend.consistencies:
        raise ValueError(f"{backend_name} has no {spec.consistency} reads")
    if spec.workload in ("read", "mixed") and expected is None:
        raise ValueError("read and mixed workloads need preloaded keys (expected=)")
    keys = [key_name(i) for i in range(spec.keys)]
    history = History()
    if expected:
        for k, v in expected.items():
            history.known(k, v)
    rng = random.Random(spec.seed)
    rr = itertools.count()
    stats = {"write": OpStats(), "read": OpStats()}
    warm_errors: Counter = Counter()
    examples: dict[str, str] = {}
    per_second: Counter = Counter()
    slow_ops: list[dict] = []
    ok_all = [0]                      # successful operations including warm-up and drain
    loop = asyncio.get_running_loop()
    t_begin = loop.time()
    t_warm = t_begin + spec.warmup
    t_end = t_warm + spec.duration
    lin = spec.consistency == "linearizable"

    def record(op: str, t0: float, t1: float, error: str | None, url: str, detail: str = "") -> None:
        measured = t_warm <= t0 and t1 <= t_end
        if error is None:
            ok_all[0] += 1
        if error is not None:
            if measured:
                stats[op].errors[error] += 1
            else:
                warm_errors[error] += 1
            examples.setdefault(error, f"{url}: {detail}"[:400])
            return
        if not measured:
            return
        ms = (t1 - t0) * 1000.0
        st = stats[op]
        st.ok += 1
        st.latencies_ms.append(ms)
        per_second[int(t1 - t_warm)] += 1
        if ms > 1000.0 and len(slow_ops) < 20:
            slow_ops.append({"op": op, "url": url, "at_s": round(t0 - t_warm, 3), "ms": round(ms, 1)})

    async def client(cid: int, session: aiohttp.ClientSession) -> None:
        seq = 0
        while True:
            t0 = loop.time()
            if t0 >= t_end:
                return
            url = urls[next(rr) % len(urls)]
            key = keys[rng.randrange(len(keys))]
            if spec.workload == "write":
                op = "write"
            elif spec.workload == "read":
                op = "read"
            else:
                op = "read" if rng.random() < spec.read_ratio else "write"
            error = None
            detail = ""
            try:
                if op == "write":
                    seq += 1
                    value = make_value(f"c{cid}.{seq}", spec.value_size)
                    history.started(key, value, t0)
                    await backend.write(session, url, key, value)
                    history.acked(key, value, loop.time())
                else:
                    try:
                        value = await backend.read(session, url, key, spec.consistency)
                    except NotFound:
                        error = "verify: key not found (it was preloaded)"
                    else:
                        t1 = loop.time()
                        if spec.workload == "read":
                            if value != expected[key]:
                                error = "verify: wrong value"
                                detail = f"key {key}: got {value[:60]!r}, expected {expected[key][:60]!r}"
                        else:
                            error = history.check_read(key, value, t0, t1, lin)
                            if error:
                                detail = f"key {key}: got {value[:60]!r}"
            except OpError as exc:
                error, detail = exc.kind, exc.detail
            except asyncio.TimeoutError:
                error = f"{op} timeout after {spec.timeout:g}s"
            except aiohttp.ClientError as exc:
                error = f"{op} connection: {type(exc).__name__}"
                detail = str(exc)
            record(op, t0, loop.time(), error, url, detail)
            if error is not None and error.startswith(f"{op} connection"):
                await asyncio.sleep(0.05)        # do not spin on a refused connection

    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=spec.timeout)) as session:
        await asyncio.gather(*(client(i, session) for i in range(spec.concurrency)))
    wall = loop.time() - t_begin

    total = OpStats()
    for st in stats.values():
        total.ok += st.ok
        total.latencies_ms.extend(st.latencies_ms)
        total.errors.update(st.errors)
    out = {
        "backend": backend_name,
        "spec": asdict(spec),
        "urls": urls,
        **total.summary(spec.duration),
        "errors_by_kind": dict(total.errors.most_common()),
        "warmup_errors_by_kind": dict(warm_errors.most_common()),
        "error_examples": examples,
        "per_second_ok": [per_second.get(i, 0) for i in range(int(math.ceil(spec.duration)))],
        "slow_ops_over_1s": slow_ops,
        "wall_s": round(wall, 2),
        "ok_all": ok_all[0],
    }
    if spec.workload == "mixed":
        out["by_op"] = {op: st.summary(spec.duration) for op, st in stats.items()}
    return out


def run_load_sync(backend_name: str, urls: list[str], spec: LoadSpec,
                  expected: dict[str, str] | None = None) -> dict:
    return asyncio.run(run_load(backend_name, urls, spec, expected))


def preload_sync(backend_name: str, urls: list[str], keys: int, value_size: int, **kw) -> dict[str, str]:
    return asyncio.run(preload(backend_name, urls, keys, value_size, **kw))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=sorted(BACKENDS), default="raftkv")
    ap.add_argument("--url", action="append", required=True,
                    help="base URL of a node; repeat for round-robin over several")
    ap.add_argument("--workload", choices=["write", "read", "mixed"], default="write")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("-d", "--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--read-ratio", type=float, default=0.5)
    ap.add_argument("--consistency", choices=["linearizable", "leader", "local"], default="linearizable")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--no-preload", action="store_true", help="reads: assume keys were preloaded already")
    args = ap.parse_args(argv)
    spec = LoadSpec(args.workload, args.concurrency, args.duration, args.warmup, args.keys, args.value_size,
                    args.read_ratio, args.consistency, args.timeout)
    expected = None
    if args.workload != "write":
        if args.no_preload:
            expected = {key_name(i): preload_value(key_name(i), args.value_size) for i in range(args.keys)}
        else:
            expected = preload_sync(args.backend, args.url[:1], args.keys, args.value_size)
    res = run_load_sync(args.backend, args.url, spec, expected)
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
