"""`/ws/stream` (envelope mode) when its client leaves mid-stream: the upstream connection
is closed, whichever way the client leaves (a close frame, or its socket closed)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.server import ServerConnection, serve

from common.instance_record import InstanceRecord
from common.registry import Registry
from tests.helpers import free_port, wait_for_async
from tests.websocket.conftest import WsServer, recv_json
from tests.websocket.splice_support import open_raw

pytestmark = pytest.mark.timeout(60)

FRAME = json.dumps({"ret": 0, "flag": 0, "result": "z" * 2000})  # never the last one


@dataclass
class EndlessUpstream:
    """Answers every envelope request with frames that never end the stream."""

    service: str = field(default_factory=lambda: f"en{uuid.uuid4().hex[:8]}")
    streaming: int = 0  # connections still open (the handler returns once its connection ends)
    served: int = 0
    connections: set[ServerConnection] = field(default_factory=set)
    closes: list[tuple[int, str] | None] = field(default_factory=list)  # received, in order


@pytest_asyncio.fixture
async def endless(redis_client: aioredis.Redis) -> AsyncIterator[EndlessUpstream]:
    upstream = EndlessUpstream()

    async def handler(ws: ServerConnection) -> None:
        upstream.streaming += 1
        upstream.served += 1
        upstream.connections.add(ws)
        try:
            await ws.recv()
            while True:
                await ws.send(FRAME)
        except websockets.ConnectionClosed:
            pass
        finally:
            rcvd = ws.protocol.close_rcvd
            upstream.closes.append(None if rcvd is None else (rcvd.code, rcvd.reason))
            upstream.streaming -= 1
            upstream.connections.discard(ws)

    port = free_port()
    registry = Registry(redis_client, ttl=60)
    record = InstanceRecord(upstream.service, "endless", kind="ws", address=f"127.0.0.1:{port}")
    async with serve(handler, "127.0.0.1", port, compression=None, ping_interval=None):
        await registry.heartbeat(record)
        try:
            yield upstream
        finally:
            await registry.deregister(upstream.service, "endless")
            for ws in upstream.connections:  # what the service left open (or the exit waits)
                ws.transport.abort()


async def first_frames(ws: websockets.ClientConnection, service: str, count: int) -> None:
    await ws.send(json.dumps({"service_name": service}))
    for _ in range(count):
        assert (await recv_json(ws))["flag"] == 0


async def reach(server: WsServer, upstream: EndlessUpstream) -> None:
    """Wait until the registry view has `upstream` (a stream starts)."""

    async def streams() -> bool:
        # close_timeout: a client that stops reading sees the answer to its close only
        # after the frames queued before it, which it does not read: it waits that long.
        async with server.connect("/ws/stream", close_timeout=1) as ws:
            await first_frames(ws, upstream.service, 1)
        return True

    await wait_for_async(streams, timeout=30)


async def all_upstream_connections_closed(upstream: EndlessUpstream) -> None:
    # Within the splice's CLOSE_TIMEOUT (2 s) and then some, well before websockets'
    # own close timeout (10 s), which the service does not rely on.
    await wait_for_async(lambda: upstream.streaming == 0, timeout=6)


async def test_a_client_leaving_with_a_close_frame_closes_the_upstream(
    ws_server: WsServer, endless: EndlessUpstream
) -> None:
    await reach(ws_server, endless)
    for _ in range(3):
        async with ws_server.connect("/ws/stream", close_timeout=1) as ws:
            await first_frames(ws, endless.service, 3)
    await all_upstream_connections_closed(endless)
    assert endless.served == 4
    # a close handshake, not an abort: the frames in flight were read and dropped
    assert endless.closes == [(1001, "client went away")] * 4
    assert ws_server.health()["connections"] == 0


async def test_a_client_closing_its_socket_mid_stream_closes_the_upstream(
    ws_server: WsServer, endless: EndlessUpstream
) -> None:
    await reach(ws_server, endless)
    payload = json.dumps({"service_name": endless.service}).encode()
    for _ in range(3):
        client = await open_raw(ws_server, "/ws/stream")
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await client.send(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        await client.recv()  # the stream has started; the client reads no more
        client.writer.close()  # no close frame (unread data: a reset)
    await all_upstream_connections_closed(endless)
    assert endless.closes == [(1001, "client went away")] * 4
    assert ws_server.health()["connections"] == 0
