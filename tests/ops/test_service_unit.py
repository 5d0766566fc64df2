"""The shipped service unit starts on the install the README describes: it names no credential
file that most installs lack, its ``ExecStart=`` is where the README installs the command, the
configs point at the credentials the unit passes, and a missing credential is reported by name
with where systemd looks for it. (``test_sandbox.py`` shows its sandbox holds; ``test_tools.py``
runs ``systemd-analyze verify``.)"""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import signal
import subprocess
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy import store, systemd
from proxy.demo.process import DemoUpstream
from proxy.paths import DISTRIBUTION
from tests.ops.sandbox import unit_settings
from tests.ops.util import SERVICE_UNIT, SHIPPED, NotifySocket, ProxyProcess, readme, require_tool
from tests.proxyenv import config_dict, to_toml

UNIT_CREDENTIALS = "/run/credentials/xoauth2-proxy.service/"


def service() -> dict[str, list[str]]:
    return unit_settings(SERVICE_UNIT.read_text())


def section(text: str, title: str) -> str:
    """One ``## title`` section of the README, up to the next ``## ``."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def credentials() -> dict[str, str | None]:
    """The unit's ``LoadCredential=ID[:PATH]`` lines: ID → PATH (None: from the credential store)."""
    found: dict[str, str | None] = {}
    for value in service().get("LoadCredential", []):
        name, _, path = value.partition(":")
        found[name] = path or None
    return found


# --- credentials --------------------------------------------------------------------------------


def test_no_credential_file_that_not_every_install_creates() -> None:
    """systemd fails the start (243/CREDENTIALS) when a LoadCredential= path does not exist. An
    absolute path is allowed only if the README's main steps, which every user follows, create
    it; the unit's optional secrets are named without a path (from the credential store, and
    skipped when absent, systemd 251+)."""
    steps = section(readme(), "Use it with Microsoft 365")
    found = credentials()
    assert found, "the unit passes no credentials at all"
    for name, path in found.items():
        if path is not None and path.startswith("/"):
            assert path in steps, (f"LoadCredential={name}:{path}: the service fails to start "
                                   "where that file is missing, and the README does not have "
                                   "every user create it")


def test_readme_says_where_each_credential_goes() -> None:
    text = section(readme(), "Run it as a service")
    for name in credentials():
        assert f"/etc/credstore/{name}" in text, name
        assert f"{UNIT_CREDENTIALS}{name}" in text, name


def test_configs_read_only_credentials_the_unit_or_a_documented_drop_in_passes() -> None:
    """Every ``/run/credentials/xoauth2-proxy.service/NAME`` an example config (or the README)
    reads is passed by the unit or by the drop-in the README shows (``LoadCredential=NAME``)."""
    docs = readme()
    passed = set(credentials()) | set(re.findall(r"^LoadCredential=([\w.-]+)$", docs, re.MULTILINE))
    examples = sorted((SHIPPED / "config").glob("*.toml"))
    assert examples
    for text, where in [(docs, "README.md"), *((p.read_text(), p.name) for p in examples)]:
        for name in re.findall(re.escape(UNIT_CREDENTIALS) + r"([\w.-]+)", text):
            assert name in passed, f"{where} reads the credential {name!r}, which nothing passes"


def test_missing_credential_says_which_and_where_systemd_looks(tmp_path: Path) -> None:
    path = Path(UNIT_CREDENTIALS + "client-secret")
    advice = systemd.missing_credential(path, {})
    assert advice is not None
    for part in ("'client-secret'", "LoadCredential=client-secret", "/etc/credstore/",
                 "/run/credstore/", "/usr/lib/credstore/", "/etc/credstore/client-secret",
                 "systemctl restart xoauth2-proxy.service"):
        assert part in advice, part
    # $CREDENTIALS_DIRECTORY is wherever systemd says; other missing files get no such advice.
    creds = tmp_path / "creds"
    assert "'scanner.key'" in (systemd.missing_credential(
        creds / "scanner.key", {"CREDENTIALS_DIRECTORY": str(creds)}) or "")
    assert systemd.missing_credential(tmp_path / "scanner.key", {}) is None
    assert systemd.missing_credential(Path("/etc/xoauth2-proxy/scanner.key"), {}) is None

    # Where the daemon reads them: the client secret and a service key.
    provider = config_mod.Provider("contoso", "https://login.example", "t", "c",
                                   client_secret_file=path)
    with pytest.raises(config_mod.ConfigError) as secret_error:
        provider.client_secret()
    assert str(secret_error.value).startswith(
        f"providers.contoso.client_secret_file: cannot read {path}: No such file or directory; "
        "systemd did not pass the credential 'client-secret'")
    with pytest.raises(store.KeyFileError, match=r"LoadCredential=service-key\b.*/etc/credstore/"):
        store.read_key_file(Path(UNIT_CREDENTIALS + "service-key"))
    with pytest.raises(store.KeyFileError, match=r"create one with: \(umask 077; head -c 32"):
        store.read_key_file(tmp_path / "scanner.key")  # not a credential: create it there


