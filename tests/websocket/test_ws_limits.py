"""Each limit of the websocket service triggers its documented close code (real processes).

1009 (message too big) is in test_ws_app and test_ws_relay; 1001 (drain on
SIGTERM) in test_ws_relay; here: 1013 slow consumer, 1011 no pong, the cap.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import uuid

import psutil
import pytest
import redis.asyncio as aioredis
import websockets

from common import constants
from tests.helpers import peak_rss_growth, wait_for_async
from tests.websocket.conftest import WsServer, recv_json

pytestmark = pytest.mark.timeout(120)


async def no_connections(server: WsServer) -> bool:
    return bool(server.health()["connections"] == 0)


async def drain_until_closed(ws) -> tuple[int, str]:
    with pytest.raises(websockets.ConnectionClosed) as info:
        while True:
            await recv_json(ws, timeout=10)
    assert info.value.rcvd is not None, "closed without a close frame"
    return info.value.rcvd.code, info.value.rcvd.reason


def small_buffer_socket(server: WsServer) -> socket.socket:
    """A client socket with a small receive buffer, so a reader that stops is soon behind."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    host, port = server.address.split(":")
    sock.connect((host, int(port)))
    return sock


async def test_slow_consumer_is_closed_1013(make_ws_server, redis_client: aioredis.Redis):
    server = make_ws_server(WS_SEND_QUEUE="8")
    channel = f"flood{uuid.uuid4().hex[:6]}"
    async with server.connect(sock=small_buffer_socket(server), max_size=None) as ws:
        await ws.send(json.dumps({"type": "subscribe", "channel": channel}))
        assert (await recv_json(ws))["type"] == "subscribed"
        ws.transport.pause_reading()  # the client stops reading: pushed messages pile up
        chunk = json.dumps("y" * 32 * 1024)

        async def flood_until_dropped() -> bool:
            async with redis_client.pipeline(transaction=False) as pipe:
                for _ in range(20):
                    pipe.publish(constants.push_channel(channel), chunk)
                await pipe.execute()
            return await no_connections(server)

        await wait_for_async(flood_until_dropped, timeout=60)
        ws.transport.resume_reading()
        code, reason = await drain_until_closed(ws)
    assert code == 1013 and "send queue full" in reason


async def test_no_pong_closes_1011(make_ws_server) -> None:
    server = make_ws_server(WS_PING_INTERVAL="0.3", WS_PING_TIMEOUT="0.3")
    async with server.connect() as ws:
        await ws.send("ping")
        assert await ws.recv() == "pong"
        ws.transport.pause_reading()  # pings go unanswered
        await wait_for_async(lambda: no_connections(server), timeout=30)
        ws.transport.resume_reading()
        code, _ = await drain_until_closed(ws)
    assert code == 1011


async def test_connection_cap_refuses_with_503(make_ws_server) -> None:
    server = make_ws_server(WS_MAX_CONNECTIONS="3")
    held = [await server.connect().__aenter__() for _ in range(3)]
    try:
        for path in ("/ws", "/ws/stream", "/ws/proxy/any/echo"):
            with pytest.raises(websockets.InvalidStatus) as info:
                async with server.connect(path):
                    pass
            assert info.value.response.status_code == 503
        await held.pop().close()

        async def admitted() -> bool:
            async with server.connect() as ws:
                await ws.send("ping")
                return bool(await ws.recv() == "pong")

        await wait_for_async(admitted, timeout=10)
    finally:
        for ws in held:
            await ws.close()


@pytest.mark.parametrize("path", ["/ws", "/ws/stream"])
async def test_a_client_that_pings_and_never_reads_is_not_read_either(
    make_ws_server, path: str
) -> None:
    # Every ping gets a pong. A client that floods pings and reads nothing would make the
    # pongs pile up in the service without bound, unless it stops reading that client.
    server = make_ws_server()
    process = psutil.Process(server.proc.pid)
    sock = small_buffer_socket(server)
    key = base64.b64encode(os.urandom(16)).decode()
    token = server.token()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                 f"Authorization: Bearer {token}\r\n\r\n".encode())  # fmt: skip
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101")
    ping = bytes([0x89, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125  # masked with a zero key
    block = ping * (1024 * 1024 // len(ping))
    limit = 64 * 1024 * 1024

    def flood() -> int:
        sock.settimeout(3)
        sent = 0
        with contextlib.suppress(TimeoutError):
            while sent < limit:
                sock.sendall(block)
                sent += len(block)
        return sent

    with peak_rss_growth(process) as growth:
        sent = await asyncio.to_thread(flood)
    sock.close()
    assert sent < limit  # the service stopped reading: the sender was held back
    assert growth[0] < 32 * 1024 * 1024, f"grew {growth[0] // 1024} KiB for {sent // 1024} KiB"
