"""Clients that go away abruptly (a TCP reset, a request head cut short), through a real
websocket service: nobody else notices, and nothing is logged as an error.

uvloop closes a reset connection's transport before its protocol hears of it, and the
hub may hold the connection's `send` a moment longer: writing to it raised, which
killed the push hub's reader (every client of the process stopped receiving) or the
keepalive task, with a traceback or two in the log."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import struct
import threading
import time
import uuid

import pytest
import redis

from common import constants
from tests.helpers import wait_for
from tests.websocket.conftest import WsServer, recv_json

pytestmark = pytest.mark.timeout(60)


def upgraded(server: WsServer) -> socket.socket:
    """A raw `/ws` connection, upgraded with a bearer token (the head of the answer read)."""
    host, port = server.address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {server.token()}\r\n"
                  "\r\n").encode())  # fmt: skip
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def text_frame(message: object) -> bytes:
    """A masked text frame (a client's) holding `message` as JSON (under 126 bytes)."""
    payload = json.dumps(message).encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """The next frame from the server (unmasked): opcode and payload."""
    first, second = _read(sock, 2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", _read(sock, 2))[0]
    elif size == 127:
        size = struct.unpack("!Q", _read(sock, 8))[0]
    return first & 0x0F, _read(sock, size)


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk
    return data


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset (RST), no close frame."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def error_lines(server: WsServer) -> list[str]:
    log = server.proc.log_path.read_text(errors="replace")
    return [line for line in log.splitlines() if '"level": "error"' in line]


async def test_subscribers_resetting_during_a_burst_stop_no_one_elses_pushes(
    ws_server: WsServer,
) -> None:
    channel = f"burst:{uuid.uuid4().hex[:8]}"
    publisher = redis.Redis.from_url(ws_server.redis_url)
    errors = len(error_lines(ws_server))
    try:
        async with ws_server.connect() as good:
            await good.send(json.dumps({"type": "subscribe", "channel": channel}))
            assert (await recv_json(good))["type"] == "subscribed"
            for _ in range(5):
                leaving = [upgraded(ws_server) for _ in range(20)]
                for sock in leaving:
                    sock.sendall(text_frame({"type": "subscribe", "channel": channel}))
                    assert json.loads(read_frame(sock)[1])["type"] == "subscribed"
                burst = publisher.pipeline(transaction=False)
                for n in range(300):
                    burst.publish(constants.push_channel(channel), str(n))

                def resets(socks: list[socket.socket] = leaving) -> None:
                    time.sleep(random.random() * 0.004)  # somewhere within the fan-out
                    for sock in socks:
                        reset(sock)

                thread = threading.Thread(target=resets)
                thread.start()
                burst.execute()
                thread.join()
                got = [(await recv_json(good))["data"] for _ in range(300)]
                assert got == list(range(300))
        async with ws_server.connect() as fresh:  # a subscriber added afterwards
            other = f"burst:{uuid.uuid4().hex[:8]}"
            await fresh.send(json.dumps({"type": "subscribe", "channel": other}))
            assert (await recv_json(fresh))["type"] == "subscribed"
            publisher.publish(constants.push_channel(other), '"hello"')
            assert (await recv_json(fresh))["data"] == "hello"
    finally:
        publisher.close()
    assert error_lines(ws_server)[errors:] == []


async def test_clients_resetting_mid_subscribe_log_no_error(ws_server: WsServer) -> None:
    errors = len(error_lines(ws_server))
    for k in range(10):
        sock = upgraded(ws_server)
        subscribes = (text_frame({"type": "subscribe", "channel": f"gone:{k}:{n}"})
                      for n in range(60))  # fmt: skip
        sock.sendall(b"".join(subscribes))
        reset(sock)
    wait_for(lambda: ws_server.health()["connections"] == 0, 10)
    # A barrier: this subscribe takes the hub's lock and pub/sub connection after every
    # subscribe of the sessions that were reset, whose tracebacks came right after theirs.
    async with ws_server.connect() as ws:
        await ws.send(json.dumps({"type": "subscribe", "channel": "gone:barrier"}))
        assert await recv_json(ws) == {"type": "subscribed", "channel": "gone:barrier"}
    assert error_lines(ws_server)[errors:] == []


async def test_a_reset_client_does_not_stop_the_keepalive(make_ws_server) -> None:
    server = make_ws_server(WS_PING_INTERVAL="0.3", WS_PING_TIMEOUT="0.5")
    gone = upgraded(server)
    assert read_frame(gone)[0] == 0x9  # a ping, not answered: its pong is awaited...
    reset(gone)  # ...when the connection is lost: the keepalive closes it all the same
    silent = upgraded(server)  # a client that never answers pings is closed with 1011
    while (frame := read_frame(silent))[0] == 0x9:
        pass
    assert frame[0] == 0x8 and struct.unpack("!H", frame[1][:2])[0] == 1011, frame
    silent.close()
    assert error_lines(server) == []


async def test_a_client_leaving_mid_head_is_no_error(make_ws_server) -> None:
    server = make_ws_server(LOG_LEVEL="DEBUG")
    host, port = server.address.split(":")
    for _ in range(5):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgr")
    wait_for(lambda: len(server.proc.log_records("client left before its answer")) == 5, 10)
    assert error_lines(server) == []
    assert server.health()["status"] == "ok"


async def test_a_client_going_away_is_logged_at_debug_only(make_ws_server) -> None:
    # `websockets`' parser logged "connection closed" at info for each (no path, no
    # code): README says nothing above debug for a client that goes away.
    server = make_ws_server(LOG_LEVEL="DEBUG")
    for leave in (socket.socket.close, reset):  # a FIN, a RST: no close frame either way
        sock = upgraded(server)
        sock.sendall(text_frame({"type": "ping"}))
        assert json.loads(read_frame(sock)[1])["type"] == "pong"
        leave(sock)
    async with server.connect() as ws:  # and a clean closing handshake
        await ws.send("ping")
        assert await ws.recv() == "pong"
    wait_for(lambda: server.health()["connections"] == 0, 10)
    closed = server.proc.log_records("connection closed")  # (the FIN's, at least)
    assert closed
    assert {(r["level"], r["logger"], r.get("path")) for r in closed} == {
        ("debug", "websocket.client", "/ws")
    }
