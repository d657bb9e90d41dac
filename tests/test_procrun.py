"""`common.procrun`: honcho gives a process SHUTDOWN_GRACE (and a margin) to stop, not 5 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, wait_for

pytestmark = pytest.mark.timeout(60)

# Exits 7 s after its SIGTERM, as a worker draining a long call does; honcho's own
# deadline (5 s) would kill it first.
_DRAINING = """
import signal, sys, time
def drain(*_):
    time.sleep(7)
    print("drained", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, drain)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_draining_process_gets_the_shutdown_grace(tmp_path: Path) -> None:
    script = tmp_path / "draining.py"
    script.write_text(_DRAINING)
    # `quick` stops at once, as most services do: honcho's deadline starts with it.
    (tmp_path / "Procfile").write_text(
        f"slow: exec {sys.executable} {script}\nquick: exec sleep 60\n"
    )
    log = tmp_path / "procrun.log"
    env = {**os.environ, "SHUTDOWN_GRACE": "4", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        runner = subprocess.Popen(
            [sys.executable, "-m", "common.procrun", "start", "-f", "Procfile", "-d", "."],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: "ready" in log.read_text(), timeout=20)
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
    output = log.read_text()
    assert "drained" in output, output
    assert "SIGKILL" not in output, output
    assert "slow.1 stopped (rc=0)" in output, output
