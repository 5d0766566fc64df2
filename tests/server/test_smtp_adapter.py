"""The aiosmtpd and aiosmtplib private attributes the proxy uses (all in
``proxy.server.smtp_adapter``) exist in the installed releases, which are inside the range
setup.cfg pins."""

from __future__ import annotations

import configparser
from importlib.metadata import version
from pathlib import Path

import pytest

from proxy.server import smtp_adapter


def test_every_private_the_adapter_uses_exists() -> None:
    missing = smtp_adapter.missing_privates()
    assert not missing, (
        f"installed aiosmtpd {version('aiosmtpd')} / aiosmtplib {version('aiosmtplib')} lack "
        f"{', '.join(missing)}: adapt proxy/server/smtp_adapter.py before raising the upper "
        f"bound in setup.cfg ({smtp_adapter.SUPPORTED})")


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def test_installed_releases_are_inside_the_pinned_range() -> None:
    for name, spec in smtp_adapter.SUPPORTED.items():
        floor, upper = (part.strip(">=<") for part in spec.split(","))
        installed = _release(version(name))
        assert _release(floor) <= installed < _release(upper), (name, version(name), spec)


def test_setup_cfg_pins_the_adapter_range() -> None:
    setup = Path(__file__).resolve().parents[2] / "setup.cfg"
    if not setup.exists():
        pytest.skip("run from an installed copy of the tests (make test): no setup.cfg")
    cfg = configparser.ConfigParser()
    cfg.read(setup)
    requires = [line.replace(" ", "") for line in
                cfg["options"]["install_requires"].splitlines()]
    for name, spec in smtp_adapter.SUPPORTED.items():
        assert f"{name}{spec}" in requires, (name, spec)
