"""Real websocket service processes, real upstream WebSocket backends, tokens to connect with."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
import websockets
from websockets.asyncio.client import ClientConnection

from common import tokens
from tests.helpers import ServiceProcess, free_port, wait_for, wait_for_async
from websocket.upstreams import NoRedirects

SECRET = "websocket-tests-secret-" + "x" * 32


def upgrade_head(path: str) -> str:
    """A WebSocket upgrade request's head for `path`, as raw tests write it, up to its
    last field line (the caller adds its own fields, then the blank line)."""
    return (f"GET {path} HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n")  # fmt: skip


def current_key(redis_url: str) -> tokens.SigningKey:
    """The signing key of the keyring in Redis (the server created it at start if none existed)."""
    client = redis.Redis.from_url(redis_url)
    try:
        kid = client.get(tokens.CURRENT_KID)
        assert kid is not None, "no signing key yet: start a websocket server first"
        raw = client.hget(tokens.SIGNING_KEYS, kid)
        assert raw is not None
        return tokens.SigningKey.from_json(kid, raw)
    finally:
        client.close()


@dataclass
class WsServer:
    address: str  # 127.0.0.1:port
    proc: ServiceProcess
    redis_url: str

    def token(self, ttl: int = 600, sub: str = "u1", scopes: tuple[str, ...] = ("*",)) -> str:
        """A valid access token, signed like the auth service signs them."""
        return tokens.issue(current_key(self.redis_url), subject=sub, name="alice",
                            roles=["user"], scopes=scopes, session_id=uuid.uuid4().hex,
                            ttl=ttl)  # fmt: skip

    def bearer(self, ttl: int = 600) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(ttl)}"}

    def url(self, path: str) -> str:
        return f"ws://{self.address}{path}"

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"http://{self.address}/health", timeout=5).json()
        return body

    def connect(self, path: str = "/ws", *, follow: bool = True, **kwargs: Any) -> Any:
        """An authenticated connection (header) unless `additional_headers` is given;
        one that does not follow a redirect (as a browser's WebSocket) unless `follow`."""
        if "additional_headers" not in kwargs:  # a token needs the key in Redis: not always up
            kwargs["additional_headers"] = self.bearer()
        connect = websockets.connect if follow else NoRedirects
        return connect(self.url(path), compression=None, **kwargs)


def start_ws_server(
    redis_url: str, *, status: str = "ok", main: str = "websocket", **env: str
) -> WsServer:
    """A websocket service with the test settings plus `env`, once its `/health` says
    `status` ("degraded": up while Redis is down or refusing); `main`: the module run
    (`tests.support.ws_tasks`: the service with a route listing its pending tasks)."""
    port = free_port()
    full_env = {"REDIS_URL": redis_url, "WEBSOCKET_PORT": str(port), "JWT_SECRET": SECRET,
                "RPC_TIMEOUT": "1.5", "WS_AUTH_TIMEOUT": "1", "PROXY_CONNECT_TIMEOUT": "1",
                "WS_MAX_MESSAGE_BYTES": str(64 * 1024),
                # Every refusal's line, unbounded: tests check their own (a module's share
                # one server); test_ws_refusals_logged checks the bound.
                "LOG_REFUSALS_PER_CLIENT": "0", **env}  # fmt: skip
    proc = ServiceProcess(["python", "-m", main], env=full_env, name="websocket").start()
    server = WsServer(f"127.0.0.1:{port}", proc, redis_url)
    try:
        wait_for(lambda: not proc.alive() or server.health()["status"] == status, 30)
        assert proc.alive(), "the websocket service exited"
    except AssertionError:
        proc.stop()
        print(proc.log_tail())
        raise
    return server


@pytest.fixture(scope="module")
def ws_server(redis_url: str) -> Iterator[WsServer]:
    """One websocket service with default limits, shared by a module's tests."""
    server = start_ws_server(redis_url)
    try:
        yield server
    finally:
        server.proc.stop()


@pytest.fixture
def make_ws_server(redis_url: str) -> Iterator[Callable[..., WsServer]]:
    """Start websocket services with particular settings (stopped after the test)."""
    started: list[WsServer] = []

    def make(**env: str) -> WsServer:
        server = start_ws_server(redis_url, **env)
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            server.proc.stop()


@dataclass
class Backends:
    """Upstream WebSocket servers of one service, registered by heartbeat."""

    redis_url: str
    service: str = field(default_factory=lambda: f"up{uuid.uuid4().hex[:8]}")
    procs: dict[str, ServiceProcess] = field(default_factory=dict)

    def start(
        self, name: str, *, kind: str = "ws", version: str = "0", weight: int = 1
    ) -> ServiceProcess:
        env = {"PORT": str(free_port()), "NAME": name, "REDIS_URL": self.redis_url,
               "SERVICE": self.service, "KIND": kind, "VERSION": version,
               "WEIGHT": str(weight)}  # fmt: skip
        proc = ServiceProcess(["python", "-m", "tests.support.ws_backend"], env=env, name=name)
        self.procs[name] = proc.start()
        return proc

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()


@pytest.fixture
def backends(redis_url: str) -> Iterator[Backends]:
    b = Backends(redis_url)
    try:
        yield b
    finally:
        b.stop()


async def whoami(
    server: WsServer, service: str, path: str = "/echo", headers: dict[str, str] | None = None
) -> str | None:
    """The instance a new relayed connection reaches (with `headers` beside the
    credential), or None if none was reached."""
    try:
        additional_headers = {**server.bearer(), **(headers or {})}
        async with server.connect(f"/ws/proxy/{service}{path}",
                                  additional_headers=additional_headers) as ws:  # fmt: skip
            await ws.send("whoami")
            return str(json.loads(await ws.recv())["instance"])
    except (websockets.ConnectionClosed, OSError):
        return None


async def wait_reachable(server: WsServer, service: str, names: set[str]) -> None:
    """Poll until relayed connections have reached every instance in `names`."""
    seen: set[str] = set()

    async def all_seen() -> bool:
        name = await whoami(server, service)
        if name:
            seen.add(name)
        return names <= seen

    await wait_for_async(all_seen, timeout=30)


class LogWatch:
    """The records of one message the server logs from now on."""

    def __init__(self, server: WsServer, msg: str) -> None:
        self.server, self.msg = server, msg
        self.start = len(server.proc.log_records(msg))

    def new(self) -> list[dict[str, Any]]:
        return self.server.proc.log_records(self.msg)[self.start :]

    async def wait(self, count: int) -> list[dict[str, Any]]:
        """The new records once there are `count` of them (logging may follow the answer)."""

        async def enough() -> bool:
            return len(self.new()) >= count

        await wait_for_async(enough, timeout=10)
        return self.new()


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> Any:
    import asyncio

    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def last_close(server: WsServer, service: str) -> Any:
    """The close code and reason the echo upstream of `service` last received."""
    async with server.connect(f"/ws/proxy/{service}/echo") as probe:
        await probe.send("last_close")
        return await recv_json(probe)


async def wait_upstream_closed(server: WsServer, service: str, expected: list[Any]) -> None:
    """Wait until the upstream's last close is `expected` ([code, reason])."""

    async def seen() -> bool:
        return bool(await last_close(server, service) == expected)

    await wait_for_async(seen, timeout=10)
