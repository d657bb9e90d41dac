"""What the smoke tests of `bench.proxy` and `bench.ws` share: one quick run, and
the processes it left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

from tests.helpers import ROOT


def run_quick(module: str, out: Path, logs: Path) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE --quick --no-install`, JSON to `out`, configs and logs to `logs`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("REDIS_URL", None)  # the benchmark starts its own redis-server
    argv = [sys.executable, "-m", module, "--quick", "--no-install"]
    argv += ["--json", str(out), "--log-dir", str(logs)]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=130)


def left_running(logs: Path) -> list[int]:
    """The PIDs of processes naming `logs` on their command line (nginx and haproxy
    name their config there, the load clients their output)."""
    return [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(str(logs) in arg for arg in p.info["cmdline"] or [])
    ]
