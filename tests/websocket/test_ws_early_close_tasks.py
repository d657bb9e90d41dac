"""A connection the service closes while its client still sends leaves no task behind.

Sanic's `WebsocketImplProtocol` parses what a client sends in a task per read, and
a complete message's task waits, holding the connection's event lock, until the
handler reads that message: one the handler never reads (it closed the connection)
kept that task, and every later one of the connection, pending for good, with the
protocol and the request, until a full garbage collection logged each as "Task was
destroyed but it is pending!" (a soak: 87 of 100 relays refused with 1014 left
one). The server protocol (`websocket.tap.TapServerProtocol`) now ends them when
the connection is lost.

Observed through `tests.support.ws_tasks` (the service with a route listing its
pending tasks): a task of Sanic's WebSocket protocol outliving every connection is
the leak itself, seen without waiting for a collection.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets

from tests.helpers import wait_for_async
from tests.support.registry import dead_instances
from tests.websocket.conftest import Backends, WsServer, start_ws_server, wait_reachable

pytestmark = pytest.mark.timeout(120)

SANIC_WEBSOCKET = "WebsocketImplProtocol."  # its tasks' coroutines' qualified names


@pytest.fixture(scope="module")
def probed(redis_url: str) -> Iterator[WsServer]:
    server = start_ws_server(redis_url, main="tests.support.ws_tasks")
    try:
        yield server
    finally:
        server.proc.stop()


def sanic_tasks(server: WsServer) -> dict[str, Any]:
    """The pending tasks of Sanic's WebSocket protocol in `server`, by coroutine."""
    tasks = httpx.get(f"http://{server.address}/test/tasks", timeout=5).json()
    return {name: n for name, n in tasks.items() if name.startswith(SANIC_WEBSOCKET)}


async def no_sanic_task_left(server: WsServer) -> None:
    """Wait until no connection's task is pending (each ends with its connection, closed
    by then); fails with those still pending."""
    try:
        await wait_for_async(lambda: not sanic_tasks(server), timeout=10)
    except AssertionError:
        raise AssertionError(
            f"pending after every connection closed: {sanic_tasks(server)}"
        ) from None


async def test_relays_closed_1014_while_the_client_sends_leave_no_task(probed: WsServer) -> None:
    # Registered, then gone: known, so each relay is upgraded, then closed with 1014.
    name = f"gone{uuid.uuid4().hex[:6]}"
    async with dead_instances(probed.redis_url, name, 1, kind="ws"):
        pass
    for _ in range(20):
        async with probed.connect(f"/ws/proxy/{name}/echo") as ws:
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.send("hello")  # as a browser's first message, sent on open
                await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1014
    await no_sanic_task_left(probed)


async def test_streams_left_with_a_request_unread_leave_no_task(
    probed: WsServer, backends: Backends
) -> None:
    backends.start("a")
    await wait_reachable(probed, backends.service, {"a"})
    request = json.dumps({"service_name": backends.service, "frames": 500})
    for _ in range(5):
        # (Reading all it is sent, as a browser does: with websockets' bounded queue it
        # would stop reading the stream, and the service would hear its close only late.)
        async with probed.connect("/ws/stream", max_queue=None) as ws:
            await ws.send(request)
            await asyncio.wait_for(ws.recv(), 5)  # streaming
            await ws.send(request)  # the next one, never read: the client leaves
    await no_sanic_task_left(probed)


@pytest.mark.parametrize(
    ("path", "scope", "status"),
    [
        ("/ws/proxy/svc/a/%2e%2e/b", "*", 400),  # a traversal
        (f"/ws/proxy/nosuch{uuid.uuid4().hex[:6]}/echo", "*", 404),  # an unknown service
        ("/ws/proxy/svc/echo", "other", 403),  # outside the credential's scopes
    ],
)
async def test_relays_refused_before_their_upgrade_leave_no_task(
    probed: WsServer, path: str, scope: str, status: int
) -> None:
    bearer = {"Authorization": f"Bearer {probed.token(scopes=(scope,))}"}
    for _ in range(5):
        with pytest.raises(websockets.InvalidStatus) as info:
            async with probed.connect(path, additional_headers=bearer):
                pass
        assert info.value.response.status_code == status
    await no_sanic_task_left(probed)
