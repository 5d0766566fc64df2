"""``workers`` and ``event_loop``: defaults, errors that name the key, the loop really used."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from proxy import runtime
from proxy.config import ConfigError
from tests.test_config import MINIMAL, load_text


def test_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL)
    assert cfg.runtime.workers == 1
    assert cfg.runtime.event_loop == runtime.default_event_loop()
    cfg = load_text(tmp_path, 'workers = "auto"\n' + MINIMAL)
    assert cfg.runtime.workers == min(len(os.sched_getaffinity(0)), runtime.MAX_DEFAULT_WORKERS)
    with pytest.raises(ConfigError, match="auto"):
        load_text(tmp_path, 'workers = "many"\n' + MINIMAL)
    cfg = load_text(tmp_path, 'workers = 3\nevent_loop = "asyncio"\n' + MINIMAL)
    assert cfg.runtime == runtime.Runtime(workers=3, event_loop="asyncio")


@pytest.mark.parametrize(("line", "words"), [
    ("workers = 0", "workers: must be between 1 and 64 (got 0); 1 runs one process"),
    ('workers = "2"', "workers: must be a whole number"),
    ("workers = 2.5", "workers: must be a whole number"),
    ('event_loop = "tokio"', "event_loop: must be one of asyncio, uvloop (got 'tokio')"),
])
def test_errors_name_the_key(tmp_path: Path, line: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, line + "\n" + MINIMAL)
    assert str(info.value).startswith(f"{tmp_path / 'config.toml'}: {words}"), str(info.value)


# Not named event_loop: pytest-asyncio before 0.25 has a fixture of that name.
@pytest.mark.parametrize("loop_name", runtime.EVENT_LOOPS)
def test_run_on_the_chosen_loop(loop_name: runtime.EventLoop) -> None:
    async def which() -> int:
        module = type(asyncio.get_running_loop()).__module__.split(".")[0]
        return runtime.EVENT_LOOPS.index(module)  # type: ignore[arg-type]

    assert runtime.run_on(loop_name, which()) == runtime.EVENT_LOOPS.index(loop_name)
