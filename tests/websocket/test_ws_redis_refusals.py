"""Redis up but refusing writes under the websocket service: a JSON-RPC call is
answered -32001 (service unavailable) saying why, not -32603 with a traceback in the
log, and `/health` names the kind; all is well again once Redis takes writes."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from common import constants
from common.embedded_redis import EmbeddedRedis
from tests.helpers import wait_for
from tests.support.redis_states import MESSAGES, STATES
from tests.websocket.conftest import recv_json, start_ws_server

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
