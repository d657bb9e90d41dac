"""`python -m bench.proxy --quick --no-install` runs end to end and cleans up.

No timing assertions. `--no-install` keeps `make test` away from apt-get and
pip: a tool that is missing here (wrk, nginx, haproxy, aiohttp) must be
reported as not measured, never given figures. Every system that can run is
still started and must answer the backend's body through itself; the gateway
always can (it needs nothing beyond the dev requirements).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(150)


def test_proxy_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "proxy.json"
    logs = tmp_path / "logs"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("REDIS_URL", None)  # the benchmark starts its own redis-server
    argv = [sys.executable, "-m", "bench.proxy", "--quick", "--no-install"]
    argv += ["--json", str(out), "--log-dir", str(logs)]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=130)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    wrk = shutil.which("wrk") is not None
    for name in doc["params"]["targets"]:
        result = doc["targets"].get(name)
        if name in doc["not_measured"]:
            assert f"NOT MEASURED: {name}" in proc.stdout
            assert result is None or "loaded" not in result
            continue
        assert result is not None and "error" not in result, result
        assert result["body_ok"], name
        for phase in ("loaded", "c1"):
            run = result[phase]
            assert run["rps"] > 0 and run["requests"] > 0, (name, phase)
            assert run["non_2xx"] == 0 and not any(run["socket_errors"].values()), (name, phase)
            assert run["lat_ms"]["p50"] > 0, (name, phase)
    # The gateway is always started, registers the backend and proxies to it.
    gateway = doc["targets"]["switchboard"]
    assert gateway["body_ok"] and gateway["url"].endswith("/svc/echo/api/echo")
    if wrk:
        assert "switchboard" not in doc["not_measured"]
        assert {"x_nginx_met", "x_best_python_met", "added_c1_p50_met"} <= set(doc["goals"])
    else:
        assert "wrk is not installed" in doc["not_measured"]["switchboard"]
        assert not doc["goals"]
    # Nothing is left running: nginx and haproxy name their config under the log dir.
    left = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(str(logs) in arg for arg in p.info["cmdline"] or [])
    ]
    assert not left, left
