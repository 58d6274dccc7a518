"""Tests for the command-line configuration of both processes.

storage_engine.config: the original's positional `HTTP_PORT GRPC_PORT SIDECAR_PORT DB_PATH`
plus long options. raft_sidecar.config: the original's Go-style flags (`-id x`,
`-raft=9000`, `-bootstrap`), which argparse would otherwise misread.
"""

from __future__ import annotations

import socket

import pytest

from raft_sidecar import config as sidecar
from storage_engine import config as engine

POSITIONAL = ["8080", "50051", "50052", "kv.db"]


# -- storage engine --------------------------------------------------------------------

def test_engine_positional_form_gives_the_defaults():
    cfg = engine.parse_args(POSITIONAL)
    assert cfg == engine.EngineConfig()
    assert (cfg.http_port, cfg.grpc_port, cfg.sidecar_port, cfg.db_path) == (8080, 50051, 50052, "kv.db")
    assert cfg.http_host == "0.0.0.0"
    assert cfg.grpc_host == "127.0.0.1" and cfg.sidecar_host == "127.0.0.1"
    assert cfg.max_key_bytes == 4096 and cfg.max_value_bytes == 1 << 20
    assert cfg.propose_timeout == 5.0 and cfg.read_timeout == 5.0
    assert cfg.max_inflight_writes == 4096
    assert cfg.apply_audit is None
    assert cfg.log_level == "INFO"


def test_engine_positional_values_are_used():
    cfg = engine.parse_args(["9001", "9002", "9003", "/data/node2.db"])
    assert (cfg.http_port, cfg.grpc_port, cfg.sidecar_port, cfg.db_path) == (9001, 9002, 9003, "/data/node2.db")
    assert cfg.sidecar_target == "127.0.0.1:9003"


def test_engine_options():
    cfg = engine.parse_args(POSITIONAL + [
        "--http-host", "127.0.0.2", "--grpc-host", "0.0.0.0", "--sidecar-host", "10.1.2.3",
        "--max-key-bytes", "100", "--max-value-bytes", "2000", "--propose-timeout", "1.5",
        "--read-timeout", "2.5", "--max-inflight-writes", "7", "--apply-audit", "/tmp/audit",
        "--log-level", "debug", "--batch-window-ms", "2.5", "--batch-wait-min", "3",
    ])
    assert cfg.batch_window == 0.0025 and cfg.batch_wait_min == 3
    assert cfg.http_host == "127.0.0.2"
    assert cfg.grpc_host == "0.0.0.0"
    assert cfg.sidecar_target == "10.1.2.3:50052"
    assert cfg.max_key_bytes == 100 and cfg.max_value_bytes == 2000
    assert cfg.max_body_bytes == 2000 + 100 + engine.BODY_OVERHEAD_BYTES
    assert cfg.propose_timeout == 1.5 and cfg.read_timeout == 2.5
    assert cfg.max_inflight_writes == 7
    assert cfg.apply_audit == "/tmp/audit"
    assert cfg.log_level == "DEBUG"


def test_engine_options_may_come_before_positionals():
    cfg = engine.parse_args(["--max-key-bytes", "10", "1", "2", "3", "db"])
    assert cfg.max_key_bytes == 10 and cfg.http_port == 1 and cfg.db_path == "db"


def test_engine_environment_defaults_and_override():
    env = {"ENGINE_HTTP_HOST": "192.168.0.1", "LOG_LEVEL": "warning"}
    cfg = engine.parse_args(POSITIONAL, env)
    assert cfg.http_host == "192.168.0.1" and cfg.log_level == "WARNING"
    cfg = engine.parse_args(POSITIONAL + ["--http-host", "1.1.1.1", "--log-level", "error"], env)
    assert cfg.http_host == "1.1.1.1" and cfg.log_level == "ERROR"


def test_engine_port_bounds_are_accepted():
    cfg = engine.parse_args(["0", "65535", "1", "db"])
    assert (cfg.http_port, cfg.grpc_port, cfg.sidecar_port) == (0, 65535, 1)


