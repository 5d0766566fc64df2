"""The shipped operations files, checked by the tools that will read them: promtool for the
Prometheus rules (syntax and the rules' own unit tests) and scrape config, systemd-analyze for
the units. Skipped when a tool is missing, unless XOAUTH2_PROXY_REQUIRE_REAL_SERVERS=1 (CI,
where .ci/run installs the Debian packages ``prometheus`` and ``systemd``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest

from proxy import metrics
from tests.ops.sandbox import unit_settings
from tests.ops.util import SHIPPED, require_tool

PROMETHEUS_DIR = SHIPPED / "config" / "prometheus"
SYSTEMD_DIR = SHIPPED / "systemd"
CONSOLE_SCRIPT = Path(sys.executable).parent / "xoauth2-proxy"


def run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True,
                          timeout=120, cwd=cwd, check=False)


def test_promtool_checks_rules_and_config() -> None:
    promtool = require_tool("promtool", "prometheus")
    for command in (("check", "rules", "alerts.yml"), ("test", "rules", "alerts.test.yml"),
                    ("check", "config", "prometheus.yml")):
        result = run(promtool, *command, cwd=PROMETHEUS_DIR)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_use_only_exported_metrics() -> None:
    """A renamed metric must not leave an alert that can never fire (no promtool needed)."""
    metrics.prepare([("imap", "imap"), ("smtp", "smtp")], per_account_labels=True,
                    accounts=["someone@example.com"])
    try:
        text = generate_latest(metrics.REGISTRY).decode()
    finally:
        metrics.ACCOUNTS.configure(per_account_labels=False, accounts=[])
    exported = set(re.findall(r"^(xoauth2_proxy_\w+)", text, re.MULTILINE))
    used = set(re.findall(r"xoauth2_proxy_\w+", (PROMETHEUS_DIR / "alerts.yml").read_text()))
    assert used and used <= exported, used - exported


def test_systemd_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` checks that ExecStart= exists and is executable, so it
    verifies a copy whose ExecStart= is this checkout's console script; every other line is
    verified exactly as shipped."""
    analyze = require_tool("systemd-analyze", "systemd")
    units = sorted(p.name for p in SYSTEMD_DIR.iterdir() if p.suffix in (".service", ".socket"))
    assert "xoauth2-proxy.service" in units and any(u.endswith(".socket") for u in units)
    if CONSOLE_SCRIPT.exists():
        binary = CONSOLE_SCRIPT
    else:  # an installation without the venv: any executable stands in for the check
        binary = Path(shutil.which("xoauth2-proxy") or shutil.which("true") or "/bin/true")
    for unit in units:
        text = (SYSTEMD_DIR / unit).read_text()
        if unit.endswith(".service"):  # its program is checked against the README elsewhere
            program = unit_settings(text)["ExecStart"][0].split()[0]
            assert program.endswith("/xoauth2-proxy"), program
            text = text.replace(f"ExecStart={program} ", f"ExecStart={binary} ")
        (tmp_path / unit).write_text(text)
    result = run(analyze, "verify", "--man=no", *(tmp_path / u for u in units), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "xoauth2-proxy" not in output, output  # no warning about our units either


def test_service_unit_hardening() -> None:
    """The settings the issue asks for are present (systemd-analyze accepts their absence)."""
    text = (SYSTEMD_DIR / "xoauth2-proxy.service").read_text()
    settings = {line.split("=", 1)[0]: line.split("=", 1)[1]
                for line in text.splitlines() if "=" in line and not line.startswith("#")}
    expected = {
        "Type": "notify", "ExecReload": "/bin/kill -HUP $MAINPID", "DynamicUser": "yes",
        "StateDirectory": "xoauth2-proxy", "StateDirectoryMode": "0700",
        "ConfigurationDirectory": "xoauth2-proxy", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "CapabilityBoundingSet": "",
        "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes", "RestrictNamespaces": "yes",
        "PrivateDevices": "yes", "UMask": "0077", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
    }
    for key, value in expected.items():
        assert settings.get(key) == value, key
    assert "WatchdogSec" in settings
    assert "SystemCallFilter=@system-service" in text
    # By name from the credential store, so a missing one is skipped (tests/ops/test_service_unit.py)
    assert unit_settings(text)["LoadCredential"] == ["client-secret", "service-key"]
    for unit in SYSTEMD_DIR.glob("*.socket"):
        socket_text = unit.read_text()
        name = unit.stem.removeprefix("xoauth2-proxy-")
        assert f"FileDescriptorName={name}\n" in socket_text
        assert "Service=xoauth2-proxy.service" in socket_text
