"""Proxy benchmark: the gateway's `/svc/<service>/<path>` against its peers, in one run.

    python -m bench.proxy [--quick] [--json PATH] [--targets ...] [--no-install] ...

One fast echo backend (nginx `return 200` with a 105-byte JSON body, the
peers' backend; a small Python server when nginx is missing) sits behind
each target:

  direct         wrk -> backend, no proxy: the floor
  nginx          nginx, 1 worker, proxy_pass to an upstream with keepalive 64
  switchboard    `python -m webapi` (1 process) with the backend registered by
                 `POST /heartbeat` as service `echo`, reached at
                 /svc/echo/api/echo: the gateway's normal proxy path
  haproxy        haproxy, 1 thread, http-reuse always
  aiohttp        aiohttp.web dispatcher with one shared ClientSession
  sanic-aiohttp  Sanic (1 process) with one shared aiohttp ClientSession

The peers' method (`/work/shared/bench/peers/proxy_bench.py`): per target a
discarded warm-up, `wrk -t1 -c64 -d10s --latency` and `wrk -t1 -c1 -d3s
--latency`. The nginx and haproxy configs, the Python peers and the wrk driver
are copied from that file (outside this repository, so a clean clone can run
this one). Printed: req/s at c64, p50/p99, the ratio to nginx, the p50 added at
1 connection over direct, the CPU each proxy spent per request, each system's
ratio to Switchboard, and the issue's goals (met / not met).

Missing tools (wrk, nginx, haproxy) are apt-get installed when running as
root, and aiohttp is pip-installed from its pinned line in
bench/requirements.txt, unless `--no-install`. Whatever is still missing is
reported as NOT MEASURED, never given figures. Every process started here is
stopped by its PID on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "bench" / "requirements.txt"
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
# Switchboard right after nginx: the first goal compares those two.
TARGETS = ("direct", "nginx", "switchboard", "haproxy", "aiohttp", "sanic-aiohttp")
PYTHON_PEERS = ("aiohttp", "sanic-aiohttp")
DESCRIPTIONS = {
    "direct": "wrk -> backend (the floor)",
    "nginx": "nginx 1 worker, upstream keepalive 64",
    "switchboard": "python -m webapi, 1 process, /svc/echo/... (normal path)",
    "haproxy": "haproxy nbthread 1, http-reuse always",
    "aiohttp": "aiohttp.web + shared ClientSession, JSON re-encoded",
    "sanic-aiohttp": "Sanic 1 process + shared aiohttp ClientSession",
}
APT_PACKAGE = {"wrk": "wrk", "nginx": "nginx", "haproxy": "haproxy"}
W = max(len(t) for t in TARGETS)

# The goals for the gateway's normal proxy path.
GOAL_X_NGINX = 0.5  # switchboard req/s at c64 / nginx's, at least
GOAL_X_PYTHON = 2.0  # switchboard req/s at c64 / the best Python proxy's, at least
GOAL_C1_ADDED_MS = 0.15  # switchboard c1 p50 - direct c1 p50, under
OTHER_BUSY_WARN = 10.0  # % of the box used by others above which figures are disturbed


# --------------------------------------------------------------------------
# Processes: only PIDs started here are ever signalled.
# --------------------------------------------------------------------------
_CHILDREN: list[subprocess.Popen[bytes]] = []


def spawn(
    argv: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal Ctrl-C reaches us, and we stop it
        )
    _CHILDREN.append(proc)
    return proc


def stop_child(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM (nginx, haproxy and Sanic then stop), SIGKILL after `grace`."""
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)
        except ProcessLookupError:
            pass
    if proc in _CHILDREN:
        _CHILDREN.remove(proc)


