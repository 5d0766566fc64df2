"""Figure 3a — isolation: a slow reader must not slow a fast one, nor grow the proxy.

The slow client logs in, sends ``FETCH 1:* (BODY.PEEK[])`` for the whole mailbox and then
reads its socket at about 64 KB/s (receive buffer 64 KiB, so the kernel cannot soak up the
difference). While it crawls, the fast client (imaplib, as in figure 1) fetches the whole
mailbox. Interleaved with solo runs of the fast client, so the ratio compares like with
like. The contestant's RSS is sampled every 200 ms during the shared run: a relay with
backpressure stays flat; one that buffers what the slow client has not read grows.
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from bench import clients, harness
from bench.harness import Series

SLOW_RATE = 64 * 1000  # bytes per second


class SlowReader(threading.Thread):
    def __init__(self, target: clients.Target, rate: int = SLOW_RATE) -> None:
        super().__init__(name=f"slow reader {target.name}", daemon=True)
        self.target, self.rate = target, rate
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.received = 0
        self.elapsed = 0.0
        self.error = ""

    def _connect(self) -> socket.socket:
        t = self.target
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        raw.settimeout(60)
        raw.connect((t.host, t.ports["imap"]))
        sock: socket.socket = t.tls().wrap_socket(raw, server_hostname=t.host) if t.direct else raw
        return sock

    def run(self) -> None:
        t = self.target
        try:
            sock = self._connect()
            f = sock.makefile("rb", buffering=0)

            def command(line: bytes, tag: bytes) -> None:
                sock.sendall(line)
                buf = b""
                while not any(x.startswith(tag + b" ") for x in buf.split(b"\r\n")):
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed")
                    buf += chunk
                if tag + b" OK" not in buf:
                    raise RuntimeError(buf[-200:].decode(errors="replace"))

            greeting = b""
            while not greeting.endswith(b"\r\n"):
                greeting += sock.recv(1024)
            if t.direct:
                blob = base64.b64encode(t.xoauth2("imap"))
                command(b"l AUTHENTICATE XOAUTH2 " + blob + b"\r\n", b"l")
            else:
                command(f'l LOGIN "{t.user}" "{t.password}"\r\n'.encode(), b"l")
            command(b"e EXAMINE INBOX\r\n", b"e")
            sock.sendall(b"f FETCH 1:* (BODY.PEEK[])\r\n")
            del f
            self.ready.set()
            started = time.perf_counter()
            while not self.stop.is_set():
                chunk = sock.recv(8192)
                if not chunk:
                    break
                self.received += len(chunk)
                ahead = self.received / self.rate - (time.perf_counter() - started)
                if ahead > 0:
                    self.stop.wait(ahead)
            self.elapsed = time.perf_counter() - started
            sock.close()
        except (OSError, ssl.SSLError, RuntimeError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"[:200]
            self.ready.set()


def measure(fast: clients.Target, slow: clients.Target, *, runs: int, messages: int,
            rss: Callable[[], int] | None, say: Callable[[str], None]) -> dict[str, Any]:
    solo, shared = Series("MB/s"), Series("MB/s")
    growth, slow_rate = Series("MiB"), Series("KB/s")
    error = ""
    for run in range(runs):
        nbytes, seconds = clients.imap_fetch_all(fast, messages)
        solo.add(nbytes / seconds / 1e6)
        reader = SlowReader(slow)
        reader.start()
        reader.ready.wait(60)
        if reader.error:
            error = reader.error
            break
        time.sleep(2.0)  # let the slow path's buffers fill
        samples: list[int] = []
        sampling = threading.Event()

        def sample(samples: list[int] = samples, sampling: threading.Event = sampling) -> None:
            while not sampling.is_set():
                try:
                    samples.append(rss() if rss else 0)
                except (OSError, RuntimeError):
                    pass
                sampling.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # Bounded: a contestant that lets one slow reader stall the others would otherwise
        # hold the run for many minutes (measured: email-oauth2-proxy, ~8 min a run).
        budget = max(30.0, 10 * messages / max(solo.values[-1], 1.0))
        nbytes, seconds = clients.imap_fetch_all(fast, messages, budget=budget)
        shared.add(nbytes / max(seconds, 1e-9) / 1e6)
        sampling.set()
        sampler.join()
        reader.stop.set()
        reader.join(30)
        if reader.error:
            error = reader.error
        if reader.elapsed:
            slow_rate.add(reader.received / reader.elapsed / 1e3)
        if rss and samples:
            growth.add((max(samples) - samples[0]) / harness.MIB)
        say(f"  {fast.name} run {run + 1}/{runs}: solo {solo.values[-1]:.0f} MB/s, "
            f"beside a slow reader {shared.values[-1]:.0f} MB/s, RSS growth "
            f"{growth.values[-1] if growth.values else float('nan'):.1f} MiB")
        time.sleep(1.0)
    ratio = Series("×")
    for a, b in zip(solo.values, shared.values, strict=False):
        ratio.add(b / a)
    return {"solo": solo, "beside_slow": shared, "ratio": ratio, "rss_growth": growth,
            "slow_reader_rate": slow_rate, "error": error}
