"""Shared fixtures: the demo upstream (fake Microsoft 365) in a process of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import os

import pytest
from hypothesis import settings

from proxy.demo.process import DemoUpstream

# Property-based tests are derandomised in CI (CI=true, as .ci/run runs): the same examples on
# every run, so a red run is a real regression, never a new draw. Locally they explore; a failure
# found locally is pinned with @example next to the test. XOAUTH2_PROXY_HYPOTHESIS overrides.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("XOAUTH2_PROXY_HYPOTHESIS")
                      or ("ci" if os.environ.get("CI", "").lower() in ("1", "true") else "dev"))


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
