"""Where the cluster is: node URLs and management URLs for the client and the CLI.

Order of sources: explicit arguments (--nodes / --mgmt), then RAFTKV_NODES / RAFTKV_MGMT,
then the launcher's cluster.json (``raftkv cluster up`` writes it into its folder), then
the defaults of a local cluster (client 8080-8082, management 6000-6002).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ._core import normalize_url

DEFAULT_NODES = ("http://127.0.0.1:8080", "http://127.0.0.1:8081", "http://127.0.0.1:8082")
DEFAULT_MGMT = ("http://127.0.0.1:6000", "http://127.0.0.1:6001", "http://127.0.0.1:6002")
DEFAULT_CLUSTER_DIR = ".raftkv-cluster"  # = raftkv.launcher.DEFAULT_DIR
LAYOUT_FILE = "cluster.json"


@dataclass(frozen=True)
class Endpoints:
    urls: list[str]
    mgmt_urls: list[str]  # empty when unknown; else paired with urls by position
    source: str  # where they came from, for error messages


def parse_url_list(text: str) -> list[str]:
    """'http://h:8080,8081,h2:9000' -> three URLs: a bare port reuses the previous entry's
    scheme and host (127.0.0.1 for the first)."""
    out: list[str] = []
    prev_scheme, prev_host = "http", "127.0.0.1"
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.isdigit():
            item = f"{prev_scheme}://{prev_host}:{item}"
        url = normalize_url(item)
        prev_scheme, _, rest = url.partition("://")
        prev_host = rest.rsplit(":", 1)[0] if rest.count(":") and not rest.endswith("]") else rest
        out.append(url)
    if not out:
        raise ValueError(f"no node URL in {text!r}")
    return out


def layout_endpoints(cluster_dir: str | os.PathLike) -> Endpoints | None:
    """Node and management URLs of a cluster started by `raftkv cluster up` in cluster_dir."""
    path = Path(cluster_dir) / LAYOUT_FILE
    try:
        data = json.loads(path.read_text())
        n, host = int(data["nodes"]), str(data["host"])
        http, mgmt = int(data["http_port"]), int(data["mgmt_port"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    h = f"[{host}]" if ":" in host else host
    return Endpoints([f"http://{h}:{http + i}" for i in range(n)],
                     [f"http://{h}:{mgmt + i}" for i in range(n)], f"{path}")


def resolve(nodes: str | None = None, mgmt: str | None = None, cluster_dir: str | os.PathLike | None = None,
            env: Mapping[str, str] | None = None) -> Endpoints:
    env = os.environ if env is None else env
    source = "--nodes"
    if not nodes:
        nodes, source = env.get("RAFTKV_NODES") or None, "RAFTKV_NODES"
    mgmt = mgmt or env.get("RAFTKV_MGMT") or None
    cdir = cluster_dir or env.get("RAFTKV_CLUSTER_DIR") or DEFAULT_CLUSTER_DIR
    layout = layout_endpoints(cdir)
    if nodes:
        urls = parse_url_list(nodes)
        if mgmt:
            mgmt_urls = parse_url_list(mgmt)
        elif layout is not None and all(u in layout.urls for u in urls):
            mgmt_urls = [layout.mgmt_urls[layout.urls.index(u)] for u in urls]
        else:
            mgmt_urls = []
        return Endpoints(urls, mgmt_urls, source)
    if layout is not None:
        return Endpoints(layout.urls, parse_url_list(mgmt) if mgmt else layout.mgmt_urls, layout.source)
    return Endpoints(list(DEFAULT_NODES), parse_url_list(mgmt) if mgmt else list(DEFAULT_MGMT),
                     "the default local cluster")
