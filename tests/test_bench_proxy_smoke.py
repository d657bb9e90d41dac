"""`python -m bench.proxy --quick --no-install` runs end to end and cleans up.

No timing assertions. `--no-install` keeps `make test` away from apt-get and
pip: a tool that is missing here (wrk, nginx, haproxy, aiohttp) must be
reported as not measured, never given figures. Every system that can run is
still started and must answer the backend's body through itself; the gateway
always can (it needs nothing beyond the dev requirements). Its five targets
(API key; pass-through and tunnel routes; public route; JWT plus a rate limit) run
on one gateway process, started as deployed, and each must prove it is what it
claims: 401 without its credential, the rate limiter's headers exactly where the
limit applies, the hot path it runs (the C modules whenever the build is fresh).
`switchboard-py`, the Python path alone, runs on a second process when the first
runs C modules, and lists none.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bench.proxy_gateway import c_unavailable
from bench.proxy_report import W
from bench.proxy_targets import GATEWAY_TARGETS, PYTHON_PATH_TARGETS
from common.compiled import C_MODULES
from tests.bench_smoke import left_running, run_quick

pytestmark = pytest.mark.timeout(150)


def test_proxy_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "proxy.json"
    logs = tmp_path / "logs"
    proc = run_quick("bench.proxy", out, logs)
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
    # The gateway is always started, registers the backend (with a credential:
    # heartbeats need one) and proxies to it, for each of its five targets. It runs
    # the C modules whenever the build is fresh (and SWITCHBOARD_C is not 0 here).
    no_c = c_unavailable()
    gateways = {n: doc["targets"][n] for n in GATEWAY_TARGETS if n not in PYTHON_PATH_TARGETS}
    state = gateways["switchboard"]["checks"]["hot_path"]
    c_modules = gateways["switchboard"]["checks"]["c_modules"]
    if no_c:
        assert c_modules == [], no_c
    else:
        assert state == "compiled" and sorted(c_modules) == sorted(C_MODULES), c_modules
    shown = ", ".join(m.rpartition(".")[2] for m in c_modules) or "none"  # (`_cresp`, ...)
    assert f"C modules: {shown}" in proc.stdout
    for result in gateways.values():
        assert result["body_ok"]
        checks = result["checks"]
        assert (checks.pop("hot_path"), checks.pop("c_modules")) == (state, c_modules)
    assert gateways["switchboard"]["url"].endswith("/svc/echo/api/echo")
    assert gateways["switchboard-auth"]["url"] == gateways["switchboard"]["url"]
    assert gateways["switchboard-open"]["url"].endswith("/open/api/echo")
    assert gateways["switchboard-passthrough"]["url"].endswith("/raw/api/echo")
    assert gateways["switchboard-tunnel"]["url"].endswith("/tun/api/echo")
    # One gateway process for all five.
    assert len({urlsplit(r["url"]).netloc for r in gateways.values()}) == 1
    assert gateways["switchboard"]["checks"] == {
        "ratelimit_limit": None,
        "spliced": False,
        "status_without_credential": 401,
    }
    assert gateways["switchboard-open"]["checks"] == {"ratelimit_limit": None, "spliced": False}
    for spliced in ("switchboard-passthrough", "switchboard-tunnel"):
        assert gateways[spliced]["checks"] == {"ratelimit_limit": None, "spliced": True}
    assert gateways["switchboard-auth"]["checks"] == {
        "ratelimit_limit": "1000000",
        "spliced": False,
        "status_without_credential": 401,
    }
    # The Python path alone, on a gateway of its own, when the first one runs C.
    if no_c:
        assert doc["not_measured"]["switchboard-py"] == no_c
        assert f"NOT MEASURED: switchboard-py: {no_c}" in proc.stdout
    else:
        py = doc["targets"]["switchboard-py"]
        assert py["body_ok"] and py["checks"]["c_modules"] == []
        assert py["checks"]["hot_path"] == "compiled"
        assert py["url"].endswith("/svc/echo/api/echo")
        assert urlsplit(py["url"]).netloc != urlsplit(gateways["switchboard"]["url"]).netloc
        assert f"{'switchboard-py':<{W}} compiled, C modules: none" in proc.stdout
        if wrk and "x_nginx" in py.get("derived", {}):
            python_path = doc["goals"]["python_path"]
            assert python_path["x_nginx"] == py["derived"]["x_nginx"]
            assert "req/s c64 switchboard-py >= 0.5x nginx's" in proc.stdout
            assert "the default path (switchboard, with the C modules) against it" in proc.stdout
    # The credentials sent by wrk are not written out.
    text = out.read_text()
    assert "sbk_" not in text and "Bearer" not in text
    if wrk:
        for name in gateways:
            assert name not in doc["not_measured"]
            sent = "-H Authorization: <redacted>" in gateways[name]["loaded"]["cmd"]
            public = ("switchboard-open", "switchboard-passthrough", "switchboard-tunnel")
            assert sent == (name not in public), name
        assert {"x_nginx_met", "x_best_python_met", "added_c1_p50_met"} <= set(doc["goals"])
        # Issue 6: auth and rate limiting on / off, on the same gateway.
        issue6 = doc["goals"]["auth_vs_open"]
        expected = issue6["auth_rps"] / issue6["open_rps"]
        assert issue6["ratio"] == pytest.approx(expected, abs=0.006)
        assert issue6["goal"] == 0.85 and isinstance(issue6["met"], bool)
        verdict = "met" if issue6["met"] else "NOT met"
        line = f"switchboard-auth / switchboard-open >= 0.85 {issue6['ratio']:>6.2f}  {verdict}"
        assert line in proc.stdout, proc.stdout[-2000:]
        # The Python floor (it needs uvloop only) is reported beside the goals, for scale.
        floor = doc["targets"]["python-floor"]
        assert doc["goals"]["floor_us_per_req"] == floor["loaded"]["cpu"]["proxy_us_per_req"]
        assert "for scale: python-floor, a uvloop byte relay" in proc.stdout
        # So is the reference doing the normal path's header work alone, on its request.
        lean = doc["targets"]["python-lean"]
        assert lean["url"].endswith("/svc/echo/api/echo") and lean["body_ok"]
        assert doc["goals"]["lean_us_per_req"] == lean["loaded"]["cpu"]["proxy_us_per_req"]
        assert "python-lean, the normal path's header work alone" in proc.stdout
        # The pass-through route against nginx, when nginx ran.
        # The pass-through route, checked and as a tunnel, against nginx, when nginx ran.
        for key, name in (("passthrough", "switchboard-passthrough"),
                          ("tunnel", "switchboard-tunnel")):  # fmt: skip
            if "x_nginx" in doc["targets"][name].get("derived", {}):
                goal = doc["goals"][key]
                assert goal["goal"] == 1.0 and isinstance(goal["met"], bool)
                assert f"{name:<23} >= 1.0x nginx's" in proc.stdout
    else:
        for name in gateways:
            assert "wrk is not installed" in doc["not_measured"][name]
        assert not doc["goals"]
    # Nothing is left running: nginx and haproxy name their config under the log dir.
    left = left_running(logs)
    assert not left, left
