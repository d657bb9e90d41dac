"""`python -m bench.ws --quick --no-install` runs end to end and cleans up.

No timing assertions. `--no-install` keeps `make test` away from apt-get and
pip: a peer that cannot run here (nginx missing, or aiohttp for the
aiohttp-relay) must be reported as not measured, never given figures. Every
target that can run must echo every message through itself; Switchboard always
can (it needs nothing beyond the dev requirements), and must prove it is what
it claims: the relay refuses a client without a credential, and each idle
connection of the memory test is an authenticated `/ws` session.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.bench_smoke import left_running, run_quick

pytestmark = pytest.mark.timeout(150)


def _listening(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((parts.hostname or "127.0.0.1", parts.port or 80)) == 0


def test_ws_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "ws.json"
    logs = tmp_path / "logs"
    proc = run_quick("bench.ws", out, logs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["params"]["targets"] == [
        "direct",
        "nginx",
        "switchboard",
        "aiohttp-relay",
        "sanic-relay",
    ]
    for name in doc["params"]["targets"]:
        result = doc["targets"].get(name)
        if name in doc["not_measured"]:
            assert f"NOT MEASURED: {name}" in proc.stdout
            assert result is None
            continue
        assert result is not None and "error" not in result, result
        for phase in ("warmup", "loaded", "c1"):
            run = result[phase]
            assert run["messages"] > 0 and run["errors"] == 0, (name, phase, run["first_error"])
            assert run["lat_ms"]["p50"] > 0, (name, phase)
        assert result["loaded"]["cpu_s"]["upstream"] >= 0
        if name != "direct":
            assert "relay" in result["derived"]["cpu_us_per_msg"], name
        assert name in proc.stdout
    # The relay through the websocket service is always measured, with a credential.
    sb = doc["targets"]["switchboard"]
    assert sb["url"].endswith("/ws/proxy/echo/ws/echo")
    assert sb["checks"] == {"status_without_credential": 401}
    assert sb["heartbeat_failures"] == 0
    # The memory test: every idle connection open, each an authenticated session.
    mem = doc["memory"]["switchboard"]
    assert "error" not in mem, mem
    assert mem["opened"] == mem["requested"] == doc["params"]["idle_conns"] > 0
    assert mem["open_errors"] == 0
    assert mem["checks"] == {"status_bad_token": 401, "ping": "pong"}
    assert mem["server_counted"] >= mem["opened"]
    assert mem["kb_per_conn"] is not None
    assert doc["memory"]["sanic-relay"]["opened"] == doc["params"]["idle_conns"]
    # The goals are printed, each with its verdict.
    goals = doc["goals"]
    assert isinstance(goals["idle_met"], bool)
    assert "RSS per idle authenticated connection < 20 KB" in proc.stdout
    if "nginx" in doc["targets"]:
        assert isinstance(goals["cpu_x_nginx_met"], bool)
        assert "relay CPU per round trip <= 1.5x nginx's" in proc.stdout
    if "aiohttp-relay" in doc["targets"]:
        assert isinstance(goals["added_met"], bool)
    # The credentials are not written out.
    text = out.read_text()
    assert "Bearer" not in text and "eyJ" not in text
    # Nothing is left running: nginx and the load clients name the log dir; the
    # servers each listened on a port of their own.
    left = left_running(logs)
    assert not left, left
    urls = [r["url"] for r in doc["targets"].values()] + [m["url"] for m in doc["memory"].values()]
    assert not [u for u in urls if _listening(u)]
