"""`/ws/proxy/...` as a byte splice (`websocket.splice`), through real processes: frames split
across reads, fragmented messages, pings end to end, a vanishing client, backpressure, the
close handshakes and the drain."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import Close, Frame, Opcode
from websockets.utils import accept_key

from common.registry import InstanceRecord, Registry
from tests.helpers import free_port, wait_for_async
from tests.websocket.conftest import (
    Backends,
    LogWatch,
    WsServer,
    last_close,
    recv_json,
    wait_reachable,
    wait_upstream_closed,
)
from websocket.splice import CLOSE_TIMEOUT

pytestmark = pytest.mark.timeout(120)


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


async def open_raw(server: WsServer, path: str) -> RawClient:
    """A raw WebSocket client of `server`, past the upgrade (authenticated by header)."""
    host, port = server.address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {server.address}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {server.token()}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return RawClient(reader, writer)


@pytest_asyncio.fixture
async def raw_client(ws_server: WsServer) -> AsyncIterator[Any]:
    opened: list[RawClient] = []

    async def open_on_ws_server(path: str) -> RawClient:
        client = await open_raw(ws_server, path)
        opened.append(client)
        return client

    yield open_on_ws_server
    for client in opened:
        client.writer.transport.abort()


async def test_a_large_message_in_small_reads_and_fragments_pass_as_they_are(
    ws_server: WsServer, backends: Backends, raw_client: Any
) -> None:
    backends.start("a")
    await wait_reachable(ws_server, backends.service, {"a"})
    raw = await raw_client(f"/ws/proxy/{backends.service}/echo")
    payload = os.urandom(60_000)
    # Headers split across reads too: 7-byte pieces over the first frame's 8-byte header
    # (and a little beyond), then 4 KB pieces.
    first = frame(Opcode.BINARY, payload)
    await raw.send(first[:70], piece=7)
    await raw.send(first[70:], piece=4096)
    await raw.send(frame(Opcode.BINARY, payload), piece=4096)
    for _ in range(2):
        echoed = await raw.recv()
        assert (echoed.opcode, echoed.fin, echoed.data) == (Opcode.BINARY, True, payload)
    # A fragmented text message, with a ping between its fragments (RFC 6455 §5.4).
    await raw.send(
        frame(Opcode.TEXT, b"hello ", fin=False)
        + frame(Opcode.PING, b"mid")
        + frame(Opcode.CONT, b"fragments", fin=True),
        piece=5,
    )
    pong, echoed = await raw.recv(), await raw.recv()
    assert (pong.opcode, pong.data) == (Opcode.PONG, b"mid")  # answered by the upstream
    assert (echoed.opcode, echoed.data) == (Opcode.TEXT, b"hello fragments")


async def test_a_client_that_vanishes_closes_the_upstream_1001(
    ws_server: WsServer, backends: Backends, raw_client: Any
) -> None:
    backends.start("a")
    await wait_reachable(ws_server, backends.service, {"a"})
    raw = await raw_client(f"/ws/proxy/{backends.service}/echo")
    await raw.send(frame(Opcode.TEXT, b"hi"))
    assert (await raw.recv()).data == b"hi"
    raw.writer.transport.abort()  # no close frame, a TCP reset

    await wait_upstream_closed(ws_server, backends.service, [1001, "client went away"])


async def test_an_oversized_fragmented_message_closes_1009_and_the_upstream_1001(
    ws_server: WsServer, backends: Backends, raw_client: Any
) -> None:
    backends.start("a")
    await wait_reachable(ws_server, backends.service, {"a"})
    raw = await raw_client(f"/ws/proxy/{backends.service}/echo")
    await raw.send(frame(Opcode.TEXT, b"spliced?"))  # an echo: the splice has taken over
    assert (await raw.recv()).data == b"spliced?"
    fragment = b"x" * 40_000  # each under WS_MAX_MESSAGE_BYTES (64 KiB), the message over it
    await raw.send(frame(Opcode.TEXT, fragment, fin=False) + frame(Opcode.CONT, fragment))
    closing = await raw.recv()
    assert closing.opcode == Opcode.CLOSE and Close.parse(closing.data).code == 1009
    await raw.send(frame(Opcode.CLOSE, Close(1009, "").serialize()))
    assert await asyncio.wait_for(raw.reader.read(), 5) == b""  # then the relay closes TCP

    await wait_upstream_closed(ws_server, backends.service, [1001, "client went away"])


async def test_small_frames_each_in_its_own_read_count_towards_the_message_limit(
    make_ws_server: Any, backends: Backends
) -> None:
    # Frames of up to 125 bytes that arrive one per read take the relay's shortcut
    # (`_Leg.data_received`); the message limit must hold there too.
    server = make_ws_server(WS_MAX_MESSAGE_BYTES="100")
    backends.start("a")
    await wait_reachable(server, backends.service, {"a"})
    raw = await open_raw(server, f"/ws/proxy/{backends.service}/echo")
    try:
        await raw.send(frame(Opcode.TEXT, b"x" * 100))  # exactly the limit: relayed
        assert (await raw.recv()).data == b"x" * 100
        await raw.send(frame(Opcode.PING, b"p" * 120))  # control frames are not messages
        assert (await raw._frame(5)).opcode == Opcode.PONG
        await raw.send(frame(Opcode.TEXT, b"y" * 60, fin=False))
        await asyncio.sleep(0.05)  # so that the relay reads the two fragments separately
        await raw.send(frame(Opcode.CONT, b"y" * 60))  # 120 bytes in all: over the limit
        closing = await raw.recv()
        assert closing.opcode == Opcode.CLOSE and Close.parse(closing.data).code == 1009
    finally:
        raw.writer.transport.abort()

    await wait_upstream_closed(server, backends.service, [1001, "client went away"])


async def test_close_handshakes_end_both_tcp_connections_promptly(
    ws_server: WsServer, backends: Backends
) -> None:
    backends.start("a")
    await wait_reachable(ws_server, backends.service, {"a"})
    async with ws_server.connect(f"/ws/proxy/{backends.service}/echo") as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        started = time.monotonic()
        await ws.close(4003, "client first")  # returns once the relay closed TCP
        # Closed by the handshake, not by the relay's abort of a stuck closing:
        assert time.monotonic() - started < CLOSE_TIMEOUT
    async with ws_server.connect(f"/ws/proxy/{backends.service}/echo") as ws:
        started = time.monotonic()
        await ws.send("close 4001 upstream first")
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        await asyncio.wait_for(ws.wait_closed(), CLOSE_TIMEOUT)
        assert time.monotonic() - started < CLOSE_TIMEOUT
    assert await last_close(ws_server, backends.service) == [4001, "upstream first"]


async def test_drain_closes_the_upstream_leg_1001_too(
    make_ws_server: Any, ws_server: WsServer, backends: Backends
) -> None:
    server = make_ws_server()
    backends.start("a")
    await wait_reachable(server, backends.service, {"a"})
    async with server.connect(f"/ws/proxy/{backends.service}/echo") as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(websockets.ConnectionClosed) as info:
            await recv_json(ws, timeout=10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001

    await wait_upstream_closed(ws_server, backends.service, [1001, "server shutting down"])


# --- an upstream in this process, for what the echo backend cannot show ---------------------


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


@pytest_asyncio.fixture
async def local_upstream(redis_client: aioredis.Redis) -> AsyncIterator[LocalUpstream]:
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


async def test_pings_are_answered_end_to_end_and_sanic_no_longer_pings(
    make_ws_server: Any, local_upstream: LocalUpstream
) -> None:
    server = make_ws_server(WS_PING_INTERVAL="0.3", WS_PING_TIMEOUT="0.3")
    await reach(server, local_upstream)
    async with server.connect(f"/ws/proxy/{local_upstream.service}/", ping_interval=None) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        upstream = local_upstream.connections[-1]
        pong = await ws.ping(b"from the client")
        await asyncio.wait_for(pong, 5)
        assert upstream.pings_received == [b"from the client"]  # the upstream answered it
        pong = await upstream.ping(b"from the upstream")
        await asyncio.wait_for(pong, 5)  # the client answered it
        # Sanic's keepalive would close an unanswering client within 0.6 s: it no longer runs.
        ws.transport.pause_reading()
        await asyncio.sleep(1.5)  # nothing to wait for: checking that nothing happens
        ws.transport.resume_reading()
        await ws.send("still relayed")
        assert await ws.recv() == "still relayed"


async def test_a_slow_reader_stops_the_upstream_instead_of_growing_memory(
    ws_server: WsServer, local_upstream: LocalUpstream
) -> None:
    await reach(ws_server, local_upstream)
    total = 64 * 1024 * 1024
    local_upstream.flood = total
    rss_before = rss_kb(ws_server)
    async with ws_server.connect(f"/ws/proxy/{local_upstream.service}/", max_size=None,
                                 ping_interval=None) as ws:  # fmt: skip
        ws.transport.pause_reading()  # the client reads nothing

        async def stalled() -> bool:
            sent = local_upstream.sent
            await asyncio.sleep(0.5)  # the condition is that nothing moves for a while
            return sent > 0 and local_upstream.sent == sent

        await wait_for_async(stalled, timeout=30)
        assert local_upstream.sent < total // 2  # held back: socket buffers, not the relay
        assert rss_kb(ws_server) - rss_before < 16 * 1024
        ws.transport.resume_reading()
        received = 0
        while received < total:
            received += len(await asyncio.wait_for(ws.recv(), 10))
        assert received == total
        await ws.send("done")
        assert await ws.recv() == "done"


def rss_kb(server: WsServer) -> int:
    assert server.proc.process is not None
    pid = server.proc.process.pid
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def handshake_answer(reader: asyncio.StreamReader) -> bytes:
    """Read a WebSocket upgrade request; the 101 answer that accepts it."""
    request = await reader.readuntil(b"\r\n\r\n")
    key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))  # fmt: skip
    accept = accept_key(key.decode()).encode()
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")  # fmt: skip


async def test_an_upstream_that_closes_as_it_opens_passes_its_close_on(
    ws_server: WsServer, local_upstream: LocalUpstream
) -> None:
    # The close may come in the same read as the handshake response: then the relay does not
    # splice but pumps frames (`Splice.take_over` returns None); the client sees no difference.
    await reach(ws_server, local_upstream)
    local_upstream.close_at_once = (4004, "not today")
    for _ in range(5):
        async with ws_server.connect(f"/ws/proxy/{local_upstream.service}/") as ws:
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4004, "not today")


async def test_a_close_in_the_same_read_as_the_handshake_response_is_relayed_too(
    ws_server: WsServer, redis_client: aioredis.Redis
) -> None:
    # One write with the 101 and a close frame: `websockets` parses both before the relay
    # can take over, so the relay pumps frames instead of splicing (`Splice.take_over`).
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            await handshake_answer(reader)
            + Frame(Opcode.CLOSE, Close(4005, "bye").serialize()).serialize(mask=False)
        )
        await writer.drain()
        await reader.read(1024)  # the relay's answering close
        writer.close()

    service, port = f"hs{uuid.uuid4().hex[:8]}", free_port()
    server = await asyncio.start_server(upstream, "127.0.0.1", port)
    registry = Registry(redis_client, ttl=60)
    await registry.heartbeat(InstanceRecord(service, "raw", kind="ws", address=f"127.0.0.1:{port}"))

    async def closed_4005() -> bool:
        async with ws_server.connect(f"/ws/proxy/{service}/") as ws:
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
        return info.value.rcvd is not None and info.value.rcvd.code == 4005

    try:
        await wait_for_async(closed_4005, timeout=30)  # once the registry view has it
        closed = LogWatch(ws_server, "connection closed")
        for _ in range(3):
            assert await closed_4005()
        # The upstream's closes are not logged as the service's own: a close of its own
        # after them (1008, a client that does not authenticate) tells they were not.
        async with ws_server.connect("/ws", additional_headers={}) as ws:
            await ws.send("ping")
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
        assert [r["code"] for r in await closed.wait(1)] == [1008]
    finally:
        await registry.deregister(service, "raw")
        server.close()


# --- an end that stops reading (`websocket.splice`, "Stalls") ------------------------------


@dataclass
class StalledUpstream:
    """Completes the WebSocket handshake, then reads nothing until `read` is set."""

    service: str = field(default_factory=lambda: f"st{uuid.uuid4().hex[:8]}")
    read: asyncio.Event = field(default_factory=asyncio.Event)
    accepted: int = 0
    ended: int = 0  # connections read to their end (EOF or a reset) once `read` was set


@pytest_asyncio.fixture
async def stalled_upstream(redis_client: aioredis.Redis) -> AsyncIterator[StalledUpstream]:
    upstream = StalledUpstream()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream.accepted += 1
        writer.write(await handshake_answer(reader))
        await upstream.read.wait()
        try:
            while await reader.read(1 << 20):
                pass
        except ConnectionError:
            pass
        upstream.ended += 1
        writer.transport.abort()

    port = free_port()
    server = await asyncio.start_server(handler, "127.0.0.1", port)
    registry = Registry(redis_client, ttl=60)
    record = InstanceRecord(upstream.service, "stalled", kind="ws", address=f"127.0.0.1:{port}")
    await registry.heartbeat(record)
    try:
        yield upstream
    finally:
        upstream.read.set()
        await registry.deregister(upstream.service, "stalled")
        server.close()


async def flood_until_stalled(raw: RawClient) -> None:
    """Send 60 KB binary frames until they are no longer read (every buffer on the way full)."""
    data = frame(Opcode.BINARY, b"q" * 60_000)
    while True:
        raw.writer.write(data)
        try:
            await asyncio.wait_for(raw.writer.drain(), 0.5)
        except TimeoutError:
            return


async def test_a_client_leaving_an_upstream_that_stopped_reading_frees_its_slot(
    make_ws_server: Any, stalled_upstream: StalledUpstream
) -> None:
    # The client's FIN is not seen (reading it is paused for the upstream): the stall is.
    server = make_ws_server(WS_MAX_CONNECTIONS="1", WS_RELAY_SEND_TIMEOUT="1")
    closed = LogWatch(server, "connection closed")

    async def relayed() -> RawClient | None:
        accepted = stalled_upstream.accepted
        raw = await open_raw(server, f"/ws/proxy/{stalled_upstream.service}/x")
        answer = asyncio.ensure_future(raw.reader.read(1))
        await wait_for_async(lambda: answer.done() or stalled_upstream.accepted > accepted)
        if answer.done():  # 1014: the registry view does not have it yet
            raw.writer.transport.abort()
            return None
        answer.cancel()
        return raw

    raw = await wait_for_async(relayed, timeout=30)  # once the registry view has it
    await flood_until_stalled(raw)
    raw.writer.close()  # the client goes away (a FIN, behind what the relay did not read)

    await wait_for_async(lambda: server.health()["connections"] == 0, timeout=10)
    async with server.connect("/ws") as ws:  # the slot is free
        await ws.send("ping")
        assert await asyncio.wait_for(ws.recv(), 5) == "pong"
    assert [(r["code"], r["reason"]) for r in await closed.wait(1)] == [
        (1014, "upstream stopped reading")
    ]
    stalled_upstream.read.set()  # the service closed its connection: it reads to the end
    await wait_for_async(lambda: stalled_upstream.ended == 1, timeout=10)


async def test_a_client_that_stops_reading_is_cut_and_the_upstream_gets_1001(
    make_ws_server: Any, local_upstream: LocalUpstream
) -> None:
    server = make_ws_server(WS_RELAY_SEND_TIMEOUT="1")
    closed = LogWatch(server, "connection closed")
    await reach(server, local_upstream)
    local_upstream.flood = 64 * 1024 * 1024
    async with server.connect(f"/ws/proxy/{local_upstream.service}/", max_size=None,
                              ping_interval=None, close_timeout=1) as ws:  # fmt: skip
        ws.transport.pause_reading()  # the client reads nothing, and stays connected
        await wait_for_async(lambda: server.health()["connections"] == 0, timeout=10)
    upstream = local_upstream.connections[-1]
    await asyncio.wait_for(upstream.wait_closed(), 10)
    assert upstream.close_code == 1001 and upstream.close_reason == "client went away"
    assert local_upstream.sent < local_upstream.flood
    assert [(r["code"], r["reason"]) for r in await closed.wait(1)] == [
        (1006, "client stopped reading")
    ]
