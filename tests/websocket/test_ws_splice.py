"""`/ws/proxy/...` as a byte splice (`websocket.splice`), through real processes: frames split
across reads, fragmented messages, pings end to end, a vanishing client, backpressure, the
close handshakes and the drain."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
import websockets
from websockets.frames import Close, Opcode

from tests.helpers import wait_for_async
from tests.support.ws_relay import one_instance
from tests.websocket.conftest import (
    Backends,
    WsServer,
    last_close,
    recv_json,
    wait_upstream_closed,
)
from tests.websocket.splice_support import (  # noqa: F401 (the *_fixture ones)
    UPSTREAM_CLOSE,
    LocalUpstream,
    frame,
    handshake_answer,
    local_upstream_fixture,
    open_raw,
    raw_client_fixture,
    raw_upstream,
    reach,
)
from websocket.splice import CLOSE_TIMEOUT

pytestmark = pytest.mark.timeout(120)


async def test_a_large_message_in_small_reads_and_fragments_pass_as_they_are(
    ws_server: WsServer, backends: Backends, raw_client: Any
) -> None:
    await one_instance(ws_server, backends)
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
    await one_instance(ws_server, backends)
    raw = await raw_client(f"/ws/proxy/{backends.service}/echo")
    await raw.send(frame(Opcode.TEXT, b"hi"))
    assert (await raw.recv()).data == b"hi"
    raw.writer.transport.abort()  # no close frame, a TCP reset

    await wait_upstream_closed(ws_server, backends.service, [1001, "client went away"])


async def test_an_oversized_fragmented_message_closes_1009_and_the_upstream_1001(
    ws_server: WsServer, backends: Backends, raw_client: Any
) -> None:
    await one_instance(ws_server, backends)
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
    await one_instance(server, backends)
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
    await one_instance(ws_server, backends)
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
    await one_instance(server, backends)
    async with server.connect(f"/ws/proxy/{backends.service}/echo") as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(websockets.ConnectionClosed) as info:
            await recv_json(ws, timeout=10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001

    await wait_upstream_closed(ws_server, backends.service, [1001, "server shutting down"])


# --- an upstream in this process, for what the echo backend cannot show ---------------------


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
