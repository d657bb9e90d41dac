"""The WebSocket service's first cut, through a real server process."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import websockets

from tests.helpers import ServiceProcess, free_port, wait_for


@pytest.fixture(scope="module")
def ws_base(redis_url: str) -> Iterator[str]:
    port = free_port()
    proc = ServiceProcess(
        ["python", "-m", "websocket"],
        env={"REDIS_URL": redis_url, "WEBSOCKET_PORT": str(port)},
        name="websocket",
    ).start()
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200, 30)
        yield f"127.0.0.1:{port}"
    finally:
        proc.stop()


def test_health(ws_base: str) -> None:
    assert httpx.get(f"http://{ws_base}/health").json() == {"status": "ok", "redis": {"ok": True}}


async def test_ping_pong(ws_base: str) -> None:
    async with websockets.connect(f"ws://{ws_base}/ws") as ws:
        await ws.send("ping")
        assert await ws.recv() == "pong"
        await ws.send(json.dumps({"type": "ping", "id": 7}))
        assert json.loads(await ws.recv()) == {"type": "pong", "id": 7}


async def test_bad_messages_get_errors_not_disconnects(ws_base: str) -> None:
    async with websockets.connect(f"ws://{ws_base}/ws") as ws:
        await ws.send("{not json")
        assert json.loads(await ws.recv())["error"]["code"] == "malformed_json"
        await ws.send(json.dumps({"type": "dance"}))
        assert json.loads(await ws.recv())["error"]["code"] == "unknown_type"
        await ws.send("ping")
        assert await ws.recv() == "pong"


async def test_oversized_frame_closes_1009(ws_base: str) -> None:
    async with websockets.connect(f"ws://{ws_base}/ws", max_size=None) as ws:
        await ws.send("x" * (256 * 1024))
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