def stop_all_children() -> None:
    """Stop every child; a second Ctrl-C or SIGTERM cannot interrupt it."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for proc in reversed(list(_CHILDREN)):
            stop_child(proc, grace=3.0)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` blocks that stop children


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> str:
    """Poll until `url` answers 200; returns the body (the peers' `wait_http`)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                body: str = r.read().decode()
                if r.status == 200:
                    return body
                last = f"status {r.status}"
        except Exception as e:
            last = repr(e)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s: {last}")


# --------------------------------------------------------------------------
# Tools: found, installed when allowed, or reported missing.
# --------------------------------------------------------------------------
def which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    sbin = f"/usr/sbin/{tool}"
    return sbin if os.access(sbin, os.X_OK) else None


def _run_quiet(argv: list[str], timeout: float) -> tuple[bool, str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{type(e).__name__}: {e}"
    return p.returncode == 0, (p.stdout + p.stderr)[-500:]


def apt_install(tools: list[str]) -> None:
    """apt-get the missing tools (as root only); failures leave them missing."""
    if not tools:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"[proxy] missing {', '.join(tools)}: not root or no apt-get, not installing")
        return
    pkgs = [APT_PACKAGE[t] for t in tools]
    print(f"[proxy] apt-get install {' '.join(pkgs)} ...", flush=True)
    _run_quiet(["apt-get", "update", "-qq"], 300)
    base = ["apt-get", "install", "-y", "-qq", "--no-install-recommends"]
    ok, out = _run_quiet(base + pkgs, 600)
    if not ok:  # one unavailable package must not block the others
        for pkg in pkgs:
            ok, out = _run_quiet([*base, pkg], 300)
            if not ok:
                print(f"[proxy] apt-get install {pkg} failed: {out.strip()[-200:]}")


def aiohttp_pin() -> str | None:
    """The `aiohttp==X` line of bench/requirements.txt."""
    try:
        lines = REQUIREMENTS.read_text().splitlines()
    except OSError:
        return None
    return next((ln.split("#")[0].strip() for ln in lines if ln.startswith("aiohttp")), None)


def ensure_aiohttp(install: bool) -> str | None:
    """None when aiohttp is importable (after a pinned pip install if allowed), else why not."""
    if importlib.util.find_spec("aiohttp") is not None:
        return None
    pin = aiohttp_pin()
    if install and pin:
        print(f"[proxy] pip install {pin} ...", flush=True)
        argv = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", pin]
        ok, out = _run_quiet(argv, 300)
        importlib.invalidate_caches()
        if ok and importlib.util.find_spec("aiohttp") is not None:
            return None
        return f"pip install {pin} failed: {out.strip()[-200:]}"
    how = f"pip install {pin}" if pin else "pip install aiohttp"
    return f"aiohttp is not importable ({how}, or make bench-proxy)"


def prepare_tools(targets: list[str], backend: str, install: bool) -> dict[str, str | None]:
    """Each needed tool's path (None = missing after any install)."""
    needed = {"wrk"}
    if backend in ("auto", "nginx") or "nginx" in targets:
        needed.add("nginx")
    if "haproxy" in targets:
        needed.add("haproxy")
    missing = sorted(t for t in needed if not which(t))
    if install:
        apt_install(missing)
    return {t: which(t) for t in sorted(needed)}


# --------------------------------------------------------------------------
# nginx and haproxy: configs copied from /work/shared/bench/peers/proxy_bench.py
# (`nginx_conf`, `start_nginx_backend`, `start_nginx_proxy`, `start_haproxy`).
# --------------------------------------------------------------------------
def nginx_conf(workdir: Path, server_block: str, upstream: str = "") -> str:
    for d in ("cb", "px", "fc", "uw", "sc"):
        (workdir / d).mkdir(parents=True, exist_ok=True)
    return f"""
user root;
worker_processes 1;
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 65;
  client_body_temp_path {workdir}/cb;
  proxy_temp_path {workdir}/px;
  fastcgi_temp_path {workdir}/fc;
  uwsgi_temp_path {workdir}/uw;
  scgi_temp_path {workdir}/sc;
  {upstream}
  {server_block}
}}
"""


def start_nginx(
    nginx: str, name: str, tmp: Path, server_block: str, upstream: str = ""
) -> subprocess.Popen[bytes]:
    wd = tmp / name
    wd.mkdir(parents=True, exist_ok=True)
    conf = wd / "nginx.conf"
    conf.write_text(nginx_conf(wd, server_block, upstream))
    return spawn([nginx, "-c", str(conf), "-p", f"{wd}/"], tmp / f"{name}.log")


def start_nginx_backend(nginx: str, tmp: Path, port: int) -> subprocess.Popen[bytes]:
    body = BODY.replace("'", "\\'")
    block = f"""server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ default_type application/json; return 200 '{body}'; }}
  }}"""
    return start_nginx(nginx, "nginx-backend", tmp, block)


def start_nginx_proxy(nginx: str, tmp: Path, port: int, bport: int) -> subprocess.Popen[bytes]:
    upstream = f"""upstream peer_backend {{
    server 127.0.0.1:{bport};
    keepalive 64;
    keepalive_requests 1000000;
  }}"""
    block = f"""server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://peer_backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}"""
    return start_nginx(nginx, "nginx-proxy", tmp, block, upstream)


def start_haproxy(haproxy: str, tmp: Path, port: int, bport: int) -> subprocess.Popen[bytes]:
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(f"""global
  nbthread 1
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  server s1 127.0.0.1:{bport}
""")
    return spawn([haproxy, "-f", str(cfg), "-db"], tmp / "haproxy.log")


# --------------------------------------------------------------------------
# Python servers, each in its own process: `python -m bench.proxy --serve KIND`.
# `aiohttp` and `sanic-aiohttp` are copied from the peers' proxy_bench.py
# (`serve_aiohttp`, `_run_sanic_proxy`, `serve_sanic_aiohttp`), unchanged but
# for style. `backend` is ours: the fallback backend when nginx is missing.
# --------------------------------------------------------------------------
def serve_backend(port: int, backend: str) -> None:
    """A minimal keep-alive HTTP/1.1 server answering BODY to every request."""
    import httptools

    body = BODY.encode()
    response = (
        b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )

    class Backend(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.transport: Any = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.close()

        def on_message_complete(self) -> None:
            self.transport.write(response)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(Backend, "127.0.0.1", port, backlog=4096)
        await asyncio.Event().wait()

    asyncio.run(main())


def serve_aiohttp(port: int, backend: str) -> None:
    """Simple dispatcher style: one shared ClientSession, forward body,
    decode the backend's JSON and return it with json_response()."""
    from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

    async def on_startup(app: Any) -> None:
        app["session"] = ClientSession(
            connector=TCPConnector(limit=100), timeout=ClientTimeout(total=10)
        )

    async def on_cleanup(app: Any) -> None:
        await app["session"].close()

    async def handler(request: Any) -> Any:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with request.app["session"].request(
            request.method, backend + request.path_qs, data=body or None, headers=headers
        ) as resp:
            data = await resp.json(content_type=None)
            return web.json_response(data, status=resp.status)

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handler)
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096,
        handle_signals=True,
    )  # fmt: skip


