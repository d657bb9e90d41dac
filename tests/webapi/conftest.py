"""A real gateway process with real workers behind it, shared by the module's tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.helpers import ServiceProcess, free_port, issue_api_key, wait_for
from tests.support.policy import set_document


@dataclass
class AsAdmin:
    """httpx's `get`/`post`, carrying the session's admin API key (set by a fixture below).

    For tests about something other than access control; access itself is
    tested without it, in test_access.py.
    """

    headers: dict[str, str] = field(default_factory=dict)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(url, **self._with_key(kwargs))

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(url, **self._with_key(kwargs))

    def field_lines(self) -> str:
        """The key's header field lines, each ended by CRLF: for a request written raw."""
        return "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())

    def _with_key(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**kwargs, "headers": {**self.headers, **(kwargs.get("headers") or {})}}


as_admin = AsAdmin()


@pytest.fixture(autouse=True, scope="session")
def _admin_headers(auth: dict[str, str]) -> None:
    as_admin.headers = dict(auth)


@dataclass
class Stack:
    base_url: str
    redis_url: str
    processes: dict[str, ServiceProcess]

    def start_worker(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        proc = ServiceProcess(args, env={"REDIS_URL": self.redis_url, **(env or {})}, name=name)
        self.processes[name] = proc.start()


def _live(base_url: str, *services: str) -> bool:
    body = httpx.get(f"{base_url}/health", timeout=2).json()
    return all(body["services"].get(s, {}).get("live", 0) >= 1 for s in services)


@pytest.fixture(scope="module")
def stack(redis_url: str) -> Iterator[Stack]:
    # These tests register and log in more often than the default policy's
    # per-IP limits allow; the limits themselves are tested in test_access.py.
    set_document(redis_url, limits=[])
    port = free_port()
    env = {"REDIS_URL": redis_url, "WEBAPI_PORT": str(port), "RPC_TIMEOUT": "1.5"}
    gateway = ServiceProcess(["python", "-m", "webapi"], env=env, name="webapi").start()
    s = Stack(f"http://127.0.0.1:{port}", redis_url, {"webapi": gateway})
    s.start_worker("calc", ["python", "-m", "tests.support.calc_service"])
    s.start_worker("iptv", ["python", "-m", "microservices.iptv"])
    s.start_worker("auth", ["python", "-m", "microservices.auth"])
    try:
        wait_for(lambda: _live(s.base_url, "calc", "iptv", "auth"), timeout=60)
        yield s
    except AssertionError:
        for name, proc in s.processes.items():
            print(f"--- {name} ---\n{proc.log_tail()}")
        raise
    finally:
        for proc in s.processes.values():
            proc.stop()


@pytest.fixture
async def http(stack: Stack, auth: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    """A client carrying an admin API key (access itself is tested in test_access.py)."""
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10, headers=auth) as client:
        yield client


@pytest.fixture(scope="module")
def gateway(redis_url: str) -> Iterator[str]:
    """Just a gateway process (no workers); its base URL."""
    with running_gateway(redis_url) as base:
        yield base


# The process behind each gateway `running_gateway` started, by base URL: its log.
_gateways: dict[str, ServiceProcess] = {}


@contextmanager
def running_gateway(redis_url: str, *, status: int = 200, **env: str) -> Iterator[str]:
    """A gateway process (no workers) with the test settings plus `env`; its base URL,
    once its `/health` answers `status` (503: up while Redis is down or refusing)."""
    port = free_port()
    env = {"REDIS_URL": redis_url, "WEBAPI_PORT": str(port), "HEARTBEAT_TTL": "1.5",
           "PROXY_TIMEOUT": "1", "LEAST_TIME_DECAY": "2", **env}  # fmt: skip
    proc = ServiceProcess(["python", "-m", "webapi"], env=env, name="webapi-only").start()
    base = f"http://127.0.0.1:{port}"
    _gateways[base] = proc
    try:
        wait_for(lambda: not proc.alive() or _health_status(base) == status, timeout=30)
        assert proc.alive(), f"the gateway exited:\n{proc.log_tail()}"
        yield base
    finally:
        del _gateways[base]
        proc.stop()


def _health_status(base: str) -> int:
    return httpx.get(f"{base}/health", timeout=2).status_code


def gateway_process(base: str) -> ServiceProcess:
    """The process of the gateway at `base` (started by `running_gateway`)."""
    return _gateways[base]


@dataclass
class Backend:
    """A `tests.support.http_backend` process, registered by heartbeat as `service`
    (instance `<service>-a`) with the module's gateway."""

    gateway: str
    redis_url: str
    service: str

    @property
    def base(self) -> str:
        return f"{self.gateway}/svc/{self.service}"


@pytest.fixture(scope="module")
def backend(gateway: str, redis_url: str) -> Iterator[Backend]:
    """One backend per module that uses it, reached once through the gateway."""
    with running_backend(gateway, redis_url) as b:
        yield b


def http_instance(
    gateway: str, registrar: str, service: str, name: str, **env: str
) -> ServiceProcess:
    """A `tests.support.http_backend` process, started: instance `name` of `service`,
    registering itself with `gateway` by heartbeat with `registrar` (an API key with the
    `registry` scope); `env`: its other settings (`VERSION`, `HOST`, ...; `PORT`, a free
    one by default). Not waited for: the caller waits for what it needs to see of it."""
    env = {"NAME": name, "GATEWAY": gateway, "SERVICE": service, "GATEWAY_API_KEY": registrar,
           **env}  # fmt: skip
    env.setdefault("PORT", str(free_port()))
    return ServiceProcess(["python", "-m", "tests.support.http_backend"], env=env,
                          name=name).start()  # fmt: skip


@contextmanager
def running_backend(gateway: str, redis_url: str, *, version: str = "0") -> Iterator[Backend]:
    """A `tests.support.http_backend` registered with `gateway` (at `version`), reached
    once through it."""
    api_key = issue_api_key(redis_url, ["registry"], name="fastpath-backend")
    b = Backend(gateway, redis_url, f"fp{uuid.uuid4().hex[:6]}")
    proc = http_instance(gateway, api_key, b.service, f"{b.service}-a", VERSION=version)
    try:
        wait_for(lambda: as_admin.get(f"{b.base}/echo", timeout=5).status_code == 200, timeout=30)
        yield b
    finally:
        proc.stop()


def fast_path(gateway: str) -> dict[str, int]:
    """The gateway's fast path counters (`GET /admin/proxy/stats`)."""
    stats = as_admin.get(f"{gateway}/admin/proxy/stats", timeout=5).json()
    assert stats["fast_path"]["enabled"] is True
    return {k: int(v) for k, v in stats["fast_path"].items()}


def answered(gateway: str) -> int:
    """How many requests the gateway's fast path has answered."""
    return fast_path(gateway)["answered"]
