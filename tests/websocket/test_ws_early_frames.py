"""Frames sent without waiting for the handshake's answer (RFC 6455 allows a client to send
them right after its upgrade request): in the same write as the upgrade request, and
from an upstream in the same write as its 101. None may be lost, on any route."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import websockets
from websockets.frames import Close, Opcode

from tests.helpers import wait_for_async
from tests.support.ws_relay import service_fixture  # noqa: F401 (a fixture)
from tests.websocket.conftest import LogWatch, WsServer
from tests.websocket.splice_support import (
    UPSTREAM_CLOSE,
    RawClient,
    frame,
    handshake_answer,
    open_raw,
    raw_upstream,
    server_frame,
)

pytestmark = pytest.mark.timeout(60)


def text(message: str) -> bytes:
    return frame(Opcode.TEXT, message.encode())


async def recv_text(raw: RawClient) -> str:
    received = await raw.recv()
    assert received.opcode is Opcode.TEXT, received
    return received.data.decode()


async def test_a_frame_in_the_upgrade_requests_write_reaches_the_envelope_stream(
    ws_server: WsServer,
) -> None:
    raw = await open_raw(ws_server, "/ws/stream", text("not json"))
    try:
        answer = json.loads(await recv_text(raw))
        assert answer == {"ret": 1, "flag": 1, "result": "Invalid JSON format"}
        # Half a frame with the upgrade, the rest later: read in order, as one frame.
        second = text("[]")
        raw2 = await open_raw(ws_server, "/ws/stream", second[:3])
        try:
            await raw2.send(second[3:] + text("{"))
            for _ in range(2):
                assert json.loads(await recv_text(raw2))["result"] == "Invalid JSON format"
        finally:
            raw2.writer.transport.abort()
    finally:
        raw.writer.transport.abort()


async def test_more_than_sanics_buffer_in_the_upgrade_requests_write_is_all_read(
    ws_server: WsServer,
) -> None:
    # Over 64 KiB past the head (Sanic's REQUEST_BUFFER_SIZE): Sanic stops reading the
    # socket until it parses its buffer, which it no longer does once upgraded. (Pings,
    # then part of a message: no complete message, whose reading would resume it.)
    pings = frame(Opcode.PING, b"") * 11_000  # (pongs under the write mark)
    message = text("not json")
    raw = await open_raw(ws_server, "/ws/stream", pings + message[:4])
    try:
        await raw.send(message[4:])
        pongs = 0
        while (answer := await raw.recv()).opcode is Opcode.PONG:
            pongs += 1
        assert json.loads(answer.data)["result"] == "Invalid JSON format"
        assert pongs == 11_000
    finally:
        raw.writer.transport.abort()


async def test_a_frame_in_the_upgrade_requests_write_reaches_a_ws_client_session(
    ws_server: WsServer,
) -> None:
    auth = json.dumps({"type": "auth", "token": ws_server.token(), "id": 7})
    raw = await open_raw(ws_server, "/ws", text(auth), authenticated=False)
    try:
        answer = json.loads(await recv_text(raw))
        assert (answer["type"], answer["id"]) == ("authenticated", 7)
    finally:
        raw.writer.transport.abort()


async def test_frames_in_the_upgrade_requests_write_reach_a_relays_upstream(
    ws_server: WsServer, service: str
) -> None:
    raw = await open_raw(ws_server, f"/ws/proxy/{service}/echo", text("one") + text("two"))
    try:
        assert [await recv_text(raw) for _ in range(2)] == ["one", "two"]
        await raw.send(text("three"))
        assert await recv_text(raw) == "three"
    finally:
        raw.writer.transport.abort()


# What `eager_upstream` gives: the frames its 101 is written with -> the service's name.
Eager = Callable[[bytes], Awaitable[str]]


@pytest_asyncio.fixture
async def eager_upstream(redis_client: aioredis.Redis, ws_server: WsServer) -> AsyncIterator[Eager]:
    """A hand-written upstream that writes its 101 and the bytes given (frames) in one
    write, then closes its connection once it reads anything more (the client's close,
    or the relay's answer to its own); a factory: the bytes -> the service's name, once
    `ws_server` relays to it."""
    after_101: list[bytes] = [b""]

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await handshake_answer(reader) + after_101[0])
        with contextlib.suppress(ConnectionError):
            await reader.read(65536)
        writer.close()

    service = f"ea{uuid.uuid4().hex[:8]}"

    async def reached() -> bool:
        raw = await open_raw(ws_server, f"/ws/proxy/{service}/")  # (asserts a 101)
        raw.writer.transport.abort()
        return True

    async def with_frames(data: bytes) -> str:
        after_101[0] = data
        await wait_for_async(reached, timeout=30)  # once the registry view has it
        return service

    async with raw_upstream(redis_client, service, upstream):
        yield with_frames


async def test_a_frame_in_the_upstreams_101_write_reaches_the_client(
    ws_server: WsServer, eager_upstream: Eager
) -> None:
    # Spliced: the frame follows the handshake response in the relay's first read.
    service = await eager_upstream(server_frame(Opcode.TEXT, b"hello first"))

    async def greeted() -> bool:
        async with ws_server.connect(f"/ws/proxy/{service}/") as ws:
            return bool(await asyncio.wait_for(ws.recv(), 5) == "hello first")

    for _ in range(3):
        assert await greeted()


async def test_a_frame_and_a_close_in_the_upstreams_101_write_reach_the_client(
    ws_server: WsServer, eager_upstream: Eager
) -> None:
    # With the close in the same read the relay pumps frames (no splice): the frame first.
    # (`websockets` parses both before the relay can take over: `Splice.take_over`.)
    service = await eager_upstream(server_frame(Opcode.TEXT, b"last words") + UPSTREAM_CLOSE)
    closed = LogWatch(ws_server, "connection closed")

    async def heard() -> bool:
        async with ws_server.connect(f"/ws/proxy/{service}/") as ws:
            first = await asyncio.wait_for(ws.recv(), 5)
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 4005
        return bool(first == "last words")

    for _ in range(3):
        assert await heard()
    # The upstream's closes are not logged as the service's own: a close of its own
    # after them (1008, a client that does not authenticate) tells they were not.
    async with ws_server.connect("/ws", additional_headers={}) as ws:
        await ws.send("ping")
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert [r["code"] for r in await closed.wait(1)] == [1008]


async def test_a_close_in_the_upgrade_requests_write_is_read_when_the_relay_pumps(
    ws_server: WsServer, eager_upstream: Eager
) -> None:
    # An upstream closing in its 101's write makes the relay pump frames (no splice):
    # what the client sent with its upgrade is then Sanic's to read (`untap`), its
    # close too, which Sanic answers (with its code) as soon as it reads it.
    service = await eager_upstream(UPSTREAM_CLOSE)

    async def answered() -> int:
        early = frame(Opcode.CLOSE, Close(1000, "done early").serialize())
        raw = await open_raw(ws_server, f"/ws/proxy/{service}/", early)
        try:
            answer = await raw.recv()
        finally:
            raw.writer.transport.abort()
        assert answer.opcode is Opcode.CLOSE
        return Close.parse(answer.data).code

    assert [await answered() for _ in range(3)] == [1000] * 3
