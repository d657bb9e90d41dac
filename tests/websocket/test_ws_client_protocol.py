"""`/ws` once taken over from Sanic (`websocket.client`): framing, ordering and the
process-wide keepalive, through a real websocket service."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from tests.websocket.conftest import WsServer, recv_json

pytestmark = pytest.mark.timeout(60)


async def test_messages_are_answered_in_order_behind_one_that_waits(ws_server: WsServer):
    async with ws_server.connect() as ws:
        channel = "order:1"
        sent = [
            {"type": "subscribe", "channel": channel},
            {"type": "ping", "id": 1},
            {"type": "unsubscribe", "channel": channel},
            {"type": "ping", "id": 2},
        ]
        for message in sent:  # all sent before the first answer
            await ws.send(json.dumps(message))
        answers = [await recv_json(ws) for _ in range(4)]
    assert answers == [
        {"type": "subscribed", "channel": channel},
        {"type": "pong", "id": 1},
        {"type": "unsubscribed", "channel": channel},
        {"type": "pong", "id": 2},
    ]


async def test_first_message_auth_sent_with_more_messages(ws_server: WsServer) -> None:
    async with ws_server.connect(additional_headers={}) as ws:
        await ws.send(json.dumps({"type": "auth", "token": ws_server.token(), "id": 1}))
        await ws.send("ping")
        assert (await recv_json(ws))["type"] == "authenticated"
        assert await asyncio.wait_for(ws.recv(), 5) == "pong"


async def test_fragmented_message_is_joined(ws_server: WsServer) -> None:
    async with ws_server.connect() as ws:
        await ws.send(['{"type": "pi', 'ng", "id": ', "9}"])
        assert await recv_json(ws) == {"type": "pong", "id": 9}


async def test_invalid_utf8_closes_1007(ws_server: WsServer) -> None:
    async with ws_server.connect() as ws:
        await ws.send(b"\xff\xfe", text=True)
        with pytest.raises(websockets.ConnectionClosed) as info:
            await recv_json(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1007


async def test_answered_pings_keep_the_connection(make_ws_server) -> None:
    server = make_ws_server(WS_PING_INTERVAL="0.2", WS_PING_TIMEOUT="0.2")
    async with server.connect() as ws:  # the client answers pings by itself
        deadline = time.monotonic() + 1.5  # several ping rounds
        while time.monotonic() < deadline:
            await ws.send("ping")
            assert await asyncio.wait_for(ws.recv(), 5) == "pong"
            await asyncio.sleep(0.1)  # pacing across ping rounds, not waiting for a condition
        assert server.health()["connections"] == 1