def serve_sanic_aiohttp(port: int, backend: str) -> None:
    """Sanic 1 worker + one shared aiohttp.ClientSession (limit 128), bytes passthrough."""
    import aiohttp
    from sanic import Sanic
    from sanic.response import raw

    app = Sanic("peer_sanic_aiohttp")

    @app.before_server_start
    async def setup(app: Any) -> None:
        app.ctx.client = aiohttp.ClientSession(
            base_url=backend,
            connector=aiohttp.TCPConnector(limit=128),
            timeout=aiohttp.ClientTimeout(total=10),
        )

    @app.after_server_stop
    async def teardown(app: Any) -> None:
        await app.ctx.client.close()

    async def forward(request: Any, path: str = "") -> Any:
        url = "/" + path + (("?" + request.query_string) if request.query_string else "")
        ctype = request.headers.get("content-type", "application/json")
        async with app.ctx.client.request(
            request.method, url, data=request.body or None, headers={"Content-Type": ctype}
        ) as r:
            status, body = r.status, await r.read()
            return raw(body, status=status, content_type=r.headers.get("Content-Type", ctype))

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    app.add_route(forward, "/", methods=methods, name="root")
    app.add_route(forward, "/<path:path>", methods=methods, name="any")
    app.run(
        host="127.0.0.1", port=port, single_process=True, access_log=False, debug=False,
        motd=False, backlog=4096,
    )  # fmt: skip


SERVERS = {
    "backend": serve_backend,
    "aiohttp": serve_aiohttp,
    "sanic-aiohttp": serve_sanic_aiohttp,
}


