"""Runs the atheris fuzz target (``fuzz_machines.py``) for a bounded number of inputs.

libFuzzer owns its process (it exits on a finding), so the target runs in a child process;
a crash makes it exit non-zero and prints the input that caused it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

HERE = Path(__file__).resolve().parent
RUNS = int(os.environ.get("ATHERIS_RUNS", "100000"))


def test_machines_under_atheris(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent))
    result = subprocess.run(
        [sys.executable, str(HERE / "fuzz_machines.py"), f"-runs={RUNS}", "-seed=1",
         "-max_len=8192", "-max_total_time=60", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done" in result.stderr
