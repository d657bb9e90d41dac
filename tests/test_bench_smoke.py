"""`python -m bench.rpc --quick` runs end to end and reports numbers for both systems.

No timing assertions: only that the benchmark starts its processes, measures,
exits 0 and writes positive figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(120)


def test_rpc_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "rpc.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("REDIS_URL", None)  # the benchmark starts its own redis-server
    proc = subprocess.run(
        [sys.executable, "-m", "bench.rpc", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    conc = doc["params"]["concurrency"]
    for system in ("switchboard", "floor"):
        result = doc["systems"][system]
        assert "error" not in result, result
        for phase in ("c1", f"c{conc}"):
            assert result[phase]["calls_per_s"] > 0, (system, phase)
            assert result[phase]["ok"] > 0, (system, phase)
            assert result[phase]["errors"] == 0, (system, phase)
        assert result["c1"]["lat_ms"]["p50"] > 0
        assert result["c1"]["lat_ms"]["p99"] > 0
    assert doc["ratios"]["floor/switchboard throughput c1"] > 0
    assert "switchboard" in proc.stdout and "floor" in proc.stdout