def _exit_with_parent() -> None:
    """Exit if the benchmark process dies without stopping us (e.g. SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(kind: str, port: int, backend: str, loop: str) -> None:
    _exit_with_parent()
    if loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    SERVERS[kind](port, backend)


def start_python(
    kind: str, tmp: Path, port: int, backend: str, loop: str
) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "bench.proxy", "--serve", kind, "--port", str(port)]
    argv += ["--backend-url", backend, "--loop", loop]
    return spawn(argv, tmp / f"{kind}.log", env=python_env())


# --------------------------------------------------------------------------
# The gateway: `python -m webapi` on a private redis-server, the backend
# registered by heartbeat (re-sent every second, as a backend does).
# --------------------------------------------------------------------------
class Heartbeat:
    """POST /heartbeat for the backend every `interval` seconds, in a thread."""

    def __init__(self, gateway: str, address: str, interval: float = 1.0) -> None:
        self.url = f"{gateway}/heartbeat"
        self.body = json.dumps({"service": SERVICE, "address": address}).encode()
        self.interval = interval
        self.stopped = threading.Event()
        self.failures = 0
        self.thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def beat(self) -> None:
        req = urllib.request.Request(
            self.url, data=self.body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=2) as r:
            if r.status != 200:
                raise RuntimeError(f"heartbeat answered {r.status}")

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.beat()
            except Exception:
                self.failures += 1

    def start(self) -> None:
        self.beat()  # the first one must succeed
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(3)


def start_gateway(tmp: Path, port: int, redis_url: str) -> subprocess.Popen[bytes]:
    env = python_env()
    env.update(
        REDIS_URL=redis_url, WEBAPI_PORT=str(port), BIND_HOST="127.0.0.1", LOG_LEVEL="WARNING"
    )
    return spawn([sys.executable, "-m", "webapi"], tmp / "switchboard.log", env=env)


# --------------------------------------------------------------------------
# wrk driver, copied from the peers' proxy_bench.py (`run_wrk`, `_ms`), plus
# the CPU time of the processes involved over each run.
# --------------------------------------------------------------------------
_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(tok: str) -> float | None:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", tok.strip())
    return round(float(m.group(1)) * _UNIT[m.group(2)], 4) if m else None


def run_wrk(wrk: str, url: str, conns: int, seconds: int) -> dict[str, Any]:
    argv = [wrk, "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s", url]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    out = p.stdout
    res: dict[str, Any] = {"cmd": " ".join(argv[1:]), "rc": p.returncode}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    lat: dict[str, float | None] = {}
    for q in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        lat[f"p{q}"] = _ms(m.group(1)) if m else None
    m = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    if m:
        lat["avg"], lat["max"] = _ms(m.group(1)), _ms(m.group(3))
    res["lat_ms"] = lat
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    res["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
        if m
        else {}
    )
    if not res["rps"]:
        res["raw"] = (out + p.stderr)[-800:]
    return res


def _tree_cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _tree(pid: int | None) -> list[psutil.Process]:
    """The process and its children (nginx's master and worker)."""
    if pid is None:
        return []
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def _box_busy() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + t.steal)


def _wrk_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once subprocess.run reaped it
    return r.ru_utime + r.ru_stime


def metered_wrk(
    wrk: str, url: str, conns: int, seconds: int, proxy_pid: int | None, backend_pid: int
) -> dict[str, Any]:
    """One wrk run, with the CPU seconds of the proxy, the backend and wrk over it."""
    proxy, backend = _tree(proxy_pid), _tree(backend_pid)
    before = (_tree_cpu(proxy), _tree_cpu(backend), _wrk_cpu(), _box_busy(), time.monotonic())
    res = run_wrk(wrk, url, conns, seconds)
    after = (_tree_cpu(proxy), _tree_cpu(backend), _wrk_cpu(), _box_busy(), time.monotonic())
    d = [a - b for a, b in zip(after, before, strict=True)]
    n = max(res["requests"], 1)
    wall = d[4]
    ours = d[0] + d[1] + d[2]
    res["cpu"] = {
        "proxy_us_per_req": round(d[0] / n * 1e6, 1) if proxy_pid else None,
        "proxy_cores": round(d[0] / wall, 2) if proxy_pid and wall > 0 else None,
        "backend_us_per_req": round(d[1] / n * 1e6, 1),
        "wrk_us_per_req": round(d[2] / n * 1e6, 1),
        # The rest of the box (other sessions, kernel threads), as a share of all CPUs.
        # CPU times tick at 10 ms, so a run shorter than a second says nothing.
        "other_busy_pct": (
            round(max(d[3] - ours, 0.0) / ((os.cpu_count() or 1) * wall) * 100, 1)
            if wall >= 1.0
            else None
        ),
    }
    return res


def measure(
    wrk: str, url: str, args: argparse.Namespace, proxy_pid: int | None, backend_pid: int
) -> dict[str, Any]:
    """The peers' `measure`: warm-up (discarded), the c64 run, the c1 run."""
    run_wrk(wrk, url, args.connections, args.warmup)
    loaded = metered_wrk(wrk, url, args.connections, args.duration, proxy_pid, backend_pid)
    c1 = metered_wrk(wrk, url, 1, args.c1_duration, proxy_pid, backend_pid)
    return {"loaded": loaded, "c1": c1}


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------
def body_ok(text: str) -> bool:
    try:
        return bool(json.loads(text) == json.loads(BODY))
    except ValueError:
        return False


