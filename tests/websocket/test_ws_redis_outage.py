"""Redis stopped and restarted under the websocket service (design §10: an outage is
reported and recovered from without restarting anything).

Open connections stay open; what needs Redis now (a new subscription, an API key not
cached here) gets a clear answer instead of silence or a 500; after the restart a
subscription really subscribes, and a channel left during the outage (unsubscribed,
or its connection closed) is not subscribed again, though nothing is published on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import websockets

from common import constants
from common.embedded_redis import EmbeddedRedis
from common.log_budget import LOGGED_PER_WINDOW
from tests.helpers import issue_api_key, wait_for, wait_for_async
from tests.websocket.conftest import LogWatch, recv_json, start_ws_server

pytestmark = pytest.mark.timeout(180)


async def test_push_channels_and_credentials_through_a_redis_restart(tmp_path: Path) -> None:
    server = EmbeddedRedis(appendonly=True, data_dir=tmp_path).start()
    port, url = server.port, server.url
    ws_server = start_ws_server(url)
    uncached = issue_api_key(url, ["*"])  # never shown to the service before the outage
    failed = LogWatch(ws_server, "message failed")
    summary = LogWatch(ws_server, "message failures not logged")
    try:
        async with ws_server.connect() as ws, ws_server.connect() as other:
            gone = await ws_server.connect()
            for conn, channel in ((ws, "kept"), (other, "left"), (gone, "gone")):
                await conn.send(json.dumps({"type": "subscribe", "channel": channel}))
                assert (await recv_json(conn))["type"] == "subscribed"

            server.stop(keep_data=True)
            wait_for(lambda: ws_server.health()["status"] == "degraded", timeout=15)
            # Public: the kind of failure, not redis-py's text naming Redis's address.
            assert ws_server.health()["redis"] == {"ok": False, "error": "unreachable"}
            # A subscription cannot be made: said so, not left unanswered.
            await ws.send(json.dumps({"type": "subscribe", "channel": "new", "id": 1}))
            answer = await recv_json(ws)
            assert (answer["id"], answer["error"]["code"]) == (1, "service_unavailable")
            # The kind, not redis-py's text (it named Redis's address).
            assert answer["error"]["message"] == "push channels unavailable: redis unreachable"
            # Each is a warning, within the connection's bound: a client retrying in a
            # loop wrote one line per subscribe (`websocket.errors.RefusalLog.failed`).
            for _ in range(LOGGED_PER_WINDOW + 5):
                await ws.send(json.dumps({"type": "subscribe", "channel": "new", "id": 1}))
                assert (await recv_json(ws))["error"]["code"] == "service_unavailable"
            assert len(failed.new()) == LOGGED_PER_WINDOW
            # Leaving works locally (the UNSUBSCRIBE cannot reach Redis), and so does
            # closing.
            await other.send(json.dumps({"type": "unsubscribe", "channel": "left"}))
            assert (await recv_json(other))["type"] == "unsubscribed"
            await gone.close()
            # An API key this service has not checked yet: 503 before the upgrade, and
            # 1013 (try again later) when it comes as the first message.
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with ws_server.connect(additional_headers={"X-API-Key": uncached}):
                    pass
            assert refused.value.response.status_code == 503
            async with ws_server.connect(additional_headers={}) as late:
                await late.send(json.dumps({"type": "auth", "token": uncached}))
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await recv_json(late)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013

            server = EmbeddedRedis(port=port, appendonly=True, data_dir=tmp_path).start()
            wait_for(lambda: ws_server.health()["status"] == "ok", timeout=30)
            redis = aioredis.Redis.from_url(url)
            try:
                # The retried subscription is made in Redis: its messages arrive.
                await ws.send(json.dumps({"type": "subscribe", "channel": "new", "id": 2}))
                assert await recv_json(ws) == {"type": "subscribed", "channel": "new", "id": 2}
                await redis.publish(constants.push_channel("new"), json.dumps({"n": 1}))
                assert (await recv_json(ws))["data"] == {"n": 1}

                # The channel kept through the outage delivers again (redis-py resubscribed).
                async def delivered() -> bool:
                    await redis.publish(constants.push_channel("kept"), "hello")
                    return bool((await recv_json(ws, timeout=1))["data"] == "hello")

                await wait_for_async(delivered, timeout=15)

                # The ones left during the outage were not subscribed again by that
                # reconnect, though nothing is published on them.
                left = [constants.push_channel(channel) for channel in ("left", "gone")]
                assert [count for _, count in await redis.pubsub_numsub(*left)] == [0, 0]
            finally:
                await redis.aclose()
        assert ws_server.proc.log_records("unhandled error") == []
        assert len(ws_server.proc.log_records("push channel connection lost")) == 1
        [counted] = await summary.wait(1)  # at the connection's end
        assert (counted["path"], counted["count"]) == ("/ws", 6)
        assert len(failed.new()) == LOGGED_PER_WINDOW
    finally:
        ws_server.proc.stop()
        server.stop()
