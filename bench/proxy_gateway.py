"""The gateway of `bench.proxy`: one `python -m webapi` for every switchboard target.

It runs on a private redis-server, the backend registered by heartbeat (re-sent
every second, as a backend does). Credentials and the live policy are written
straight into that Redis, as the auth service and `PUT /admin/policy` would.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.harness import free_port, issue_token, python_env, signing_key, spawn, stop_child
from bench.proxy_targets import PATH, SERVICE, body_ok, probe, wait_http
from common.compile import up_to_date
from common.compiled import C_MODULES, build_state, c_turned_off

OPEN_PREFIX = "/open/"
# "Auth off": the gateway has no global switch to disable auth (on purpose), so
# the baseline is a public policy route to the same service.
OPEN_ROUTE = {"prefix": OPEN_PREFIX, "service": SERVICE, "strip_prefix": True, "public": True}
# Design §6's "pure pass-through route", spliced (webapi.passthrough): the backend answers
# its body on every path, so /raw/api/echo reaches it unchanged.
PASSTHROUGH_PREFIX = "/raw/"
PASSTHROUGH_ROUTE = {"prefix": PASSTHROUGH_PREFIX, "service": SERVICE, "strip_prefix": False,
                     "public": True, "passthrough": True}  # fmt: skip
# The same as a tunnel (webapi.tunnel): after the first request, nothing is read.
TUNNEL_PREFIX = "/tun/"
TUNNEL_ROUTE = {**PASSTHROUGH_ROUTE, "prefix": TUNNEL_PREFIX, "tunnel": True}
# The targets served by a splice: the gateway adds none of its headers.
SPLICED = {"switchboard-passthrough": PASSTHROUGH_PREFIX, "switchboard-tunnel": TUNNEL_PREFIX}
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
BENCH_USER = "bench"


def bench_policy(*, limited: bool) -> dict[str, Any]:
    """The default policy (its auth limits match nothing here) plus the /open/, the
    pass-through /raw/ and the tunnel /tun/ routes, and BENCH_LIMIT when `limited`."""
    from common.policy import DEFAULT_POLICY

    doc = DEFAULT_POLICY.model_dump(mode="json")
    doc["routes"] = [OPEN_ROUTE, PASSTHROUGH_ROUTE, TUNNEL_ROUTE]
    if limited:
        doc["limits"] = [*doc["limits"], BENCH_LIMIT]
    return doc


async def _credentials(redis_url: str) -> tuple[str, str]:
    """An API key (scopes `*` and `admin`, stored as the auth service stores one) and
    a JWT (scope `*`) signed with the keyring the gateway verifies against."""
    import redis.asyncio as aioredis

    from common import apikeys

    client = aioredis.Redis.from_url(redis_url)
    try:
        api_key, record = apikeys.new_key(BENCH_USER, "bench-proxy", ["*", "admin"])
        await apikeys.write(client, record)
    finally:
        await client.aclose()
    return api_key, issue_token(await signing_key(redis_url), BENCH_USER, ["admin"])


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


def c_unavailable() -> str | None:
    """Why the gateway started as deployed (`switchboard`) runs no C module here, or None.

    With a reason, `switchboard-py` (the Python path alone) would measure the same path
    again: the reason is reported as why it is not measured."""
    state = build_state()
    if not C_MODULES:
        why = "no C module in common.compiled.C_MODULES"
    elif c_turned_off():
        why = "SWITCHBOARD_C=0 in this environment"
    elif not state.used:
        why = f"the compiled build is not used: {state.reason}"
    elif not up_to_date():
        why = "the compiled build predates common.compiled's module lists: make compile"
    else:
        return None
    return f"switchboard runs no C module either ({why}): it is the Python path already"


def start_gateway(
    tmp: Path, port: int, redis_url: str, log: str, extra: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    env = python_env(
        REDIS_URL=redis_url, WEBAPI_PORT=str(port), BIND_HOST="127.0.0.1", LOG_LEVEL="WARNING",
        **extra,
    )  # fmt: skip
    return spawn([sys.executable, "-m", "webapi"], tmp / log, env=env)


class Gateway:
    """The one gateway process that every switchboard target of a run is measured on.

    Started by the first switchboard target (`start`), stopped once the last
    one is done (`stop`). `target` puts the policy a target needs in force and
    answers its URL and request headers; `check` proves the target runs what it
    claims (a credential is required; the rate limiter runs, or does not) and
    records the hot path the process runs.
    """

    def __init__(
        self,
        tmp: Path,
        redis_url: str,
        redis_pid: int | None,
        backend: str,
        ready_timeout: float,
        *,
        python_only: bool = False,
    ) -> None:
        """`python_only`: never run the hot path's C modules (`SWITCHBOARD_C=0`); else
        start as deployed, in this process's environment (the C modules run whenever
        the compiled build is used)."""
        self.python_only = python_only
        self.log = "switchboard-py.log" if python_only else "switchboard.log"
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
            extra = {"SWITCHBOARD_C": "0"} if self.python_only else {}
            self.proc = start_gateway(self.tmp, port, self.redis_url, self.log, extra)
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
        if name in SPLICED:
            return f"{self.url}{SPLICED[name]}{PATH.lstrip('/')}", {}
        # (switchboard-py: the switchboard target, on the gateway started `python_only`)
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
        spliced = "x-gateway-latency" not in head  # the gateway adds it on every other path
        if spliced != (name in SPLICED):
            raise RuntimeError(f"{url}: {'spliced' if spliced else 'not spliced'}, wrongly")
        checks["spliced"] = spliced
        if headers:
            without, _, _ = probe(url, {})
            if without != 401:
                raise RuntimeError(f"{url} answered {without} without a credential, not 401")
            checks["status_without_credential"] = without
        hot_path = self._hot_path()
        checks["hot_path"] = hot_path["state"]  # "compiled", or why the sources run
        checks["c_modules"] = list(hot_path["c_modules"])
        if self.python_only and checks["c_modules"]:
            raise RuntimeError(f"{url}: SWITCHBOARD_C=0, yet C in use: {checks['c_modules']}")
        return checks

    def _hot_path(self) -> dict[str, Any]:
        """What the gateway's hot path runs (`GET /admin/proxy/stats`, `hot_path`)."""
        req = urllib.request.Request(
            f"{self.url}/admin/proxy/stats", headers={"Authorization": f"Bearer {self.api_key}"}
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            hot_path: dict[str, Any] = json.load(r)["hot_path"]
        return hot_path

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.proc is not None:
            stop_child(self.proc)