def start_backend(
    args: argparse.Namespace, tools: dict[str, str | None], tmp: Path
) -> tuple[str, subprocess.Popen[bytes], int]:
    port = free_port()
    nginx = tools.get("nginx")
    if args.backend in ("auto", "nginx") and nginx:
        kind, proc = "nginx", start_nginx_backend(nginx, tmp, port)
    elif args.backend == "nginx":
        raise SystemExit("--backend nginx: nginx is not installed")
    else:
        kind, proc = "python", start_python("backend", tmp, port, "", args.loop)
    if not body_ok(wait_http(f"http://127.0.0.1:{port}{PATH}", args.ready_timeout, proc)):
        raise RuntimeError("the backend answered an unexpected body")
    return kind, proc, port


def bench_target(
    name: str,
    args: argparse.Namespace,
    tools: dict[str, str | None],
    tmp: Path,
    backend: tuple[subprocess.Popen[bytes], int],
    redis_url: str | None,
) -> dict[str, Any]:
    """Start `name`, check it answers the backend's body, measure it, stop it."""
    bproc, bport = backend
    backend_url = f"http://127.0.0.1:{bport}"
    out: dict[str, Any] = {"target": name, "desc": DESCRIPTIONS[name]}
    proc: subprocess.Popen[bytes] | None = None
    heartbeat: Heartbeat | None = None
    log = tmp / f"{name}.log"
    try:
        if name == "direct":
            url = backend_url + PATH
        else:
            port = free_port()
            url = f"http://127.0.0.1:{port}{PATH}"
            if name == "nginx":
                proc = start_nginx_proxy(tools["nginx"] or "nginx", tmp, port, bport)
            elif name == "haproxy":
                proc = start_haproxy(tools["haproxy"] or "haproxy", tmp, port, bport)
            elif name == "switchboard":
                assert redis_url is not None
                proc = start_gateway(tmp, port, redis_url)
                gateway = f"http://127.0.0.1:{port}"
                wait_http(f"{gateway}/health", args.ready_timeout, proc)
                heartbeat = Heartbeat(gateway, f"127.0.0.1:{bport}")
                heartbeat.start()
                url = f"{gateway}/svc/{SERVICE}{PATH}"
            else:
                proc = start_python(name, tmp, port, backend_url, args.loop)
        out["url"] = url
        out["body_ok"] = body_ok(wait_http(url, args.ready_timeout, proc))
        if not out["body_ok"]:
            raise RuntimeError(f"{url} answered a body other than the backend's")
        if not tools.get("wrk"):
            out["not_measured"] = "wrk is not installed (apt-get install wrk)"
            return out
        print(f"[proxy] {name}: measuring {url}", flush=True)
        out.update(measure(tools["wrk"] or "wrk", url, args, proc.pid if proc else None, bproc.pid))
        for phase in ("loaded", "c1"):
            if not out[phase]["rps"]:
                raise RuntimeError(f"wrk measured nothing ({phase}): {out[phase].get('raw')}")
        for p, what in ((proc, "the proxy"), (bproc, "the backend")):
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{what} exited with {p.returncode} during the run")
        if heartbeat is not None:
            out["heartbeat_failures"] = heartbeat.failures
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:300]
        tail = log_tail(log)
        if tail:
            out["log_tail"] = tail
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if proc is not None:
            stop_child(proc)
    return out


def unavailable(name: str, tools: dict[str, str | None], aiohttp_missing: str | None) -> str | None:
    """Why `name` cannot be measured here, or None."""
    if name in ("nginx", "haproxy") and not tools.get(name):
        return f"{name} is not installed (apt-get install {APT_PACKAGE[name]})"
    if name in PYTHON_PEERS and aiohttp_missing:
        return aiohttp_missing
    return None