@pytest.mark.parametrize("ports", [
    ["65536", "50051", "50052"],
    ["8080", "70000", "50052"],
    ["8080", "50051", "-1"],
    ["http", "50051", "50052"],
    ["8080", "50051", "5.5"],
    ["8080", "", "50052"],
])
def test_engine_bad_port_is_a_usage_error(ports, capsys):
    with pytest.raises(SystemExit) as info:
        engine.parse_args(ports + ["kv.db"])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    [],
    ["8080", "50051", "50052"],
    POSITIONAL + ["extra"],
    POSITIONAL + ["--max-value-bytes", "0"],
    POSITIONAL + ["--max-key-bytes", "-5"],
    POSITIONAL + ["--no-such-option"],
    POSITIONAL + ["--batch-window-ms", "-1"],
    POSITIONAL + ["--batch-wait-min", "0"],
])
def test_engine_bad_command_line_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        engine.parse_args(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err


# -- sidecar: defaults ---------------------------------------------------------------------

def test_sidecar_defaults():
    cfg = sidecar.parse_args([])
    assert cfg.node_id == "node1"
    assert cfg.raft_port == 8088
    assert cfg.grpc_port == 50052
    assert cfg.app_addr == "localhost:50051"
    assert cfg.mgmt_port == 6000
    assert cfg.bootstrap is False
    assert cfg.data_dir == "raft-data"
    assert cfg.join_addr == ""
    assert cfg.cluster_token is None
    assert cfg.bind_host == "0.0.0.0" and cfg.grpc_host == "127.0.0.1"
    assert cfg.log_level == "INFO"
    assert (cfg.raft_min_timeout, cfg.raft_max_timeout) == (1.0, 2.0)
    assert cfg.journal_file == "raft-data/raft.journal"
    assert cfg.dump_file == "raft-data/raft.dump"
    assert cfg.members_file == "raft-data/members.json"
    assert cfg.apply_batch_delay == 0.02


def test_sidecar_default_advertise_is_the_hostname_with_the_raft_port():
    assert sidecar.parse_args([]).advertise == f"{socket.gethostname()}:8088"
    assert sidecar.parse_args(["-raft", "9100"]).advertise == f"{socket.gethostname()}:9100"


def test_sidecar_default_advertise_uses_a_specific_bind_host():
    assert sidecar.parse_args(["-bind-host", "10.0.0.7"]).advertise == "10.0.0.7:8088"
    assert sidecar.parse_args([], {"BIND_HOST": "10.0.0.8"}).advertise == "10.0.0.8:8088"
    assert sidecar.parse_args(["--bind-host", "::"]).advertise == f"{socket.gethostname()}:8088"


# -- sidecar: Go-style flags ---------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["-id", "node7"],
    ["--id", "node7"],
    ["-id=node7"],
    ["--id=node7"],
])
def test_sidecar_id_flag_forms(argv):
    assert sidecar.parse_args(argv).node_id == "node7"


@pytest.mark.parametrize("argv", [["-raft=9000"], ["-raft", "9000"], ["--raft", "9000"], ["--raft=9000"]])
def test_sidecar_raft_flag_forms(argv):
    cfg = sidecar.parse_args(argv)
    assert cfg.raft_port == 9000
    assert cfg.advertise.endswith(":9000")


def test_sidecar_original_command_line():
    cfg = sidecar.parse_args(["-id", "node2", "-raft", "8089", "-srv", "50062", "-app", "localhost:50061",
                              "-mgmt", "6001", "-data", "raft-node2", "-join", "node1:6000"])
    assert cfg.node_id == "node2"
    assert cfg.raft_port == 8089
    assert cfg.grpc_port == 50062
    assert cfg.app_addr == "localhost:50061"
    assert cfg.mgmt_port == 6001
    assert cfg.data_dir == "raft-node2"
    assert cfg.join_addr == "node1:6000"
    assert cfg.bootstrap is False


