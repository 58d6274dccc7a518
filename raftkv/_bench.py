"""`raftkv bench`: a closed-loop load against a running cluster through the client library.

Each of `concurrency` workers sends one request, waits for the answer, sends the next, for
`duration` seconds after a warm-up. Every answer is checked (a read must return the value
that was written for its key); errors are counted by their type. This measures what an
application using raftkv.AsyncClient gets, retries and all. The comparison with etcd and the
raw ceilings is the repository's benchmark suite (bench/README.md, `raftkv bench --suite`).
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from .client import AsyncClient

WORKLOADS = ("write", "read", "mixed")


@dataclass(frozen=True)
class BenchSpec:
    workload: str = "write"
    concurrency: int = 16
    duration: float = 10.0
    warmup: float = 1.0
    keys: int = 1000
    value_size: int = 100
    read_ratio: float = 0.5
    consistency: str = "linearizable"
    prefix: str = "bench/"


@dataclass
class BenchResult:
    spec: BenchSpec
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ops_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float | None:
        if not self.latencies_ms:
            return None
        s = sorted(self.latencies_ms)
        return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]

    def to_json(self) -> dict[str, Any]:
        r = lambda x: None if x is None else round(x, 3)  # noqa: E731
        return {"workload": self.spec.workload, "concurrency": self.spec.concurrency,
                "duration_s": round(self.seconds, 3), "ok": self.ok, "errors": sum(self.errors.values()),
                "errors_by_kind": dict(self.errors), "ops_per_s": round(self.ops_per_s, 1),
                "p50_ms": r(self.percentile(50)), "p99_ms": r(self.percentile(99)),
                "max_ms": r(max(self.latencies_ms) if self.latencies_ms else None),
                "keys": self.spec.keys, "value_size": self.spec.value_size}


def _key(spec: BenchSpec, i: int) -> str:
    return f"{spec.prefix}{i:08d}"


def _value(tag: str, size: int) -> bytes:
    v = tag.encode()
    return (v + b"." * max(0, size - len(v)))[:max(size, len(v))]


async def run(client: AsyncClient, spec: BenchSpec,
              progress: Callable[[str, float, float | None, str], None] | None = None) -> BenchResult:
    if spec.workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}")
    expected: dict[str, bytes] = {}
    if spec.workload != "write":
        # Every key once with a known value, so that reads can be checked.
        sem = asyncio.Semaphore(max(1, spec.concurrency))
        loaded = 0

        async def load(i: int) -> None:
            nonlocal loaded
            async with sem:
                k, v = _key(spec, i), _value(f"pre-{i}", spec.value_size)
                await client.put(k, v)
                expected[k] = v
                loaded += 1
                if progress:
                    progress("preload", loaded, spec.keys, "")
        await asyncio.gather(*(load(i) for i in range(spec.keys)))
    result = BenchResult(spec)
    t_start = time.monotonic()
    t_measure = t_start + spec.warmup
    t_end = t_measure + spec.duration
    counter = 0
    rng = random.Random()

    async def worker(w: int) -> None:
        nonlocal counter
        while True:
            now = time.monotonic()
            if now >= t_end:
                return
            i = rng.randrange(spec.keys)
            k = _key(spec, i)
            write = spec.workload == "write" or (spec.workload == "mixed" and rng.random() >= spec.read_ratio)
            t0 = time.monotonic()
            try:
                if write:
                    counter += 1
                    v = _value(f"w{w}-{counter}", spec.value_size)
                    await client.put(k, v)
                    expected[k] = v
                else:
                    before = expected.get(k)
                    got = await client.get(k, consistency=spec.consistency)
                    if spec.workload == "read" and got.value != before:
                        raise AssertionError("wrong value")
                ok, kind = True, ""
            except AssertionError:
                ok, kind = False, "wrong value"
            except Exception as exc:  # noqa: BLE001 - counted by type
                ok, kind = False, type(exc).__name__
            t1 = time.monotonic()
            if t0 >= t_measure and t1 <= t_end:
                if ok:
                    result.ok += 1
                    result.latencies_ms.append((t1 - t0) * 1000.0)
                else:
                    result.errors[kind] += 1

    async def report() -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if progress:
                phase = "warm-up" if now < t_measure else "bench"
                done = max(0.0, now - t_measure) if now >= t_measure else now - t_start
                total = spec.duration if now >= t_measure else spec.warmup
                progress(phase, done, total, f"{result.ok:,} ok, {sum(result.errors.values())} errors")

    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*(worker(w) for w in range(spec.concurrency)))
    finally:
        reporter.cancel()
    result.seconds = spec.duration
    return result