def run_all(args: argparse.Namespace, tools: dict[str, str | None], tmp: Path) -> dict[str, Any]:
    aiohttp_missing = (
        ensure_aiohttp(args.install) if any(t in PYTHON_PEERS for t in args.targets) else None
    )
    results: dict[str, Any] = {}
    not_measured: dict[str, str] = {}
    redis_url = None
    with contextlib.ExitStack() as stack:
        if "switchboard" in args.targets:
            from common.embedded_redis import EmbeddedRedis

            redis_url = stack.enter_context(EmbeddedRedis()).url
        try:
            kind, bproc, bport = start_backend(args, tools, tmp)
            print(f"[proxy] backend: {kind} at http://127.0.0.1:{bport}{PATH}", flush=True)
            if kind != "nginx":
                print("[proxy] NOTE: not the peers' nginx backend; compare only within this run")
            for name in args.targets:
                why = unavailable(name, tools, aiohttp_missing)
                if why:
                    not_measured[name] = why
                    print(f"[proxy] {name}: NOT MEASURED: {why}", flush=True)
                    continue
                t = time.monotonic()
                r = bench_target(name, args, tools, tmp, (bproc, bport), redis_url)
                r["wall_s"] = round(time.monotonic() - t, 1)
                if "not_measured" in r:
                    not_measured[name] = r["not_measured"]
                    print(f"[proxy] {name}: body ok; NOT MEASURED: {r['not_measured']}")
                elif "error" in r:
                    print(f"[proxy]   ERROR: {r['error']}", flush=True)
                    if r.get("log_tail"):
                        print(r["log_tail"], flush=True)
                else:
                    L, C = r["loaded"], r["c1"]
                    print(
                        f"[proxy]   {L['rps']:.0f} req/s p50 {L['lat_ms']['p50']}ms p99 "
                        f"{L['lat_ms']['p99']}ms | c1 p50 {C['lat_ms']['p50']}ms ({r['wall_s']}s)",
                        flush=True,
                    )
                results[name] = r
        finally:
            stop_all_children()  # before the redis-server goes away
    return {"backend": kind, "targets": results, "not_measured": not_measured}


def _measured(results: dict[str, Any]) -> dict[str, Any]:
    return {n: r for n, r in results.items() if "loaded" in r and r["loaded"]["rps"]}