@pytest.mark.parametrize("argv, expected", [
    (["-bootstrap"], True),
    (["--bootstrap"], True),
    (["-bootstrap=true"], True),
    (["-bootstrap=1"], True),
    (["-bootstrap=TRUE"], True),
    (["-bootstrap=false"], False),
    (["-bootstrap=0"], False),
    (["--bootstrap=false"], False),
    (["-bootstrap", "-id", "n1"], True),
    (["-id", "n1", "-bootstrap"], True),
    ([], False),
])
def test_sidecar_bootstrap_flag_forms(argv, expected):
    assert sidecar.parse_args(argv).bootstrap is expected


def test_sidecar_bootstrap_followed_by_other_flags_keeps_them():
    cfg = sidecar.parse_args(["-bootstrap", "-id", "n1", "-raft=9001"])
    assert cfg.bootstrap is True and cfg.node_id == "n1" and cfg.raft_port == 9001


@pytest.mark.parametrize("argv", [["-bootstrap=maybe"], ["-raft=abc"], ["-nosuchflag"],
                                  ["--election-timeout", "2", "1"], ["--election-timeout", "0", "1"],
                                  ["-apply-batch-delay=-0.1"], ["-apply-batch-delay", "2"],
                                  ["-apply-batch-delay=soon"]])
def test_sidecar_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        sidecar.parse_args(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err


# -- sidecar: advertise / mgmt_advertise ------------------------------------------------------

def test_sidecar_host_only_advertise_gets_the_raft_port():
    assert sidecar.parse_args(["-advertise", "node3"]).advertise == "node3:8088"
    assert sidecar.parse_args(["-advertise", "node3", "-raft=9000"]).advertise == "node3:9000"
    assert sidecar.parse_args(["-raft=9000", "-advertise=10.0.0.3"]).advertise == "10.0.0.3:9000"


def test_sidecar_host_and_port_advertise_is_kept():
    assert sidecar.parse_args(["-advertise", "node3:7777", "-raft=9000"]).advertise == "node3:7777"


def test_sidecar_mgmt_advertise():
    cfg = sidecar.parse_args(["-advertise", "node3", "-raft=9000", "-mgmt", "6003"])
    assert cfg.mgmt_advertise == "node3:6003"
    cfg = sidecar.parse_args(["-advertise", "10.0.0.9:7777"])
    assert cfg.mgmt_advertise == "10.0.0.9:6000"


# -- sidecar: cluster token and other environment -------------------------------------------------

def test_sidecar_cluster_token_from_environment_when_flag_absent():
    assert sidecar.parse_args([], {"CLUSTER_TOKEN": "s3cret"}).cluster_token == "s3cret"


def test_sidecar_cluster_token_flag_wins_over_environment():
    cfg = sidecar.parse_args(["-cluster-token", "fromflag"], {"CLUSTER_TOKEN": "fromenv"})
    assert cfg.cluster_token == "fromflag"


def test_sidecar_empty_cluster_token_means_none():
    assert sidecar.parse_args([], {"CLUSTER_TOKEN": ""}).cluster_token is None
    assert sidecar.parse_args([]).cluster_token is None


def test_sidecar_log_level_from_environment_and_flag():
    assert sidecar.parse_args([], {"LOG_LEVEL": "debug"}).log_level == "DEBUG"
    assert sidecar.parse_args(["-log-level", "warning"], {"LOG_LEVEL": "debug"}).log_level == "WARNING"


@pytest.mark.parametrize("argv, expected", [(["-apply-batch-delay=0"], 0.0), (["--apply-batch-delay", "0.005"], 0.005),
                                            (["-apply-batch-delay", "1"], 1.0)])
def test_sidecar_apply_batch_delay(argv, expected):
    assert sidecar.parse_args(argv).apply_batch_delay == expected


def test_sidecar_election_timeout_drives_the_other_timeouts():
    cfg = sidecar.parse_args(["--election-timeout", "3", "6"])
    assert (cfg.raft_min_timeout, cfg.raft_max_timeout) == (3.0, 6.0)
    assert cfg.connection_timeout == 7.0
    assert cfg.leader_fallback_timeout == 9.0
    cfg = sidecar.parse_args([])
    assert cfg.connection_timeout == 3.5 and cfg.leader_fallback_timeout == 3.0
