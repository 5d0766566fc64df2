"""Shared fixtures: the demo upstream (fake Microsoft 365) in a process of its own."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

import proxy
from proxy.demo.process import DemoUpstream
from proxy.paths import data_dir
from proxy.store.names import TEST_SCRYPT_N_ENV

# The storms open 1,000 client connections from this process (and the daemons it starts
# inherit the limit): the soft descriptor limit up to the hard one, as a service unit's
# LimitNOFILE would be.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft != resource.RLIM_INFINITY and (_hard == resource.RLIM_INFINITY or _soft < _hard):
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(_hard, 65536), _hard))

# Property-based tests are derandomised in CI (CI=true, as .ci/run runs): the same examples on
# every run, so a red run is a real regression, never a new draw. Locally they explore; a failure
# found locally is pinned with @example next to the test. XOAUTH2_PROXY_HYPOTHESIS overrides.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("XOAUTH2_PROXY_HYPOTHESIS")
                      or ("ci" if os.environ.get("CI", "").lower() in ("1", "true") else "dev"))


# Password slots at today's production cost (n=2**17, 128 MiB, about half a second) would add
# seconds to every test that authorises an account; tests write them at n=2**15 through the
# store's test-only environment knob (inherited by daemons the tests start). The default cost
# itself is tested with the knob unset (tests/store/test_store_kdf.py).
os.environ.setdefault(TEST_SCRYPT_N_ENV, str(2**15))
EVENT_LOOP_ENV = "XOAUTH2_PROXY_TEST_EVENT_LOOP"


def pytest_report_header() -> list[str]:
    return [f"xoauth2-proxy under test: {Path(proxy.__file__).parent}",
            f"shipped files: {data_dir()}"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--event-loop", choices=("asyncio", "uvloop"),
                     default=os.environ.get(EVENT_LOOP_ENV, "asyncio"),
                     help="the event loop async tests (and the daemons they start in process) "
                          f"run on; CI runs tests/server under both (also ${EVENT_LOOP_ENV})")


def pytest_configure(config: pytest.Config) -> None:
    """`make test` sets XOAUTH2_PROXY_TEST_INSTALLED=1: the suite must then test the installed
    package, not a source tree that happens to be importable."""
    if config.getoption("--event-loop") == "uvloop":
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if os.environ.get("XOAUTH2_PROXY_TEST_INSTALLED") == "1":
        package = Path(proxy.__file__).resolve().parent
        if (package.parent / "setup.cfg").exists():
            raise pytest.UsageError(f"XOAUTH2_PROXY_TEST_INSTALLED=1 but proxy is imported from the "
                                    f"source tree {package}, not from the installed package")
        shipped = data_dir()
        if shipped is None or (shipped / "setup.cfg").exists():
            raise pytest.UsageError("the installed package lacks its shipped files "
                                    "(share/xoauth2-proxy: example configs, systemd units, rules)")


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
