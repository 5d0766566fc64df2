"""Shared fixtures: the demo upstream (fake Microsoft 365) in a process of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.demo.process import DemoUpstream


@pytest.fixture
def demo_upstream_factory(tmp_path: Path) -> Iterator[Callable[..., DemoUpstream]]:
    """Start demo upstreams with knobs: ``demo_upstream_factory(access_token_lifetime=2)``."""
    started: list[DemoUpstream] = []

    def start(**knobs: object) -> DemoUpstream:
        upstream = DemoUpstream.start(tmp_path / f"upstream{len(started)}", knobs=knobs)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


@pytest.fixture
def demo_upstream(demo_upstream_factory: Callable[..., DemoUpstream]) -> DemoUpstream:
    """A started demo upstream with default knobs, stopped after the test."""
    return demo_upstream_factory()
