"""Every input the websocket service refuses is logged once (design §10), and no
credential is: refused upgrades (`request refused`), messages answered with an error
(`message refused`), connections closed for what the client sent or did not send
(`connection closed`). A normal closing is not logged.

The malformed HTTP requests' log lines are checked with their answers, in test_ws_app.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import websockets

from common.log_budget import LOGGED_PER_WINDOW
from common.registry import Registry
from tests.helpers import wait_for
from tests.support.ws_relay import one_instance
from tests.websocket.conftest import Backends, LogWatch, WsServer, recv_json

pytestmark = pytest.mark.timeout(60)


async def test_a_refused_upgrade_is_logged_once_without_its_credential(
    ws_server: WsServer,
) -> None:
    forged = ws_server.token()[:-8] + "AAAAAAAA"  # a signature that does not verify
    refused = LogWatch(ws_server, "request refused")
    with pytest.raises(websockets.InvalidStatus) as info:
        async with ws_server.connect("/ws/stream", additional_headers={
            "Authorization": f"Bearer {forged}"}):  # fmt: skip
            pass
    assert info.value.response.status_code == 401
    logged = refused.new()
    assert [(r["status"], r["code"], r["path"]) for r in logged] == [
        (401, "unauthorized", "/ws/stream")
    ]
    assert forged.split(".")[2] not in ws_server.proc.log_path.read_text()


async def test_refused_messages_are_logged_once_each(ws_server: WsServer) -> None:
    refused = LogWatch(ws_server, "message refused")
    headers = {"Authorization": f"Bearer {ws_server.token(scopes=('iptv',))}"}
    async with ws_server.connect(additional_headers=headers) as ws:
        for message in [
            "{not json",
            json.dumps({"type": "dance"}),
            json.dumps({"type": "subscribe", "channel": "no spaces allowed"}),
            json.dumps({"jsonrpc": "2.0", "id": 1}),  # no method
            json.dumps({"jsonrpc": "2.0", "id": 2, "method": "auth.whoami"}),  # out of scope
        ]:
            await ws.send(message)
            assert "error" in await recv_json(ws)
        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "auth.whoami"}))  # unanswered
        await ws.send("ping")
        assert await ws.recv() == "pong"
    codes = [r["code"] for r in refused.new()]
    assert codes == [-32700, "unknown_type", "bad_channel", -32600, -32005, -32005]
    assert all(r["path"] == "/ws" and r["message"] for r in refused.new())


async def test_what_json_cannot_hold_is_answered_and_the_session_goes_on(
    ws_server: WsServer,
) -> None:
    headers = {"Authorization": f"Bearer {ws_server.token(scopes=('iptv',))}"}
    async with ws_server.connect(additional_headers=headers) as ws:
        await ws.send("[" * 30_000 + "]" * 30_000)  # past Python's recursion limit
        assert (await recv_json(ws))["error"]["code"] == -32700
        await ws.send('{"jsonrpc": "2.0", "id": NaN, "method": "iptv.get_channel"}')
        assert (await recv_json(ws))["error"]["code"] == -32700  # NaN is not JSON
        # An int past 64 bits is JSON, and travels over RPC (no longer -32602 here): the
        # call is made. No iptv worker runs for this module: unknown, or not live if one
        # registered in this Redis before.
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 3, "method": "iptv.get_channel",
                                  "params": {"channel_id": 2**64}}))  # fmt: skip
        answer = await recv_json(ws)
        assert answer["id"] == 3 and answer["error"]["code"] in (-32601, -32001), answer
        await ws.send(json.dumps({"type": "subscribe", "channel": "news\n"}))
        assert (await recv_json(ws))["error"]["code"] == "bad_channel"  # `$` before a "\n"
        await ws.send("ping")
        assert await ws.recv() == "pong"


async def test_ws_with_a_trailing_slash_is_not_found(ws_server: WsServer) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with ws_server.connect("/ws/"):
            pass
    assert info.value.response.status_code == 404


async def test_an_envelope_request_refused_is_logged_once(ws_server: WsServer) -> None:
    refused = LogWatch(ws_server, "message refused")
    async with ws_server.connect("/ws/stream") as ws:
        await ws.send("not an envelope")
        assert (await recv_json(ws))["result"] == "Invalid JSON format"
        await ws.send(json.dumps({"service_name": "nothing-registered"}))
        assert (await recv_json(ws))["result"] == "model not support"
    assert [(r["path"], r["code"]) for r in refused.new()] == [
        ("/ws/stream", "invalid_json_format"),
        ("/ws/stream", "model_not_support"),
    ]


async def _oversized(ws: Any) -> None:
    await ws.send("x" * (256 * 1024))  # the test server's limit is 64 KiB


async def _not_authenticated(ws: Any) -> None:
    await ws.send("ping")  # the first message must be `auth`


@pytest.mark.parametrize(
    ("path", "headers", "send", "code"),
    [
        ("/ws", True, _oversized, 1009),
        ("/ws/stream", True, _oversized, 1009),
        ("/ws", False, _not_authenticated, 1008),
    ],
    ids=["ws too big", "stream too big", "ws no auth"],
)
async def test_a_connection_closed_for_its_input_is_logged_once(
    ws_server: WsServer,
    path: str,
    headers: bool,
    send: Callable[[Any], Awaitable[None]],
    code: int,
) -> None:
    closed = LogWatch(ws_server, "connection closed")
    extra = {} if headers else {"additional_headers": {}}
    async with ws_server.connect(path, max_size=None, **extra) as ws:
        await send(ws)
        with pytest.raises(websockets.ConnectionClosed) as info:
            await recv_json(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == code
    logged = await closed.wait(1)
    assert [(r["path"], r["code"]) for r in logged] == [(path, code)]


async def test_a_spliced_relay_logs_its_own_closes_once_not_the_upstreams(
    ws_server: WsServer, backends: Backends
) -> None:
    await one_instance(ws_server, backends)
    closed = LogWatch(ws_server, "connection closed")
    path = f"/ws/proxy/{backends.service}/echo"

    async def close_code(send: Callable[[Any], Awaitable[None]]) -> int:
        async with ws_server.connect(path, max_size=None) as ws:
            await ws.send("spliced?")
            assert await ws.recv() == "spliced?"
            await send(ws)
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
        assert info.value.rcvd is not None
        return info.value.rcvd.code

    assert await close_code(_oversized) == 1009
    assert await close_code(lambda ws: ws.send("close 4000 the application's")) == 4000
    assert await close_code(lambda ws: ws.send("die")) == 1014  # no close frame
    logged = await closed.wait(2)
    assert [(r["path"], r["code"], r["reason"]) for r in logged] == [
        (path, 1009, "message over 65536 bytes"),
        (path, 1014, "upstream connection lost"),
    ]


async def test_a_normal_closing_is_not_logged(ws_server: WsServer) -> None:
    closed = LogWatch(ws_server, "connection closed")
    async with ws_server.connect("/ws") as ws:
        await ws.send("ping")
        assert await ws.recv() == "pong"
    async with ws_server.connect("/ws/stream"):
        pass
    # A close logged after theirs tells that they were seen and not logged.
    async with ws_server.connect(additional_headers={}) as ws:
        await _not_authenticated(ws)
        with pytest.raises(websockets.ConnectionClosed):
            await recv_json(ws)
    assert [r["code"] for r in await closed.wait(1)] == [1008]


async def test_a_huge_method_is_refused_without_being_echoed_or_logged_whole(
    ws_server: WsServer,
) -> None:
    huge = "m" * 60_000  # within the test server's 64 KiB frames
    refused = LogWatch(ws_server, "message refused")
    scoped = {"Authorization": f"Bearer {ws_server.token(scopes=('iptv',))}"}
    async with ws_server.connect(additional_headers=scoped) as ws:
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": f"{huge}.run"}))
        answer = await recv_json(ws)
        assert answer["error"]["code"] == -32005 and len(json.dumps(answer)) < 2000
    async with ws_server.connect() as ws:  # scope "*": the call goes out, to no service
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": f"{huge}.run"}))
        answer = await recv_json(ws)
        assert answer["error"]["code"] == -32601 and len(json.dumps(answer)) < 2000
    logged = await refused.wait(2)
    assert [r["code"] for r in logged] == [-32005, "method_not_found"]
    assert all(len(json.dumps(r)) < 2000 for r in logged)


@pytest.mark.parametrize("path", ["/ws", "/ws/stream"])
async def test_a_connections_refusals_are_logged_with_a_bound(
    ws_server: WsServer, path: str
) -> None:
    # 5,000 bad messages on one connection wrote 5,000 lines: now the first
    # `LOGGED_PER_WINDOW` a window, then one line counting the rest (here, at the
    # connection's end). Every message is still answered and the session goes on.
    refused = LogWatch(ws_server, "message refused")
    summary = LogWatch(ws_server, "message refusals not logged")
    sent = LOGGED_PER_WINDOW + 90
    async with ws_server.connect(path) as ws:
        for _ in range(sent):
            await ws.send("{not json")
        for _ in range(sent):
            assert "error" in (answer := await recv_json(ws)) or answer["ret"] == 1
        if path == "/ws":
            await ws.send("ping")
            assert await ws.recv() == "pong"
    [counted] = await summary.wait(1)
    assert (counted["path"], counted["count"]) == (path, sent - LOGGED_PER_WINDOW)
    assert len(refused.new()) == LOGGED_PER_WINDOW


async def test_a_connections_failed_calls_are_logged_with_a_bound(
    ws_server: WsServer, redis_client: aioredis.Redis
) -> None:
    # Each call to a service with no live instance wrote an `rpc error` warning: a client
    # calling it in a loop grew the log without bound. Now the first `LOGGED_PER_WINDOW` a
    # window, then one warning counting the rest; every call is still answered.
    service = f"dead{uuid.uuid4().hex[:6]}"
    await Registry(redis_client).publish_catalog(service, {"m": {}})  # known, nobody running
    failed = LogWatch(ws_server, "rpc error")
    summary = LogWatch(ws_server, "message failures not logged")
    sent = LOGGED_PER_WINDOW + 20
    async with ws_server.connect() as ws:
        for i in range(sent):
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": i, "method": f"{service}.m"}))
            assert (await recv_json(ws))["error"]["code"] == -32001  # service unavailable
    [counted] = await summary.wait(1)
    assert (counted["path"], counted["count"], counted["level"]) == ("/ws", 20, "warning")
    logged = failed.new()
    assert len(logged) == LOGGED_PER_WINDOW
    assert all(r["method"] == f"{service}.m" for r in logged)


def test_refused_upgrades_are_logged_within_a_budget_per_client_address(
    make_ws_server: Callable[..., WsServer],
) -> None:
    """A client retrying a refused upgrade in a loop: its first refusals are logged in
    full with its address, the rest counted in one line (here as the service stops);
    another address has a budget of its own (`websocket.errors`)."""
    server = make_ws_server(LOG_REFUSALS_PER_CLIENT="3")
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
               "Authorization": "Bearer not-a-token"}  # fmt: skip
    with httpx.Client(base_url=f"http://{server.address}", timeout=5) as retrying:
        for _ in range(8):
            assert retrying.get("/ws/stream", headers=upgrade).status_code == 401
    other = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=f"http://{server.address}", transport=other, timeout=5) as client:
        assert client.get("/ws/stream", headers=upgrade).status_code == 401
    wait_for(lambda: len(server.proc.log_records("request refused")) >= 4, timeout=5)
    refused = server.proc.log_records("request refused")
    assert [(r["client"], r["status"]) for r in refused] == [("127.0.0.1", 401)] * 3 + [
        ("127.0.0.2", 401)
    ]
    assert server.proc.log_records("request refusals not logged") == []
    server.proc.stop()
    summaries = server.proc.log_records("request refusals not logged")
    assert [(s["client"], s["count"]) for s in summaries] == [("127.0.0.1", 5)]
