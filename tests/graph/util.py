"""A proxy config with a Graph upstream on the fake Microsoft 365, for the Graph tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy import config as config_mod
from proxy.demo.process import DemoUpstream
from tests.proxyenv import config_dict, to_toml


def graph_dict(tmp_path: Path, upstream: DemoUpstream, *, graph: dict[str, Any] | None = None,
               fallback: bool = False, **kw: Any) -> dict[str, Any]:
    """``config_dict`` plus ``[upstreams.graph]`` (and the SMTP upstream's fallback to it)."""
    data = config_dict(tmp_path, upstream, **kw)
    data["upstreams"]["graph"] = {"protocol": "graph", "base_url": f"{upstream.graph_url}/v1.0",
                                  "ca_file": upstream.ca_file, "timeout": 30, **(graph or {})}
    if fallback:
        data["upstreams"]["smtp"]["fallback"] = "graph"
    return data


def graph_config(tmp_path: Path, upstream: DemoUpstream, **kw: Any) -> config_mod.Config:
    return config_mod.parse(graph_dict(tmp_path, upstream, **kw), tmp_path / "config.toml")


def write_graph_config(tmp_path: Path, upstream: DemoUpstream, **kw: Any) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(to_toml(graph_dict(tmp_path, upstream, **kw)))
    return path
