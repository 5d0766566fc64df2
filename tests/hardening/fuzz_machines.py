"""Coverage-guided fuzzing (atheris/libFuzzer) of the sans-I/O protocol machines.

Run by hand for as long as you like, for example::

    .venv/bin/python tests/hardening/fuzz_machines.py -max_total_time=600 corpus/

``tests/hardening/test_atheris.py`` runs it for a bounded number of inputs in CI.

Each input picks a machine (IMAP or POP3, client or upstream side) and drives it the way the
session driver does: the rest of the input is cut into chunks fed to ``receive``; commands are
carried out (``StartClientTLS``/``StartServerTLS`` → ``tls_started``; ``Authenticate`` → a
verdict chosen by the input). Any exception is a finding — a machine must answer bad input
with the protocol's own error. Invariants checked on the way: replies to the client are whole
CRLF-terminated lines, the bytes a machine holds stay under its caps, and nothing is asked of
the driver after the machine has finished.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from proxy.protocol.events import (
        Authenticate,
        CloseConnection,
        Failure,
        SendToClient,
        SendToServer,
        StartClientTLS,
        StartRelay,
        StartServerTLS,
        UpstreamBroken,
        UpstreamLoggedIn,
        UpstreamRejected,
    )
    from proxy.protocol.imap import ImapClientSide, ImapUpstreamSide
    from proxy.protocol.pop import PopClientSide, PopUpstreamSide
    from proxy.secret import Secret

FAILURES = list(Failure)
IMAP_CAP = 8192 + 64 * 1024  # max_line + max_literal: what ImapClientSide may hold
MAX_STEPS = 64


def _client(fdp: atheris.FuzzedDataProvider, imap: bool) -> None:
    flags = fdp.ConsumeIntInRange(0, 7)
    kwargs = dict(starttls=bool(flags & 1), tls_active=bool(flags & 2),
                  login_disabled=bool(flags & 4))
    machine = ImapClientSide(**kwargs) if imap else PopClientSide(**kwargs)
    work = list(machine.greeting())
    finished = False
    for _ in range(MAX_STEPS):
        while work:
            cmd = work.pop(0)
            assert not finished, f"{cmd!r} after the machine finished"
            if isinstance(cmd, SendToClient):
                assert cmd.data.endswith(b"\r\n"), cmd.data[-20:]
            elif isinstance(cmd, StartClientTLS):
                work += machine.tls_started()
            elif isinstance(cmd, Authenticate):
                assert cmd.username and cmd.username.isprintable()
                verdict = fdp.ConsumeIntInRange(0, len(FAILURES))
                if verdict == len(FAILURES):
                    work += machine.login_succeeded("IMAP4rev1 IDLE", fdp.ConsumeBytes(8))
                else:
                    work += machine.login_failed(FAILURES[verdict], fdp.ConsumeUnicode(40))
            elif isinstance(cmd, StartRelay | CloseConnection):
                finished = True
            else:
                raise AssertionError(f"unexpected command {cmd!r}")
        if finished or fdp.remaining_bytes() == 0:
            return
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
        work += machine.receive(chunk)  # b"" is EOF: allowed, it closes
        held = machine.buffered_bytes
        assert held <= (IMAP_CAP if imap else 64 * 1024), held


def _upstream(fdp: atheris.FuzzedDataProvider, imap: bool) -> None:
    starttls = fdp.ConsumeBool()
    cls = ImapUpstreamSide if imap else PopUpstreamSide
    machine = cls(user="alice@contoso.example", token=Secret("t" * 40), starttls=starttls)
    for _ in range(MAX_STEPS):
        if fdp.remaining_bytes() == 0:
            return
        work = list(machine.receive(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))))
        while work:
            cmd = work.pop(0)
            if isinstance(cmd, SendToServer):
                assert cmd.data.endswith(b"\r\n")
            elif isinstance(cmd, StartServerTLS):
                work += machine.tls_started()
            elif isinstance(cmd, UpstreamLoggedIn | UpstreamRejected | UpstreamBroken):
                if isinstance(cmd, UpstreamRejected | UpstreamBroken):
                    assert "\r" not in cmd.text and "\n" not in cmd.text, cmd.text
                return
            else:
                raise AssertionError(f"unexpected command {cmd!r}")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 3)
    if which < 2:
        _client(fdp, imap=which == 0)
    else:
        _upstream(fdp, imap=which == 2)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
