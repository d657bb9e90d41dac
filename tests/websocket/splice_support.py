"""Tools of the splice tests (`websocket.splice`): a raw client that sends exact frames in
exact pieces, a local upstream that records the pings it gets and can flood or close at
once, and a hand-written upstream (`raw_upstream`) with its handshake answer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest_asyncio
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import Close, Frame, Opcode
from websockets.utils import accept_key

from common.instance_record import InstanceRecord
from common.registry import Registry
from tests.helpers import free_port, wait_for_async
from tests.websocket.conftest import WsServer

# --- a raw client: exact frames, in exact pieces -------------------------------------------


@dataclass
class RawClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes, piece: int = 0) -> None:
        """Write `data`, in pieces of `piece` bytes each read separately by the relay."""
        if not piece:
            self.writer.write(data)
            await self.writer.drain()
            return
        for i in range(0, len(data), piece):
            self.writer.write(data[i : i + piece])
            await self.writer.drain()
            await asyncio.sleep(0.002)  # pacing, so that each piece is its own TCP segment

    async def recv(self, timeout: float = 5.0) -> Frame:
        """The next frame from the relay (server frames are not masked). A ping (the
        upstream's keepalive, passed through) is answered with a pong, as a client does,
        and skipped."""
        while True:
            received = await self._frame(timeout)
            if received.opcode is not Opcode.PING:
                return received
            await self.send(frame(Opcode.PONG, received.data))

    async def _frame(self, timeout: float) -> Frame:
        async with asyncio.timeout(timeout):
            b0, b1 = await self.reader.readexactly(2)
            assert not b1 & 0x80, "a server frame must not be masked"
            size = b1 & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
            data = await self.reader.readexactly(size)
        return Frame(Opcode(b0 & 0x0F), data, fin=bool(b0 & 0x80))


def frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin=fin).serialize(mask=True)


def server_frame(opcode: Opcode, data: bytes) -> bytes:
    """A frame as a server (a hand-written upstream) writes it: unmasked."""
    return Frame(opcode, data).serialize(mask=False)


# A hand-written upstream's close, with a code of its own (the client's close code tells
# whose it is).
UPSTREAM_CLOSE = server_frame(Opcode.CLOSE, Close(4005, "bye").serialize())


async def open_raw(
    server: WsServer, path: str, early: bytes = b"", *, authenticated: bool = True
) -> RawClient:
    """A raw WebSocket client of `server`, past the upgrade (authenticated by header
    unless not `authenticated`); `early`: bytes written with the upgrade request, in the
    same write (frames sent without waiting for the answer, as RFC 6455 allows)."""
    host, port = server.address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(os.urandom(16)).decode()
    credential = f"Authorization: Bearer {server.token()}\r\n" if authenticated else ""
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {server.address}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{credential}\r\n".encode()
        + early
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return RawClient(reader, writer)


@pytest_asyncio.fixture(name="raw_client")
async def raw_client_fixture(ws_server: WsServer) -> AsyncIterator[Any]:
    opened: list[RawClient] = []

    async def open_on_ws_server(path: str) -> RawClient:
        client = await open_raw(ws_server, path)
        opened.append(client)
        return client

    yield open_on_ws_server
    for client in opened:
        client.writer.transport.abort()


# --- a local upstream ---------------------------------------------------------------------


class RecordingConnection(ServerConnection):
    """Notes the pings it receives (the library answers them itself)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pings_received: list[bytes] = []

    def process_event(self, event: Any) -> None:
        if isinstance(event, Frame) and event.opcode is Opcode.PING:
            self.pings_received.append(event.data)
        super().process_event(event)


@dataclass
class LocalUpstream:
    service: str = field(default_factory=lambda: f"lu{uuid.uuid4().hex[:8]}")
    connections: list[RecordingConnection] = field(default_factory=list)
    sent: int = 0
    flood: int = 0  # bytes to push to each new connection, 64 KiB at a time
    close_at_once: tuple[int, str] | None = None  # close each new connection so, at once


@pytest_asyncio.fixture(name="local_upstream")
async def local_upstream_fixture(redis_client: aioredis.Redis) -> AsyncIterator[LocalUpstream]:
    upstream = LocalUpstream()

    async def handler(ws: ServerConnection) -> None:
        assert isinstance(ws, RecordingConnection)
        upstream.connections.append(ws)
        chunk = b"z" * 65536
        if upstream.close_at_once:
            await ws.close(*upstream.close_at_once)
            return
        try:
            while upstream.sent < upstream.flood:
                await ws.send(chunk)
                upstream.sent += len(chunk)
            async for message in ws:
                await ws.send(message)
        except websockets.ConnectionClosed:
            pass

    port = free_port()
    registry = Registry(redis_client, ttl=60)
    record = InstanceRecord(upstream.service, "local", kind="ws", address=f"127.0.0.1:{port}")
    async with serve(handler, "127.0.0.1", port, compression=None,
                     create_connection=RecordingConnection, ping_interval=None):  # fmt: skip
        await registry.heartbeat(record)
        try:
            yield upstream
        finally:
            await registry.deregister(upstream.service, "local")


async def reach(server: WsServer, upstream: LocalUpstream) -> None:
    async def echoes() -> bool:
        async with server.connect(f"/ws/proxy/{upstream.service}/") as ws:
            await ws.send("up?")
            return bool(await ws.recv() == "up?")

    await wait_for_async(echoes, timeout=30)


@contextlib.asynccontextmanager
async def raw_upstream(
    redis_client: aioredis.Redis,
    service: str,
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[None]:
    """A hand-written upstream (`handler`, as `asyncio.start_server` calls it), the one
    instance of `service` in the registry until the block ends."""
    port = free_port()
    server = await asyncio.start_server(handler, "127.0.0.1", port)
    registry = Registry(redis_client, ttl=60)
    await registry.heartbeat(InstanceRecord(service, "raw", kind="ws", address=f"127.0.0.1:{port}"))
    try:
        yield
    finally:
        await registry.deregister(service, "raw")
        server.close()


async def handshake_answer(reader: asyncio.StreamReader) -> bytes:
    """Read a WebSocket upgrade request; the 101 answer that accepts it."""
    request = await reader.readuntil(b"\r\n\r\n")
    key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))  # fmt: skip
    accept = accept_key(key.decode()).encode()
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")  # fmt: skip
