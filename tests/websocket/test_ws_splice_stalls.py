"""`/ws/proxy/...` when one end stops reading (`websocket.splice`, "Stalls"): the end that
reads nothing for `WS_RELAY_SEND_TIMEOUT` is cut, the other told, the slot freed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from websockets.frames import Opcode

from tests.helpers import wait_for_async
from tests.websocket.conftest import LogWatch
from tests.websocket.splice_support import (  # noqa: F401 (the *_fixture one)
    LocalUpstream,
    RawClient,
    frame,
    handshake_answer,
    local_upstream_fixture,
    open_raw,
    raw_upstream,
    reach,
)

pytestmark = pytest.mark.timeout(120)


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

    async with raw_upstream(redis_client, upstream.service, handler):
        try:
            yield upstream
        finally:
            upstream.read.set()


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