def derive(results: dict[str, Any]) -> None:
    """x nginx, added latency over direct, and ratios to Switchboard."""
    by = _measured(results)
    ng, direct, sb = by.get("nginx"), by.get("direct"), by.get("switchboard")
    for r in by.values():
        L, C = r["loaded"], r["c1"]
        d: dict[str, Any] = {}
        if ng:
            d["x_nginx"] = round(L["rps"] / ng["loaded"]["rps"], 3)
        if direct:
            dp, cp = direct["loaded"]["lat_ms"]["p50"], direct["c1"]["lat_ms"]["p50"]
            if dp is not None and L["lat_ms"]["p50"] is not None:
                d["added_p50_ms_c64"] = round(L["lat_ms"]["p50"] - dp, 3)
            if cp is not None and C["lat_ms"]["p50"] is not None:
                d["added_p50_ms_c1"] = round(C["lat_ms"]["p50"] - cp, 3)
        if sb and r is not sb:
            # throughput: system / switchboard (above 1: faster than switchboard);
            # latency: switchboard / system (above 1: switchboard is slower).
            d["rps_vs_switchboard"] = round(L["rps"] / sb["loaded"]["rps"], 2)
            sp, p = sb["c1"]["lat_ms"]["p50"], C["lat_ms"]["p50"]
            if sp and p:
                d["switchboard_c1_p50_vs"] = round(sp / p, 2)
        r["derived"] = d


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's three goals for the gateway's normal path; None = not checkable."""
    by = _measured(results)
    sb = by.get("switchboard")
    if not sb:
        return {}
    g: dict[str, Any] = {}
    x_nginx = sb["derived"].get("x_nginx")
    g["x_nginx"] = x_nginx
    g["x_nginx_met"] = None if x_nginx is None else x_nginx >= GOAL_X_NGINX
    python = {n: by[n]["loaded"]["rps"] for n in PYTHON_PEERS if n in by}
    if python:
        best = max(python, key=lambda n: python[n])
        g["best_python"] = best
        g["x_best_python"] = round(sb["loaded"]["rps"] / python[best], 2)
        g["x_best_python_met"] = g["x_best_python"] >= GOAL_X_PYTHON
    else:
        g["best_python"], g["x_best_python"], g["x_best_python_met"] = None, None, None
    added = sb["derived"].get("added_p50_ms_c1")
    g["added_c1_p50_ms"] = added
    g["added_c1_p50_met"] = None if added is None else added < GOAL_C1_ADDED_MS
    involved = ["switchboard", "nginx", "direct"]
    if g["best_python"]:
        involved.append(g["best_python"])
    busiest = 0.0
    for n in involved:
        for phase in ("loaded", "c1"):
            if n in by:
                busiest = max(busiest, by[n][phase]["cpu"]["other_busy_pct"] or 0.0)
    g["disturbed"] = busiest > OTHER_BUSY_WARN
    return g


def _f(x: float | None, n: int = 3) -> str:
    return "-" if x is None else f"{x:.{n}f}"


def print_report(doc: dict[str, Any]) -> None:
    p = doc["params"]
    c = p["connections"]
    results, skipped = doc["targets"], doc["not_measured"]
    hdr = (
        f"{'target':<{W}} {f'req/s c{c}':>10} {'p50 ms':>7} {'p99 ms':>7} {'x nginx':>7}"
        f" {'c1 p50':>7} {'c1 p99':>7} {'c1 +p50':>7} {'µs/req':>7} {'cores':>5}"
        f" {'other%':>6} {'errs':>5}"
    )
    print()
    print(hdr)
    print("-" * len(hdr))
    busiest = 0.0
    for name in p["targets"]:
        if name in skipped:
            print(f"{name:<{W}} NOT MEASURED: {skipped[name]}")
            continue
        r = results.get(name, {})
        if "error" in r:
            print(f"{name:<{W}} ERROR {r['error']}")
            continue
        L, C, d = r["loaded"], r["c1"], r.get("derived", {})
        cpu = L["cpu"]
        other = max(cpu["other_busy_pct"] or 0.0, C["cpu"]["other_busy_pct"] or 0.0)
        busiest = max(busiest, other)
        us = cpu["proxy_us_per_req"] if name != "direct" else cpu["backend_us_per_req"]
        cores = cpu["proxy_cores"]
        errs = L["non_2xx"] + sum(L["socket_errors"].values())
        errs += C["non_2xx"] + sum(C["socket_errors"].values())
        print(
            f"{name:<{W}} {L['rps']:>10.0f} {_f(L['lat_ms']['p50']):>7} {_f(L['lat_ms']['p99']):>7}"
            f" {_f(d.get('x_nginx'), 2):>7} {_f(C['lat_ms']['p50']):>7} {_f(C['lat_ms']['p99']):>7}"
            f" {_f(d.get('added_p50_ms_c1')):>7} {_f(us, 1):>7} {_f(cores, 2):>5}"
            f" {other:>6.1f} {errs:>5}"
        )
    print(
        f"(wrk -t1 -c{c} -d{p['duration_s']}s after a {p['warmup_s']} s warm-up; c1 = wrk -t1 -c1"
        f" -d{p['c1_duration_s']}s; ms;\n c1 +p50 = c1 p50 - direct's c1 p50; µs/req = CPU"
        f" (user+sys) of the proxy per request at c{c}\n (direct: the backend's); cores = the"
        " proxy's CPU / wall time; other% = the rest of the box's CPU;\n errs = non-2xx +"
        " socket errors, both runs)"
    )
    if busiest > OTHER_BUSY_WARN:
        print(f"WARNING: other processes used up to {busiest}% of the CPUs during a run;")
        print("         the figures are disturbed, run again on a quiet machine.")
    by = _measured(results)
    if "switchboard" in by and len(by) > 1:
        print()
        print("Each system against switchboard (same run): req/s = system / switchboard (above 1:")
        print("faster than switchboard); c1 p50 = switchboard / system (above 1: switchboard is")
        print("slower); c1 +p50 = the p50 each adds over direct at 1 connection, in ms:")
        hdr2 = f"{'system':<{W}} {f'req/s c{c}':>10} {'c1 p50':>7} {'c1 +p50':>8}"
        print(hdr2)
        print("-" * len(hdr2))
        for name in p["targets"]:
            if name == "switchboard" or name not in by:
                continue
            d = by[name]["derived"]
            print(
                f"{name:<{W}} {_f(d.get('rps_vs_switchboard'), 2) + 'x':>10}"
                f" {_f(d.get('switchboard_c1_p50_vs'), 2) + 'x':>7}"
                f" {_f(d.get('added_p50_ms_c1')):>8}"
            )
        sbd = by["switchboard"]["derived"]
        print(
            f"{'switchboard':<{W}} {'1.00x':>10} {'1.00x':>7} {_f(sbd.get('added_p50_ms_c1')):>8}"
        )
    g = doc["goals"]
    if not g and "switchboard" in p["targets"]:
        print()
        print("The issue's goals: not checked (switchboard was not measured)")
    if g:

        def met(v: bool | None) -> str:
            return "not checked" if v is None else ("met" if v else "NOT met")

        print()
        print(
            "The issue's goals for the gateway's normal path"
            " (/svc/echo/..., no auth or rate limits yet):"
        )
        best = g["best_python"] or "none measured"
        rows = [
            (f"req/s c{c} >= {GOAL_X_NGINX}x nginx's", f"{_f(g['x_nginx'], 2)}x", g["x_nginx_met"]),
            (
                f"req/s c{c} >= {GOAL_X_PYTHON}x the best Python proxy's ({best})",
                f"{_f(g['x_best_python'], 2)}x",
                g["x_best_python_met"],
            ),
            (
                f"added p50 at c1 < {GOAL_C1_ADDED_MS} ms",
                f"{_f(g['added_c1_p50_ms'])} ms",
                g["added_c1_p50_met"],
            ),
        ]
        width = max(len(label) for label, _, _ in rows)
        for label, value, ok in rows:
            print(f"  {label:<{width}} {value:>9}  {met(ok)}")
        if g["disturbed"]:
            print("  (not conclusive: the box was busy while these systems ran)")
    for name, why in skipped.items():
        print(f"NOT MEASURED: {name}: {why}")


def digest(*packages: str) -> str:
    """A digest of the packages measured, for tying a result to the code."""
    h = hashlib.sha256()
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def versions(tools: dict[str, str | None]) -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for pkg in ("sanic", "uvloop", "httptools", "aiohttp"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    for tool in ("nginx", "haproxy", "wrk"):
        path = tools.get(tool)
        out[tool] = None
        if path:
            try:
                p = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=5)
                out[tool] = (p.stdout + p.stderr).strip().splitlines()[0][:80]
            except (OSError, subprocess.SubprocessError, IndexError):
                pass
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.proxy",
        description="Proxy benchmark: the gateway vs nginx, HAProxy and Python proxies.",
    )
    ap.add_argument("--quick", action="store_true", help="a short smoke run (about 30 s)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma list from {', '.join(TARGETS)}"
    )
    ap.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "nginx", "python"],
        help="the echo backend: nginx (the peers'), python (ours), auto = nginx when installed",
    )
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--duration", type=int, help="seconds of the loaded run (default 10; quick 1)")
    ap.add_argument("--warmup", type=int, help="seconds of discarded warm-up (default 2; quick 1)")
    ap.add_argument("--c1-duration", type=int, help="seconds of the c1 run (default 3; quick 1)")
    ap.add_argument(
        "--no-install",
        dest="install",
        action="store_false",
        help="never apt-get or pip install a missing tool; report it as not measured",
    )
    ap.add_argument(
        "--loop",
        default="uvloop",
        choices=["uvloop", "asyncio"],
        help="event loop of the aiohttp peer and our backend (Sanic always uses uvloop)",
    )
    ap.add_argument("--ready-timeout", type=float, default=20.0)
    ap.add_argument(
        "--log-dir", help="configs and logs of every server (default: a temporary directory)"
    )
    ap.add_argument("--serve", choices=list(SERVERS), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--backend-url", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    defaults = (
        {"duration": 1, "warmup": 1, "c1_duration": 1}
        if args.quick
        else {"duration": 10, "warmup": 2, "c1_duration": 3}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {list(TARGETS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.backend_url, args.loop)
        return 0

    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    started = time.monotonic()
    tools = prepare_tools(args.targets, args.backend, args.install)
    for tool, path in tools.items():
        if not path:
            print(f"[proxy] {tool} is not installed", flush=True)
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-proxy-") as tmpdir:
        tmp = Path(args.log_dir or tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            run = run_all(args, tools, tmp)
        except KeyboardInterrupt:
            print("\n[proxy] interrupted; every process started was stopped", flush=True)
            return 130
        except RuntimeError as e:  # the backend did not start: nothing can be measured
            print(f"[proxy] ERROR: {e}", file=sys.stderr)
            print(log_tail(tmp / "nginx-backend.log") or log_tail(tmp / "backend.log"))
            return 1

    derive(run["targets"])
    doc: dict[str, Any] = {
        "bench": "proxy",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "backend": {"kind": run["backend"], "body_bytes": len(BODY), "path": PATH},
        "code_sha256": digest("webapi", "common"),
        "params": {
            "quick": args.quick,
            "targets": args.targets,
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "c1_duration_s": args.c1_duration,
            "wrk_threads": 1,
            "loop": args.loop,
        },
        "versions": versions(tools),
        "targets": run["targets"],
        "not_measured": run["not_measured"],
        "wall_s": round(time.monotonic() - started, 1),
    }
    doc["goals"] = goals(run["targets"])
    print_report(doc)
    print(f"[proxy] total {doc['wall_s']}s; webapi+common digest {doc['code_sha256']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"[proxy] wrote {args.json}")
    failed = []
    for name, r in run["targets"].items():
        runs = [r[k] for k in ("loaded", "c1") if k in r]
        if "error" in r or any(x["non_2xx"] or sum(x["socket_errors"].values()) for x in runs):
            failed.append(name)
    if failed:
        print(f"[proxy] FAILED: {', '.join(failed)} (errors above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