async def test_run_reports_a_missing_credential_and_serves(tmp_path: Path,
                                                           demo_upstream: DemoUpstream) -> None:
    """The unit starts without an optional secret; the daemon then says at once which
    credential the config expects and systemd did not pass (the accounts that need it fail
    later with the same advice; the others work)."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    data = config_dict(tmp_path, demo_upstream, protocols=("imap",))
    data["providers"]["demo"]["client_secret_file"] = str(creds / "client-secret")
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    notify = NotifySocket()
    proc = ProxyProcess(path, tmp_path / "proxy.log", notify=notify,
                        env={"CREDENTIALS_DIRECTORY": str(creds)})
    try:
        await asyncio.to_thread(notify.expect, "READY", proc=proc.proc)
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait) == 0
    finally:
        proc.stop()
        notify.close()
    line = next(line for line in proc.text().splitlines() if "event=credential_missing" in line)
    assert "level=warning" in line and "setting=providers.demo.client_secret_file" in line
    assert "'client-secret'" in line and "/etc/credstore/client-secret" in line


# --- ExecStart= and the README's install ------------------------------------------------------


def test_exec_start_is_where_the_readme_installs_the_command() -> None:
    command = service()["ExecStart"]
    assert len(command) == 1
    program, *args = command[0].split()
    text = readme()
    install = section(text, "Use it with Microsoft 365")
    venvs = re.findall(r"python3 -m venv (/\S+)", install)
    assert venvs, "the README does not install the program"
    venv = venvs[0]
    assert program == f"{venv}/bin/xoauth2-proxy", (program, venv)
    assert f"{venv}/bin/pip install " in install
    # pip puts the console script named in the distribution's entry points into <venv>/bin.
    scripts = {ep.name for ep in importlib.metadata.distribution(DISTRIBUTION).entry_points
               if ep.group == "console_scripts"}
    assert Path(program).name in scripts
    # The daemon reads the config the README has the user write.
    assert args[0] == "run" and args[args.index("--config") + 1] == "/etc/xoauth2-proxy/config.toml"
    assert "/etc/xoauth2-proxy/config.toml" in install
    # Every command line in the unit's comments and the README runs that same program (or a
    # link the README makes to it, for the admin's PATH).
    links = {link for target, link in re.findall(r"ln -s (\S+) (\S+)", install) if target == program}
    for where, body in (("unit", SERVICE_UNIT.read_text()), ("README", text)):
        for other in re.findall(r"(/\S+/bin/xoauth2-proxy)\b", body):
            assert other == program or other in links, f"the {where} runs {other}, the unit {program}"


def test_readme_gives_the_true_security_score(tmp_path: Path) -> None:
    """The README quotes ``systemd-analyze security``'s verdict for the unit; it must be the
    one this systemd computes (offline, from the file as shipped)."""
    analyze = require_tool("systemd-analyze", "systemd")
    unit = tmp_path / SERVICE_UNIT.name
    unit.write_text(SERVICE_UNIT.read_text())
    result = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", output)
    assert match, output
    version = subprocess.run([analyze, "--version"], capture_output=True, text=True,
                             timeout=60, check=False).stdout.split()[1]
    claim = f"{match.group(1)} {match.group(2)}"
    text = section(readme(), "Run it as a service")
    assert f"`{claim}`" in text, f"systemd {version} rates the unit {claim}; the README does not say so"
