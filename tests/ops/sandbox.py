"""The service unit's kernel-enforced restrictions, rebuilt outside systemd for the tests.

systemd turns some unit settings into seccomp filters and a prctl that it installs in the service
process just before ``execve``. ``Sandbox.from_unit`` derives the same from the unit file, and
``Sandbox.command(argv)`` is a small wrapper program that installs them and then execs ``argv``
(filters and the W^X flag are kept across ``execve``, as they are for the service):

- ``MemoryDenyWriteExecute=yes``: systemd 252 (Debian 12) installs a seccomp filter that refuses
  ``mmap`` with PROT_WRITE|PROT_EXEC, ``mprotect``/``pkey_mprotect`` adding PROT_EXEC and
  ``shmat`` with SHM_EXEC (EPERM); newer systemd uses the kernel's own
  ``prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)`` (Linux 6.3+) instead. Both are available here.
- ``SystemCallFilter=`` (with ``SystemCallErrorNumber=``): an allow list expanded from the
  groups as ``systemd-analyze syscall-filter`` prints them, ``@default`` added as systemd does,
  ``~…`` lines removing from it, every other call failing with that errno (or killing the process
  when the unit sets no errno). ``SystemCallArchitectures=native``: the filter is built for the
  native architecture only, so other ABIs are refused.
- ``RestrictAddressFamilies=``: ``socket()`` with any other family fails with EAFNOSUPPORT.
- ``RestrictNamespaces=yes``: ``unshare``/``clone`` with a namespace flag and ``setns`` fail
  with EPERM, and ``clone3`` with ENOSYS (its flags cannot be filtered), so that libc starts
  threads with ``clone`` instead.
- ``ProtectProc=``/``ProcSubset=``: a private mount namespace with ``/proc`` mounted with
  ``hidepid=``/``subset=pid`` as systemd mounts it (``unshare``; needs root).

The wrapper needs libseccomp's Python bindings (Debian ``python3-seccomp``, for the system
Python); ``seccomp_python()`` finds an interpreter that has them.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from tests.ops.util import REQUIRE_ENV, require_tool

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1

# Runs in the interpreter that has libseccomp's bindings; argv: the JSON spec, then the program.
# The allow list goes in last, as systemd does: loading a filter after it would need seccomp(2).
WRAPPER = r"""
import ctypes, errno, json, mmap, os, sys
spec, argv = json.loads(sys.argv[1]), sys.argv[2:]
if spec["mdwe"] == "prctl":
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        sys.exit("sandbox: prctl(PR_SET_MDWE): " + os.strerror(ctypes.get_errno()))
import seccomp
filters = []
if spec["mdwe"] == "seccomp":
    f, refuse = seccomp.SyscallFilter(seccomp.ALLOW), seccomp.ERRNO(errno.EPERM)
    wx, x, shm_exec = mmap.PROT_WRITE | mmap.PROT_EXEC, mmap.PROT_EXEC, 0o100000
    f.add_rule(refuse, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, wx, wx))
    f.add_rule(refuse, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, x, x))
    f.add_rule(refuse, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, x, x))
    f.add_rule(refuse, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, shm_exec, shm_exec))
    filters.append(f)
if spec["families"] is not None:
    f, refuse = seccomp.SyscallFilter(seccomp.ALLOW), seccomp.ERRNO(errno.EAFNOSUPPORT)
    allowed = sorted(spec["families"])
    f.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.LT, allowed[0]))
    f.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.GT, allowed[-1]))
    for family in range(allowed[0] + 1, allowed[-1]):
        if family not in allowed:
            f.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.EQ, family))
    filters.append(f)
