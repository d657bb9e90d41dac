"""The targets of `bench.proxy`: the echo backend and each proxy put in front of it.

  nginx, haproxy     configs copied from the peers' proxy_bench.py
  aiohttp,           Python peer proxies, each in its own process:
  sanic-aiohttp      `python -m bench.proxy --serve KIND` (calls `serve`)
  backend            our Python echo backend, the fallback when nginx is missing
  switchboard,       one `python -m webapi` (`Gateway`) for all three, the backend
  switchboard-open,  registered by heartbeat; each target is a path, a credential
  switchboard-auth   and a live policy (see GATEWAY_TARGETS)

`wait_http` polls a target until it answers; `body_ok` checks it answered the
backend's body.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.harness import exit_with_parent, free_port, python_env, set_loop, spawn, stop_child

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
    "switchboard-open",
    "switchboard-auth",
    "haproxy",
    "aiohttp",
    "sanic-aiohttp",
)
PYTHON_PEERS = ("aiohttp", "sanic-aiohttp")
# Measured on one gateway process, one after the other:
#   switchboard       /svc/echo/... with an API key (Authorization: Bearer sbk_...), no limit
#   switchboard-open  /open/... : a public policy route to `echo`, no credential, no limit
#   switchboard-auth  /svc/echo/... with a JWT and the BENCH_LIMIT rate limit
GATEWAY_TARGETS = ("switchboard", "switchboard-open", "switchboard-auth")
DESCRIPTIONS = {
    "direct": "wrk -> backend (the floor)",
    "nginx": "nginx 1 worker, upstream keepalive 64",
    "switchboard": "python -m webapi, 1 process, /svc/echo/... with an API key, no rate limit",
    "switchboard-open": "the same gateway, /open/... public policy route: no credential, no limit",
    "switchboard-auth": "the same gateway, /svc/echo/... with a JWT and a rate limit (GCRA)",
    "haproxy": "haproxy nbthread 1, http-reuse always",
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
    """One GET: status, headers (lower-case names) and body, also for a 4xx/5xx."""
    req = urllib.request.Request(url, headers=dict(headers))
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


def body_ok(text: str) -> bool:
    try:
        return bool(json.loads(text) == json.loads(BODY))
    except ValueError:
        return False


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


def serve(kind: str, port: int, backend: str, loop: str) -> None:
    exit_with_parent()
    set_loop(loop, fallback=False)  # --loop uvloop without uvloop: ImportError
    SERVERS[kind](port, backend)


def start_python(
    kind: str, tmp: Path, port: int, backend: str, loop: str
) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "bench.proxy", "--serve", kind, "--port", str(port)]
    argv += ["--backend-url", backend, "--loop", loop]
    return spawn(argv, tmp / f"{kind}.log", env=python_env())


# --------------------------------------------------------------------------
# The gateway: one `python -m webapi` on a private redis-server for every
# switchboard target, the backend registered by heartbeat (re-sent every
# second, as a backend does). Credentials and the live policy are written
# straight into that Redis, as the auth service and `PUT /admin/policy` would.
# --------------------------------------------------------------------------
OPEN_PREFIX = "/open/"
# "Auth off": the gateway has no global switch to disable auth (on purpose), so
# the baseline is a public policy route to the same service.
OPEN_ROUTE = {"prefix": OPEN_PREFIX, "service": SERVICE, "strip_prefix": True, "public": True}
# "Rate limiting on": a rule that never refuses (a million per second) but still
# runs the GCRA script in Redis for every request (batched), as a real limit does.
BENCH_LIMIT = {
    "id": "bench",
    "service": SERVICE,
    "method": "*",
    "key": "credential",
    "rate": 1_000_000,
    "period": 1,
    "burst": 1_000_000,
}
JWT_TTL = 86_400  # far longer than any run: a token expiring mid-run would turn into 401s
BENCH_USER = "bench"


def bench_policy(*, limited: bool) -> dict[str, Any]:
    """The default policy (its auth limits match nothing here) plus the /open/ route,
    and BENCH_LIMIT when `limited`."""
    from common.policy import DEFAULT_POLICY

    doc = DEFAULT_POLICY.model_dump(mode="json")
    doc["routes"] = [OPEN_ROUTE]
    if limited:
        doc["limits"] = [*doc["limits"], BENCH_LIMIT]
    return doc


async def _credentials(redis_url: str) -> tuple[str, str]:
    """An API key (scopes `*` and `admin`, stored as the auth service stores one) and
    a JWT (scope `*`) signed with the keyring the gateway verifies against."""
    import redis.asyncio as aioredis

    from common import apikeys, tokens

    client = aioredis.Redis.from_url(redis_url)
    try:
        api_key, record = apikeys.new_key(BENCH_USER, "bench-proxy", ["*", "admin"])
        await apikeys.write(client, record)
        signing = await tokens.Keyring(client).current()  # creates the first key if none
        token = tokens.issue(
            signing,
            subject=BENCH_USER,
            name=BENCH_USER,
            roles=["admin"],
            scopes=["*"],
            session_id=uuid.uuid4().hex,
            ttl=JWT_TTL,
        )
    finally:
        await client.aclose()
    return api_key, token


async def _put_policy(redis_url: str, doc: dict[str, Any]) -> int:
    """Store `doc` as the live policy; its version."""
    import redis.asyncio as aioredis

    from common.policy import PolicyStore

    client = aioredis.Redis.from_url(redis_url)
    try:
        stored = await PolicyStore(client).put(doc, actor="bench.proxy")
    finally:
        await client.aclose()
    return stored.version


class Heartbeat:
    """POST /heartbeat for the backend every `interval` seconds, in a thread.

    `credential` needs the `registry` scope: the gateway refuses anonymous heartbeats.
    """

    def __init__(self, gateway: str, address: str, credential: str, interval: float = 1.0) -> None:
        self.url = f"{gateway}/heartbeat"
        self.body = json.dumps({"service": SERVICE, "address": address}).encode()
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {credential}"}
        self.interval = interval
        self.stopped = threading.Event()
        self.failures = 0
        self.thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def beat(self) -> None:
        req = urllib.request.Request(self.url, data=self.body, headers=self.headers)
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
    env = python_env(
        REDIS_URL=redis_url, WEBAPI_PORT=str(port), BIND_HOST="127.0.0.1", LOG_LEVEL="WARNING"
    )
    return spawn([sys.executable, "-m", "webapi"], tmp / "switchboard.log", env=env)


class Gateway:
    """The one gateway process that every switchboard target of a run is measured on.

    Started by the first switchboard target (`start`), stopped once the last
    one is done (`stop`). `target` puts the policy a target needs in force and
    answers its URL and request headers; `check` proves the target runs what it
    claims (a credential is required; the rate limiter runs, or does not).
    """

    LOG = "switchboard.log"

    def __init__(
        self, tmp: Path, redis_url: str, redis_pid: int | None, backend: str, ready_timeout: float
    ) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.redis_pid = redis_pid  # metered with the gateway: the limiter works there
        self.backend = backend  # host:port the heartbeat registers
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.heartbeat: Heartbeat | None = None
        self.api_key = ""
        self.token = ""
        self.limited: bool | None = None  # BENCH_LIMIT in the live policy (None: not set yet)
        self.failed: str | None = None

    def start(self) -> subprocess.Popen[bytes]:
        """The running gateway, started on first use; a failed start is not retried."""
        if self.failed:
            raise RuntimeError(f"the gateway did not start: {self.failed}")
        if self.proc is not None:
            return self.proc
        try:
            self.api_key, self.token = asyncio.run(_credentials(self.redis_url))
            port = free_port()
            self.proc = start_gateway(self.tmp, port, self.redis_url)
            self.url = f"http://127.0.0.1:{port}"
            wait_http(f"{self.url}/health", self.ready_timeout, self.proc)
            self.heartbeat = Heartbeat(self.url, self.backend, self.api_key)
            self.heartbeat.start()
        except Exception as e:
            self.failed = f"{type(e).__name__}: {e}"
            raise
        return self.proc

    def target(self, name: str) -> tuple[str, dict[str, str]]:
        """The URL and request headers of `name`, with the policy it needs in force."""
        self._use_policy(limited=name == "switchboard-auth")
        if name == "switchboard-open":
            return f"{self.url}{OPEN_PREFIX}{PATH.lstrip('/')}", {}
        credential = self.token if name == "switchboard-auth" else self.api_key
        return f"{self.url}/svc/{SERVICE}{PATH}", {"Authorization": f"Bearer {credential}"}

    def _use_policy(self, *, limited: bool) -> None:
        """Store the policy and wait until this gateway applies it (within a second):
        measuring before would measure the previous one."""
        if self.limited is limited:
            return
        version = asyncio.run(_put_policy(self.redis_url, bench_policy(limited=limited)))
        deadline = time.monotonic() + self.ready_timeout
        applied = None
        while time.monotonic() < deadline:
            applied = json.loads(wait_http(f"{self.url}/health", 5, self.proc))["policy_version"]
            if applied >= version:
                self.limited = limited
                return
            time.sleep(0.1)
        raise RuntimeError(f"policy version {version} not applied after {self.ready_timeout}s "
                           f"(the gateway is at {applied})")  # fmt: skip

    def check(self, name: str, url: str, headers: Mapping[str, str]) -> dict[str, Any]:
        """What the gateway did for one request of `name`, raising if it is not what
        the target claims: a bench that silently measured auth off as auth on would
        answer issue 6 wrongly."""
        status, head, body = probe(url, headers)
        if status != 200 or not body_ok(body):
            raise RuntimeError(f"{url} answered {status} {body[:200]!r}")
        limit = head.get("ratelimit-limit")  # set when a limit rule ran for the request
        if (limit is not None) != (name == "switchboard-auth"):
            wrong = "did not run" if limit is None else "ran where no rule must match"
            raise RuntimeError(f"{url}: the rate limiter {wrong} (RateLimit-Limit {limit!r})")
        checks: dict[str, Any] = {"ratelimit_limit": limit}
        if headers:
            without, _, _ = probe(url, {})
            if without != 401:
                raise RuntimeError(f"{url} answered {without} without a credential, not 401")
            checks["status_without_credential"] = without
        return checks

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.proc is not None:
            stop_child(self.proc)
