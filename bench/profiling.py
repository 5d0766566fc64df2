"""Where the proxy spends its CPU: py-spy samples the proxy subprocess while a workload runs.

py-spy (``pip install py-spy``) attaches to the running ``python -m proxy run`` by pid, samples
its Python stacks (idle threads excluded, so waiting in epoll does not count) and writes
collapsed stacks. This module turns them into the top functions by *self* time (where the CPU
actually went; time inside C — OpenSSL, send()/recv() — is charged to the Python function
that called it) and by *inclusive* time (which code paths are expensive).
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def record(pid: int, out: Path, workload: Callable[[], Any], rate: int = 500) -> dict[str, Any]:
    """Sample ``pid`` while ``workload()`` runs; summarise the stacks."""
    exe = py_spy()
    if exe is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    spy = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", str(rate), "--format",
                            "raw", "--nolineno", "--output", str(out), "--duration", "600"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let it attach
    try:
        workload()
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    if not out.exists():
        return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}"}
    return summarise(out)


def _short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker == "/lib/python3":
                where = "stdlib" + where[where.index("/"):] if "/" in where else where
            break
    else:
        if "/proxy/" in where:
            where = "proxy/" + where.split("/proxy/", 1)[1]
    return f"{name} ({where})"


# Leaf frames that are waiting, not working: idle executor threads blocked on their queue,
# and the event loop blocked in epoll_wait. py-spy can count them as active; they are
# reported as the idle share and left out of the percentages.
IDLE_LEAVES = {"_worker", "wait", "Condition.wait", "select", "EpollSelector.select"}


# Frames every sample passes through (interpreter start, the loop itself): not informative.
SCAFFOLD = {"<module>", "_run_code", "_run_module_as_main", "run", "Runner.run", "main",
            "cmd_run", "BaseEventLoop.run_until_complete", "BaseEventLoop.run_forever",
            "BaseEventLoop._run_once", "Handle._run", "Thread._bootstrap",
            "Thread._bootstrap_inner", "Thread.run"}


def summarise(path: Path, top: int = 12) -> dict[str, Any]:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        if frames and frames[0].startswith("process ") or frames and frames[0].startswith("thread "):
            frames = frames[1:]
        if not frames:
            continue
        if frames[-1].split(" (", 1)[0] in IDLE_LEAVES:
            idle += n
            continue
        total += n
        self_time[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    pct = (lambda n: round(100.0 * n / total, 1)) if total else (lambda n: 0.0)
    return {"samples": total, "idle_samples": idle,
            "self": [(f, pct(n)) for f, n in self_time.most_common(top)],
            "inclusive": [(f, pct(n)) for f, n in inclusive.most_common()
                          if f.split(" (", 1)[0] not in SCAFFOLD][:top]}
