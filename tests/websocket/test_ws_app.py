"""The WebSocket service's basics, through a real server process: health, pings, bad input."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import websockets

from tests.websocket.conftest import WsServer

pytestmark = pytest.mark.timeout(60)


def test_health_reports_redis_and_connections(ws_server: WsServer) -> None:
    body = httpx.get(f"http://{ws_server.address}/health").json()
    assert body["status"] == "ok" and body["redis"] == {"ok": True}
    assert isinstance(body["connections"], int)


async def test_ping_pong(ws_server: WsServer) -> None:
    async with ws_server.connect() as ws:
        await ws.send("ping")
        assert await ws.recv() == "pong"
        await ws.send(json.dumps({"type": "ping", "id": 7}))
        assert json.loads(await ws.recv()) == {"type": "pong", "id": 7}


async def test_bad_messages_get_errors_not_disconnects(ws_server: WsServer) -> None:
    async with ws_server.connect() as ws:
        await ws.send("{not json")
        answer = json.loads(await ws.recv())
        assert answer["error"]["code"] == -32700 and answer["id"] is None
        await ws.send(json.dumps({"type": "dance", "id": 3}))
        answer = json.loads(await ws.recv())
        assert answer["error"]["code"] == "unknown_type" and answer["id"] == 3
        await ws.send(json.dumps({"type": "subscribe", "channel": "no spaces allowed"}))
        assert json.loads(await ws.recv())["error"]["code"] == "bad_channel"
        await ws.send("ping")
        assert await ws.recv() == "pong"


@pytest.mark.parametrize("path", ["/ws", "/ws/stream"])
async def test_oversized_frame_closes_1009(ws_server: WsServer, path: str) -> None:
    async with ws_server.connect(path, max_size=None) as ws:
        await ws.send("x" * (256 * 1024))  # the test server's limit is 64 KiB
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


@pytest.mark.parametrize("path", ["/ws", "/ws/proxy/svc/x"])
def test_a_head_that_cannot_be_parsed_gets_400_not_401(ws_server: WsServer, path: str) -> None:
    host, port = ws_server.address.rsplit(":", 1)
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
