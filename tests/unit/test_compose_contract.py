"""docker-compose.yml, Dockerfile and entrypoint.sh agree with each other and with SPEC §1/§3.

The original's topology: 3 services node1..node3 from one image; NODE_ID per service,
BOOTSTRAP=true on node1, JOIN_ADDR=node1:6000 on the others; host ports 8080-8082 -> 8080;
volumes ./vol-nodeN:/app/data; the image starts entrypoint.sh.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "entrypoint.sh"

SERVICES = ["node1", "node2", "node3"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def entrypoint_text() -> str:
    return ENTRYPOINT.read_text()


@pytest.fixture(scope="module")
def entrypoint_defaults(entrypoint_text) -> dict[str, str]:
    """VAR -> default from lines `VAR="${VAR:-default}"`."""
    return {m.group(1): m.group(3) for m in
            re.finditer(r'^([A-Z_][A-Z0-9_]*)="\$\{(\1):-([^}]*)\}"', entrypoint_text, re.M)}


@pytest.fixture(scope="module")
def entrypoint_reads(entrypoint_text) -> set[str]:
    """Upper-case variables entrypoint.sh reads ($VAR or ${VAR...})."""
    return set(re.findall(r'\$\{?([A-Z_][A-Z0-9_]*)', entrypoint_text))


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...] form
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def port_mappings(service: dict) -> set[tuple[int, int]]:
    """(host port, container port) pairs from the short or long syntax."""
    out = set()
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.add((int(p["published"]), int(p["target"])))
            continue
        spec = str(p).split("/")[0]
        parts = spec.split(":")
        assert len(parts) in (2, 3), f"port mapping without a fixed host port: {p!r}"
        out.add((int(parts[-2]), int(parts[-1])))
    return out


def volume_mounts(service: dict) -> set[tuple[str, str]]:
    out = set()
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out.add((v["source"], v["target"]))
        else:
            src, dst = str(v).split(":")[:2]
            out.add((src, dst))
    return out


def build_context(service: dict) -> str | None:
    b = service.get("build")
    if b is None:
        return None
    ctx = b if isinstance(b, str) else b.get("context", ".")
    return str(Path(ctx)) if ctx not in ("", ".", "./") else "."


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


# -- compose --------------------------------------------------------------------------------------

def test_three_services_node1_to_node3(services):
    assert sorted(services) == SERVICES


def test_one_image_built_from_this_repo(services):
    contexts = {build_context(s) for s in services.values()}
    images = {s.get("image") for s in services.values()}
    # Either every service builds the same context with the same image name, or one builds it
    # and the others use its image.
    assert contexts - {None} == {"."}, f"build contexts: {contexts}"
    assert len(images) == 1, f"services use different images: {images}"
    if None in contexts:
        assert images != {None}, "services without build need the built service's image name"


@pytest.mark.parametrize("i,name", list(enumerate(SERVICES)))
def test_environment_per_node(services, i, name):
    env = env_of(services[name])
    assert env.get("NODE_ID") == name
    if i == 0:
        assert (env.get("BOOTSTRAP") or "").lower() == "true"
        assert not env.get("JOIN_ADDR"), "node1 bootstraps, it joins nobody"
    else:
        assert env.get("JOIN_ADDR") == "node1:6000"
        assert (env.get("BOOTSTRAP") or "false").lower() != "true", f"{name} must not bootstrap"


@pytest.mark.parametrize("i,name", list(enumerate(SERVICES)))
def test_ports_per_node(services, i, name):
    ports = port_mappings(services[name])
    assert (8080 + i, 8080) in ports, f"{name}: client port {8080 + i}->8080 missing in {ports}"
    assert (6000 + i, 6000) in ports, f"{name}: management port {6000 + i}->6000 missing in {ports}"


def test_host_ports_are_distinct(services):
    host_ports = [h for s in services.values() for h, _ in port_mappings(s)]
    assert len(host_ports) == len(set(host_ports))


@pytest.mark.parametrize("i,name", list(enumerate(SERVICES)))
def test_volume_per_node(services, i, name):
    assert (f"./vol-node{i + 1}", "/app/data") in volume_mounts(services[name])


def test_every_compose_variable_is_read_by_entrypoint(services, entrypoint_reads):
    for name, s in services.items():
        unknown = set(env_of(s)) - entrypoint_reads
        assert not unknown, f"{name} sets {sorted(unknown)}, which entrypoint.sh never reads"


def test_compose_agrees_with_entrypoint_defaults(services, entrypoint_defaults):
    d = entrypoint_defaults
    # The container ports compose maps are the script's default client and management ports,
    # JOIN_ADDR points at the default management port, the volume at the default DATA_DIR.
    assert d["HTTP_PORT"] == "8080" and d["MGMT_PORT"] == "6000"
    for name, s in services.items():
        targets = {c for _, c in port_mappings(s)}
        assert targets <= {int(d["HTTP_PORT"]), int(d["MGMT_PORT"]), int(d["RAFT_PORT"])}
        join = env_of(s).get("JOIN_ADDR")
        if join:
            host, port = join.rsplit(":", 1)
            assert host in services and port == d["MGMT_PORT"]
        assert {t for _, t in volume_mounts(s)} == {d["DATA_DIR"]}
        # Nodes reach each other by service name: ADVERTISE must default to NODE_ID.
        assert "ADVERTISE" not in env_of(s) or env_of(s)["ADVERTISE"] == name


# -- entrypoint.sh --------------------------------------------------------------------------------

def test_entrypoint_defaults_match_spec(entrypoint_defaults):
    expected = {
        "NODE_ID": "node1", "HTTP_PORT": "8080", "RAFT_PORT": "8088", "MGMT_PORT": "6000",
        "APP_PORT": "50051", "SIDE_PORT": "50052", "DATA_DIR": "/app/data",
        "ADVERTISE": "$NODE_ID", "BIND_HOST": "0.0.0.0", "PYTHON": "python3",
    }
    for var, value in expected.items():
        assert entrypoint_defaults.get(var) == value, f"{var} default: {entrypoint_defaults.get(var)!r}"
    for var in ("BOOTSTRAP", "JOIN_ADDR"):
        assert var in entrypoint_defaults, f"entrypoint.sh does not read {var}"


def test_entrypoint_reads_every_documented_variable(entrypoint_reads):
    documented = {"NODE_ID", "BOOTSTRAP", "JOIN_ADDR", "HTTP_PORT", "RAFT_PORT", "MGMT_PORT",
                  "APP_PORT", "SIDE_PORT", "DATA_DIR", "ADVERTISE", "BIND_HOST", "PYTHON",
                  "CLUSTER_TOKEN", "LOG_LEVEL", "ENGINE_ARGS", "SIDECAR_ARGS"}
    assert documented <= entrypoint_reads, sorted(documented - entrypoint_reads)


def test_entrypoint_never_puts_the_token_on_a_command_line(entrypoint_text):
    code = "\n".join(l for l in entrypoint_text.splitlines() if not l.lstrip().startswith("#"))
    assert "--cluster-token" not in code and "-cluster-token" not in code
    assert "export CLUSTER_TOKEN" in code


def test_entrypoint_is_valid_bash():
    bash = shutil.which("bash")
    assert bash, "bash is required"
    r = subprocess.run([bash, "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert ENTRYPOINT.read_text().startswith("#!/usr/bin/env bash")


def test_entrypoint_rejects_a_bad_port_without_starting_anything(tmp_path):
    r = subprocess.run(["bash", str(ENTRYPOINT)], capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin", "HTTP_PORT": "80x", "DATA_DIR": str(tmp_path / "d"),
                            "PYTHON": "/nonexistent/python"})
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "HTTP_PORT" in r.stderr
    assert not (tmp_path / "d").exists()


# -- Dockerfile ----------------------------------------------------------------------------------

def test_dockerfile_base_image_and_entrypoint():
    ins = dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms and froms[0].split()[0] == "python:3.11-slim"
    entry = [rest for word, rest in ins if word == "ENTRYPOINT"]
    assert len(entry) == 1 and "entrypoint.sh" in entry[0], entry
    assert any(word == "COPY" and "entrypoint.sh" in rest for word, rest in ins)
    assert any(word == "RUN" and re.search(r"pip install (\S+ )*\.(\s|$|&)", rest) for word, rest in ins), \
        "the image must install the package with `pip install .`"
    workdirs = [rest for word, rest in ins if word == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/app"


def test_dockerfile_exposes_the_public_ports(services):
    exposed = set()
    for word, rest in dockerfile_instructions():
        if word == "EXPOSE":
            exposed |= {int(p.split("/")[0]) for p in rest.split()}
    assert {8080, 8088, 6000} <= exposed
    for s in services.values():
        assert {c for _, c in port_mappings(s)} <= exposed


def test_dockerfile_copies_every_package():
    copied = " ".join(rest for word, rest in dockerfile_instructions() if word in ("COPY", "ADD"))
    for pkg in ("pyproject.toml", "raftkv", "storage_engine", "raft_sidecar", "proto"):
        assert pkg in copied or re.search(r"(^|\s)\.\s", copied), f"{pkg} is not copied into the image"