if spec["namespaces"]:
    f, refuse = seccomp.SyscallFilter(seccomp.ALLOW), seccomp.ERRNO(errno.EPERM)
    # clone3 takes its flags in memory a filter cannot read: ENOSYS, and libc falls back to clone
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    f.add_rule(refuse, "setns")
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                 0x40000000):  # CLONE_NEWNS, _NEWCGROUP, _NEWUTS, _NEWIPC, _NEWUSER, _NEWPID, _NEWNET
        f.add_rule(refuse, "unshare", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        f.add_rule(refuse, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    filters.append(f)
if spec["syscalls"] is not None:
    denied = seccomp.ERRNO(spec["errno"]) if spec["errno"] else seccomp.KILL_PROCESS
    f = seccomp.SyscallFilter(denied)
    for name in spec["syscalls"]:
        if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) == -1:
            continue  # not a system call of this architecture (systemd skips these too)
        f.add_rule(seccomp.ALLOW, name)
    filters.append(f)
for f in filters:
    f.load()
os.execv(argv[0], argv)
"""


# --- the unit file ------------------------------------------------------------------------------


def unit_settings(text: str, section: str = "Service") -> dict[str, list[str]]:
    """``Key=value`` assignments of one section, in order; an empty assignment resets the list,
    as it does for systemd's list settings."""
    settings: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        if current != section or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if value:
            settings.setdefault(key, []).append(value)
        else:
            settings[key] = []
    return settings


def syscall_groups(analyze: str) -> dict[str, list[str]]:
    """Every group ``systemd-analyze syscall-filter`` knows: its members (calls and ``@groups``)."""
    output = subprocess.run([analyze, "syscall-filter", "--no-pager"], capture_output=True,
                            text=True, check=True, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    members: list[str] | None = None
    for line in output.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif not line.strip() or not line.startswith(" "):
            members = None  # a blank line or a heading other than a group's
        elif members is not None and not line.strip().startswith("#"):
            members.append(line.strip())
    return groups


def expand(items: Iterable[str], groups: Mapping[str, list[str]]) -> set[str]:
    calls: set[str] = set()
    for item in items:
        if item.startswith("@"):
            if item not in groups:
                raise ValueError(f"{item} is not a group this systemd knows")
            calls |= expand(groups[item], groups)
        else:
            calls.add(item.split(":", 1)[0])  # "name:errno" sets that call's own errno
    return calls


def allowed_syscalls(lines: Sequence[str], groups: Mapping[str, list[str]]) -> set[str]:
    """The allow list systemd builds from ``SystemCallFilter=`` lines that start with an allow
    list (a leading ``~`` line makes a deny list, which this helper does not model)."""
    if not lines or lines[0].startswith("~"):
        raise ValueError("SystemCallFilter= does not start with an allow list")
    allowed = expand(["@default"], groups)  # systemd always allows these in allow-list mode
    for line in lines:
        deny = line.startswith("~")
        names = expand(line.removeprefix("~").split(), groups)
        allowed = allowed - names if deny else allowed | names
    return allowed


# --- the sandbox --------------------------------------------------------------------------------

Mdwe = Literal["prctl", "seccomp"] | None


@dataclass(frozen=True)
class Sandbox:
    mdwe: Mdwe = None
    syscalls: frozenset[str] | None = None  # the allow list; None: no system-call filter
    errno: int | None = None  # what a refused call returns; None: the process is killed
    families: tuple[int, ...] | None = None  # RestrictAddressFamilies=; None: any family
    namespaces: bool = False  # RestrictNamespaces=yes
    proc: str | None = None  # mount options of a private /proc (ProtectProc=, ProcSubset=)

    @classmethod
    def from_unit(cls, settings: Mapping[str, list[str]], groups: Mapping[str, list[str]],
                  mdwe: Mdwe = "seccomp") -> Sandbox:
        """Everything seccomp-based that the unit sets; W^X the way ``mdwe`` says."""
        assert settings.get("MemoryDenyWriteExecute") == ["yes"]
        assert settings.get("SystemCallArchitectures") == ["native"]
        number = settings.get("SystemCallErrorNumber", [None])[-1]
        families = [getattr(socket, name) for line in settings["RestrictAddressFamilies"]
                    for name in line.split()]
        proc = [f"hidepid={value}" for value in settings.get("ProtectProc", [])[-1:]
                if value != "default"]
        proc += [f"subset={value}" for value in settings.get("ProcSubset", [])[-1:]
                 if value != "all"]
        return cls(mdwe=mdwe,
                   syscalls=frozenset(allowed_syscalls(settings["SystemCallFilter"], groups)),
                   errno=getattr(errno, number) if number else None,
                   families=tuple(sorted(int(f) for f in families)),
                   namespaces=settings.get("RestrictNamespaces", ["no"])[-1] == "yes",
                   proc=",".join(proc) or None)

    def only(self, *, mdwe: Mdwe = None, syscalls: bool = False, proc: bool = False) -> Sandbox:
        """A part of this sandbox: W^X alone, the other seccomp filters (system calls, address
        families, namespaces), or the /proc view."""
        return Sandbox(mdwe=mdwe, syscalls=self.syscalls if syscalls else None,
                       errno=self.errno, families=self.families if syscalls else None,
                       namespaces=self.namespaces and syscalls, proc=self.proc if proc else None)

    @property
    def seccomp_filters(self) -> int:
        """How many seccomp filters ``command`` installs."""
        return sum((self.mdwe == "seccomp", self.families is not None, self.namespaces,
                    self.syscalls is not None))

    def command(self, python: str, argv: Sequence[str]) -> list[str]:
        """The command that runs ``argv`` in this sandbox (the same process all along: each
        step execs the next, so the pid the caller sees is the program's)."""
        spec = {"mdwe": self.mdwe, "errno": self.errno, "families": self.families,
                "namespaces": self.namespaces,
                "syscalls": sorted(self.syscalls) if self.syscalls is not None else None}
        command = [python, "-I", "-c", WRAPPER, json.dumps(spec), *argv]
        if self.proc is not None:
            mount = 'mount -t proc -o "$0" proc /proc && exec "$@"'
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount,
                       self.proc, *command]
        return command


def seccomp_python() -> str:
    """An interpreter that can import libseccomp's bindings: this one, or the system Python
    (Debian's ``python3-seccomp`` is built for it). Skips without one, fails in CI."""
    for python in dict.fromkeys((sys.executable, "/usr/bin/python3")):
        if Path(python).exists() and subprocess.run(
                [python, "-I", "-c", "import seccomp"], capture_output=True, timeout=60,
                check=False).returncode == 0:
            return python
    reason = ("libseccomp's Python bindings are not installed (Debian package python3-seccomp; "
              ".ci/run installs it)")
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require_mount_namespace() -> None:
    """A private /proc needs root (CAP_SYS_ADMIN) and util-linux's unshare; skips without them
    (fails in CI, which runs as root)."""
    require_tool("unshare", "util-linux")
    reason = None
    if os.geteuid() != 0:
        reason = "mounting a private /proc needs root"
    elif subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=60,
                        check=False).returncode != 0:
        reason = "unshare --mount fails here (no CAP_SYS_ADMIN?)"
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def kernel_has_mdwe() -> bool:
    """Linux 6.3+ knows PR_GET_MDWE (and so PR_SET_MDWE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_GET_MDWE, 0, 0, 0, 0)) >= 0
