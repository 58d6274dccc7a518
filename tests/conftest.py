"""Shared fixtures: real RaftKV clusters on 127.0.0.1 (see tests/cluster.py).

Every cluster a fixture starts is SIGKILLed at teardown, also when the test
failed or timed out; a failing test's report gets a section with every live
node's log tail.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, str(_ROOT))

from tests.cluster import Cluster, active_clusters, kill_all_processes  # noqa: E402


class ClusterFactory:
    """Makes clusters under one directory and shuts all of them down at teardown."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self._made: list[Cluster] = []

    def __call__(self, n: int = 3, *, sidecar_args=(), engine_args=(), env=None, start: bool = True,
                 name: str | None = None) -> Cluster:
        name = name or f"c{len(self._made) + 1}"
        c = Cluster(self._base / name, sidecar_args=sidecar_args, engine_args=engine_args, env=env, name=name)
        self._made.append(c)
        if start and n:
            c.start(n)
        return c

    def shutdown(self) -> None:
        for c in self._made:
            c.shutdown()


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[ClusterFactory]:
    factory = ClusterFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.shutdown()


@pytest.fixture
def cluster(cluster_factory: ClusterFactory) -> Cluster:
    """A fresh 3-node cluster for one test."""
    return cluster_factory(3)


@pytest.fixture(scope="module")
def module_cluster_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterFactory]:
    factory = ClusterFactory(tmp_path_factory.mktemp("module-cluster"))
    try:
        yield factory
    finally:
        factory.shutdown()


@pytest.fixture(scope="module")
def module_cluster(module_cluster_factory: ClusterFactory) -> Cluster:
    """One 3-node cluster shared by the tests of a module that do not disturb each other."""
    return module_cluster_factory(3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for c in active_clusters():
            try:
                report.sections.append((f"node logs ({c.name})", c.log_tails(60)))
            except Exception as exc:  # noqa: BLE001 - never hide the real failure
                report.sections.append((f"node logs ({c.name})", f"could not read logs: {exc!r}"))


def pytest_sessionfinish(session, exitstatus):
    kill_all_processes()
