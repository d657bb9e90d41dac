"""The targets of `bench.proxy`: what every target is, and how one is checked.

  nginx, haproxy     configs copied from the peers' proxy_bench.py (`bench.proxy_nginx`)
  aiohttp,           Python peer proxies, each in its own process:
  sanic-aiohttp      `python -m bench.proxy --serve KIND` (`bench.proxy_peers`)
  backend            our Python echo backend, the fallback when nginx is missing
  switchboard,       one `python -m webapi` (`Gateway`, `bench.proxy_gateway`) for all
  switchboard-*      but switchboard-py (a second one), the backend registered by
                     heartbeat; each target is a path, a credential and a live policy
                     (see GATEWAY_TARGETS)

`wait_http` polls a target until it answers; `body_ok` checks it answered the
backend's body.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping

PATH = "/api/echo"
SERVICE = "echo"  # the name the backend registers under at the gateway
# The peers' ~100-byte JSON body, byte for byte.
BODY = json.dumps(
    {
        "ok": True,
        "service": "backend",
        "node": 1,
        "data": "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRS",
    },
    separators=(",", ":"),
)
# Switchboard right after nginx: the first goal compares those two. The gateway's
# auth-off and auth-on targets right after it, back to back: issue 6's ratio
# compares those two, and the VM's speed drifts over minutes.
TARGETS = (
    "direct",
    "nginx",
    "switchboard",
    "switchboard-py",
    "switchboard-passthrough",
    "switchboard-tunnel",
    "switchboard-open",
    "switchboard-auth",
    "haproxy",
    "python-floor",
    "python-lean",
    "aiohttp",
    "sanic-aiohttp",
)
PYTHON_PEERS = ("aiohttp", "sanic-aiohttp")
# Measured on one gateway process started as deployed (the C modules on whenever the
# compiled build is used: `common.compiled.c_module`), one after the other:
#   switchboard       /svc/echo/... with an API key (Authorization: Bearer sbk_...), no limit
#   switchboard-passthrough  /raw/... : a pass-through policy route to `echo` (spliced)
#   switchboard-tunnel  /tun/... : the same route as a tunnel (spliced, unread after the first)
#   switchboard-open  /open/... : a public policy route to `echo`, no credential, no limit
#   switchboard-auth  /svc/echo/... with a JWT and the BENCH_LIMIT rate limit
# and on a second gateway process started with SWITCHBOARD_C=0:
#   switchboard-py    the switchboard target through the compiled Python path alone
GATEWAY_TARGETS = ("switchboard", "switchboard-py", "switchboard-passthrough",
                   "switchboard-tunnel", "switchboard-open", "switchboard-auth")  # fmt: skip
PYTHON_PATH_TARGETS = ("switchboard-py",)
DESCRIPTIONS = {
    "direct": "wrk -> backend (the floor)",
    "nginx": "nginx 1 worker, upstream keepalive 64",
    "switchboard": "python -m webapi as deployed, 1 process, /svc/echo/... with a key, no limit",
    "switchboard-py": "the same, on a gateway with SWITCHBOARD_C=0: the Python path alone",
    "switchboard-passthrough": "the same gateway, /raw/... pass-through policy route (a splice)",
    "switchboard-tunnel": "the same gateway, /tun/... the same route as a tunnel (unread splice)",
    "switchboard-open": "the same gateway, /open/... public policy route: no credential, no limit",
    "switchboard-auth": "the same gateway, /svc/echo/... with a JWT and a rate limit (GCRA)",
    "haproxy": "haproxy nbthread 1, http-reuse always",
    "python-floor": "uvloop bytes relay, no parsing or checks: the ceiling of a Python proxy",
    "python-lean": "the normal path's header work only, /svc/echo/... with a key (a reference)",
    "aiohttp": "aiohttp.web + shared ClientSession, JSON re-encoded",
    "sanic-aiohttp": "Sanic 1 process + shared aiohttp ClientSession",
}


def wait_http(
    url: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    headers: Mapping[str, str] | None = None,
) -> str:
    """Poll until `url` answers 200; returns the body (the peers' `wait_http`)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            req = urllib.request.Request(url, headers=dict(headers or {}))
            with urllib.request.urlopen(req, timeout=2) as r:
                body: str = r.read().decode()
                if r.status == 200:
                    return body
                last = f"status {r.status}"
        except Exception as e:
            last = repr(e)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s: {last}")


def probe(url: str, headers: Mapping[str, str]) -> tuple[int, dict[str, str], str]:
    """One GET on a keep-alive connection, as wrk sends it (urllib would ask for
    `Connection: close`, which a pass-through route leaves to the gateway's own
    handling): status, headers (lower-case names) and body, also for a 4xx/5xx."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=5)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                     headers=dict(headers))  # fmt: skip
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        conn.close()


def body_ok(text: str) -> bool:
    try:
        return bool(json.loads(text) == json.loads(BODY))
    except ValueError:
        return False
