"""``openssl s_client`` as a test's mail client: Debian's openssl, forced to one TLS version,
driven line by line through its standard input and output."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

# Debian's openssl refuses TLS 1.0/1.1 at its default security level, as a printer would not.
OLD_CLIENT_CIPHERS = "DEFAULT@SECLEVEL=0"
VERSION_FLAGS = {"1.0": "-tls1", "1.1": "-tls1_1", "1.2": "-tls1_2", "1.3": "-tls1_3"}
LINE_TIMEOUT = 20.0


@dataclass
class SClient:
    process: asyncio.subprocess.Process
    transcript: list[str]

    async def line(self) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(LINE_TIMEOUT):
            raw = await self.process.stdout.readline()
        if not raw:
            raise ConnectionError("s_client's connection ended; transcript: "
                                  + " | ".join(self.transcript))
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        self.transcript.append(text)
        return text

    async def until(self, pattern: str) -> str:
        """Read lines until one matches ``pattern`` (a regular expression); return it."""
        while True:
            text = await self.line()
            if re.match(pattern, text):
                return text

    async def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\r\n")
        await self.process.stdin.drain()

    async def command(self, text: str, final: str) -> str:
        await self.send(text)
        return await self.until(final)

    async def smtp(self, text: str) -> str:
        """An SMTP command; its final reply line (``NNN `` not ``NNN-``)."""
        return await self.command(text, r"\d{3} ")

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode("utf-8", "replace")


def command(port: int, version: str, ca_file: Path, starttls: str | None = None,
            *extra: str) -> list[str]:
    openssl = shutil.which("openssl")
    assert openssl is not None, "tests.ops.util.require_tool('openssl', …) first"
    args = [openssl, "s_client", "-connect", f"127.0.0.1:{port}", VERSION_FLAGS[version],
            "-cipher", OLD_CLIENT_CIPHERS, "-CAfile", str(ca_file), "-verify_return_error",
            "-verify_ip", "127.0.0.1", "-brief"]
    return args + (["-starttls", starttls] if starttls else []) + list(extra)


@contextlib.asynccontextmanager
async def s_client(port: int, version: str, ca_file: Path,
                   starttls: str | None = None) -> AsyncIterator[SClient]:
    # -nocommands: a line starting with R or Q (RCPT, QUIT) is sent, not taken as a command
    process = await asyncio.create_subprocess_exec(
        *command(port, version, ca_file, starttls, "-nocommands"), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        yield SClient(process, [])
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def handshake(port: int, version: str, ca_file: Path,
                    starttls: str | None = None) -> tuple[int, str]:
    """Connect, complete (or fail) the handshake, close at once: exit status and stderr."""
    process = await asyncio.create_subprocess_exec(
        *command(port, version, ca_file, starttls, "-no_ign_eof"), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(LINE_TIMEOUT):
        _, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode("utf-8", "replace")
