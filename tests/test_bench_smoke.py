"""`python -m bench.rpc --quick` runs end to end and reports numbers for every system.

No timing assertions: only that the benchmark starts its processes, measures,
exits 0 and writes positive figures. FastStream is a benchmark-only dependency
(bench/requirements.txt), not installed by `make test`: without it the peer
must be reported as not measured, never given figures.
"""

from __future__ import annotations

import importlib.util
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
    measured = ["switchboard", "asyncredisrpc", "floor"]
    if importlib.util.find_spec("faststream") is not None:
        measured.append("faststream")
    else:
        assert "faststream" not in doc["systems"]
        assert "not importable" in doc["not_measured"]["faststream"]
        assert "NOT MEASURED: faststream" in proc.stdout
    for system in measured:
        result = doc["systems"][system]
        assert "error" not in result, result
        for phase in ("c1", f"c{conc}"):
            assert result[phase]["calls_per_s"] > 0, (system, phase)
            assert result[phase]["ok"] > 0, (system, phase)
            assert result[phase]["errors"] == 0, (system, phase)
        assert result["c1"]["lat_ms"]["p50"] > 0
        assert result["c1"]["lat_ms"]["p99"] > 0
        assert system in proc.stdout
        if system != "switchboard":
            assert doc["ratios"][f"{system}/switchboard throughput c1"] > 0
            assert doc["ratios"][f"switchboard/{system} latency p50 c1"] > 0
    assert set(doc["goal"]) >= {"c1 p50 met", f"c{conc} throughput met"}
