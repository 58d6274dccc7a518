"""The engine and the sidecar choose gRPC's endpoints before grpc is imported.

GRPC_EXPERIMENTS is read once, when grpc's core starts, so the setting only takes
effect if it is in the environment by the time `grpc` is first imported. Each
case runs in a fresh interpreter that records the variable at that moment.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from raftkv.grpc_env import IOMGR_ENDPOINTS

_PROBE = r"""
import builtins, importlib, os, sys
seen = []
real_import = builtins.__import__
def probe(name, *args, **kwargs):
    if (name == "grpc" or name.startswith("grpc.")) and not seen:
        seen.append(os.environ.get("GRPC_EXPERIMENTS", "<unset>"))
    return real_import(name, *args, **kwargs)
builtins.__import__ = probe
importlib.import_module(sys.argv[1])
print(seen[0] if seen else "<grpc never imported>")
"""


def _experiments_when_grpc_loads(module: str, env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if env_value is not None:
        env["GRPC_EXPERIMENTS"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE, module], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("module", ["storage_engine.__main__", "raft_sidecar.__main__"])
def test_iomgr_endpoints_are_set_before_grpc_loads(module: str) -> None:
    assert _experiments_when_grpc_loads(module, None) == IOMGR_ENDPOINTS


@pytest.mark.parametrize("module", ["storage_engine.__main__", "raft_sidecar.__main__"])
def test_operator_setting_wins(module: str) -> None:
    assert _experiments_when_grpc_loads(module, "-tcp_rcv_lowat") == "-tcp_rcv_lowat"
