"""End to end: the iptv worker's "now playing" announcements reach a browser-like
client subscribed on `/ws`, through Redis pub/sub and the websocket service."""

from __future__ import annotations

import json

import pytest
import redis

from tests.helpers import ServiceProcess, db_url
from tests.websocket.conftest import recv_json, start_ws_server

pytestmark = pytest.mark.timeout(120)


async def test_the_iptv_worker_pushes_now_playing_to_a_subscribed_client(redis_url: str) -> None:
    url = db_url(redis_url, 11)
    redis.Redis.from_url(url).flushdb()  # a fresh catalog: its first check announces all
    server = start_ws_server(url)
    worker: ServiceProcess | None = None
    try:
        async with server.connect() as ws:
            channel = "iptv:now:1"
            await ws.send(json.dumps({"type": "subscribe", "channel": channel}))
            assert await recv_json(ws) == {"type": "subscribed", "channel": channel}
            worker = ServiceProcess(
                ["python", "-m", "microservices.iptv"],
                env={"REDIS_URL": url, "IPTV_CHANNELS": "5", "IPTV_NOW_INTERVAL": "0.5"},
                name="iptv",
            ).start()
            pushed = await recv_json(ws, timeout=60)
        assert pushed["type"] == "message" and pushed["channel"] == channel
        assert pushed["data"]["channel_id"] == 1
        assert pushed["data"]["programme"]["title"]
    finally:
        if worker is not None:
            worker.stop()
        server.proc.stop()
        redis.Redis.from_url(url).flushdb()
