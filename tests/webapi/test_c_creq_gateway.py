"""The fast path's request parse in C (`webapi/fastpath/_creq.c`) through a real gateway,
served in this process so that the C can be watched: the requests it reads are
answered as when the Python reads them (`test_c_creq.py` compares the two parses)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

import pytest

from common.settings import Settings
from tests.support.registry import registered
from tests.support.served import served
from tests.webapi.test_c_creq import c_set, creq, head
from tests.webapi.upstream_servers import Peer, Upstream, ok
from webapi.app import create_app
from webapi.context import GatewayApp
from webapi.fastpath import FastPathProtocol

pytestmark = pytest.mark.timeout(30)
__all__ = ["creq"]  # (the fixture, shared)


class _Spy:
    """Stands in for the C module in `request._C`: counts the requests it answers."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.answered = 0

    def parse(self, buf: bytes | bytearray) -> Any:
        read = self.module.parse(buf)
        self.answered += read is not None
        return read


@asynccontextmanager
async def _gateway(redis_url: str) -> AsyncIterator[tuple[GatewayApp, str]]:
    """A gateway app with the fast path's protocol, served in this process; it and its
    base URL."""
    app = create_app(Settings(redis_url=redis_url), name=f"creq_{uuid.uuid4().hex[:6]}")
    async with served(app, FastPathProtocol) as base:
        yield app, base


async def _exchange(base: str, raw: bytes) -> tuple[int, bytes, dict[str, str]]:
    """One request written as `raw` on a connection of its own: the status, body and
    headers of its answer (read to the connection's end: `Connection: close`)."""
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return int(status_line.split()[1]), body, headers


async def _echo(peer: Peer) -> None:
    """An instance answering each request with the request as it got it."""
    async for req in peer.requests():
        seen = [f"{k.lower()}: {v}" for k, v in req.headers
                if k.lower() not in ("x-forwarded-for", "x-request-id")]  # fmt: skip
        text = "\n".join([req.method, req.target, *sorted(seen), ""]).encode()
        await peer.send(ok(b"%s\n%s" % (text, req.body)))


async def test_a_gateway_answers_through_the_c_as_through_the_python(
    creq: ModuleType, redis_url: str, admin_key: str
) -> None:
    service = f"creq{uuid.uuid4().hex[:6]}"
    requests = [
        head("Host: gw", f"X-Api-Key: {admin_key}", "Connection: close",
             target=f"/svc/{service}/api/echo"),  # (wrk's, but for the close)
        head("Host: gw", f"Authorization: Bearer {admin_key}", "Connection: close",
             "X-Request-Id: creq-e2e-1", "Accept: */*", "X-Service-Version: 0",
             target=f"/svc/{service}/a/b?q=1&r=%20"),
        head("Host: gw", f"X-Api-Key: {admin_key}", "Content-Length: 13", "Connection: close",
             method="POST", target=f"/svc/{service}/up", body=b'{"a": [1, 2]}'),
    ]  # fmt: skip
    answers = {}
    async with (
        Upstream(_echo) as instance,
        _gateway(redis_url) as (app, base),
        registered(redis_url, service, {f"{service}-a": instance.address}),
    ):
        # The instance known, and the key in the cache (Sanic's path fills it).
        for _ in range(100):
            status, _, _ = await _exchange(base, requests[0])
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert status == 200
        spy = _Spy(creq)
        for module in (spy, None):
            fast = app.ctx.fast_path.answered
            with c_set(module):
                got = [await _exchange(base, raw) for raw in requests]
            assert app.ctx.fast_path.answered - fast == len(requests)  # the fast path's
            # (The request ids the gateway made up differ: the one given is compared.)
            answers[module is None] = [(status, body) for status, body, _ in got]
            assert got[1][2]["x-request-id"] == "creq-e2e-1"
        assert spy.answered == len(requests)  # every one read by the C
    assert answers[False] == answers[True]
    assert [status for status, _ in answers[False]] == [200] * 3
    assert answers[False][0][1].startswith(b"GET\n/api/echo\nhost: " + service.encode())
    assert answers[False][1][1].startswith(b"GET\n/a/b?q=1&r=%20\naccept: */*\n")
    assert answers[False][2][1].endswith(b'\n{"a": [1, 2]}')
