"""Redis up but refusing writes under the websocket service: a JSON-RPC call is
answered -32001 (service unavailable) saying why, not -32603 with a traceback in the
log, and `/health` names the kind; all is well again once Redis takes writes. A
service started while Redis refuses comes up all the same, and loads what it could
not once Redis takes writes."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from common import constants, revocation
from common.embedded_redis import EmbeddedRedis
from tests.helpers import wait_for
from tests.support.redis_states import MESSAGES, STATES
from tests.websocket.conftest import WsServer, recv_json, start_ws_server

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("kind", ["out_of_memory", "read_only"])
async def test_a_redis_refusing_writes_is_service_unavailable_saying_why(kind: str) -> None:
    server = EmbeddedRedis().start()
    admin = redis.Redis(port=server.port)
    ws_server = start_ws_server(server.url)
    service = f"refused_{uuid.uuid4().hex[:8]}"
    seconds, _ = admin.time()  # an instance live for an hour (no worker): calls get enqueued
    admin.zadd(constants.instances_key(service), {"fake": (seconds + 3600) * 1000})
    try:
        async with ws_server.connect() as ws:
            with STATES[kind](admin):
                call = {"jsonrpc": "2.0", "id": 1, "method": f"{service}.m", "params": {}}
                await ws.send(json.dumps(call))
                answer = await recv_json(ws)
                assert answer["error"] == {"code": -32001, "message": MESSAGES[kind]}
                assert ws_server.health()["redis"] == {"ok": False, "error": kind}
            wait_for(lambda: ws_server.health()["status"] == "ok", timeout=15)
        assert ws_server.proc.log_records("call failed") == []
        assert len(ws_server.proc.log_records("rpc error")) == 1
    finally:
        ws_server.proc.stop()
        admin.close()
        server.stop()


async def test_the_service_starts_on_a_fresh_redis_out_of_memory() -> None:
    """The first signing key cannot be written: the service comes up all the same,
    `/health` saying why and the keys' loop logging it once; once Redis takes writes
    the loop creates the key (retrying every half second meanwhile) and a token signed
    with it is accepted. (`tests/common/test_start_redis_refusals.py` has every kind.)"""
    server = EmbeddedRedis().start()
    admin = redis.Redis(port=server.port)
    ws_server: WsServer | None = None
    try:
        with STATES["out_of_memory"](admin):
            ws_server = start_ws_server(server.url, status="degraded")
            assert ws_server.health()["redis"] == {"ok": False, "error": "out_of_memory"}
        log = ws_server.proc
        wait_for(lambda: log.log_records("signing keys resynced"), timeout=10)
        async with ws_server.connect(additional_headers={}) as ws:
            await ws.send(json.dumps({"type": "auth", "token": ws_server.token()}))
            assert (await recv_json(ws))["type"] == "authenticated"
        assert ws_server.health()["status"] == "ok"
        failed = log.log_records("signing keys resync failed")
        assert [(r["kind"], r["at"]) for r in failed] == [("out_of_memory", "start")]
        assert "Traceback" not in log.log_path.read_text()
    finally:
        if ws_server is not None:
            ws_server.proc.stop()
        admin.close()
        server.stop()


async def test_a_subscribe_redis_refuses_is_an_error_frame_and_the_session_goes_on() -> None:
    """A Redis ACL user whose pub/sub channels leave out some push channels: Redis
    answers their SUBSCRIBE with NOPERM. The client was told `subscribed` and got
    nothing, ever (the reply reached the hub's reader, logged as a failure of its
    own), and the hub kept the channel: a later subscriber was told `subscribed` at
    once. Now that subscribe is refused with an error frame, nothing of it is kept,
    and the session goes on."""
    channels = (constants.REGISTRY_EVENTS, constants.POLICY_CHANNEL, revocation.CHANNEL,
                constants.push_channel("open:*"))  # fmt: skip
    acl = ["--user", "default", "on", "nopass", "~*", "resetchannels",
           *(f"&{c}" for c in channels), "+@all"]  # fmt: skip
    server = EmbeddedRedis(extra_args=acl).start()
    admin = redis.Redis(port=server.port)
    ws_server = start_ws_server(server.url)
    subscribe = {"type": "subscribe", "channel": "closed:1", "id": 1}
    try:
        for _ in range(2):  # (the second: nothing of the first was kept)
            async with ws_server.connect() as ws:
                await ws.send(json.dumps(subscribe))
                answer = await recv_json(ws)
                assert answer["error"]["code"] == "subscribe_refused", answer
                assert "closed:1" in answer["error"]["message"]
                await ws.send(json.dumps({"type": "subscribe", "channel": "open:1", "id": 2}))
                assert await recv_json(ws) == {"type": "subscribed", "channel": "open:1", "id": 2}
                admin.publish(constants.push_channel("open:1"), "news")
                assert (await recv_json(ws))["data"] == "news"
        assert ws_server.proc.log_records("message handling failed") == []
        assert ws_server.proc.log_records("push channel reader failed") == []
    finally:
        ws_server.proc.stop()
        admin.close()
        server.stop()
