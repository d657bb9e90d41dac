"""A revoked credential ends the connections open with it (`Connections.revoked`).

A logout, a reused refresh token, `/admin/revoke`, a deleted API key: each publishes a
revocation (`common.revocation.revoke`), and every connection whose credential it
names is closed with 1008: a `/ws` session, an envelope-mode connection, a spliced
relay. Connections of other credentials stay open.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis
import websockets

from common import apikeys
from common.revocation import revoke
from tests.helpers import issue_api_key
from tests.support.ws_relay import one_instance
from tests.websocket.conftest import (
    Backends,
    LogWatch,
    WsServer,
    recv_json,
)

pytestmark = pytest.mark.timeout(60)


def _claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


async def _closed_with(ws: Any) -> tuple[int, str]:
    with pytest.raises(websockets.ConnectionClosed) as info:
        while True:
            await recv_json(ws, timeout=10)
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


async def _alive(ws: Any) -> bool:
    await ws.send("ping")
    return bool(await ws.recv() == "pong")


@pytest.mark.parametrize("kind", ["sid", "jti", "user"])
async def test_a_revoked_token_closes_its_ws_session(
    ws_server: WsServer, redis_client: aioredis.Redis, kind: str
) -> None:
    token, bystander = ws_server.token(sub="revoked-user"), ws_server.token(sub="another-user")
    claims = _claims(token)
    ident = {"sid": claims["sid"], "jti": claims["jti"], "user": claims["sub"]}[kind]
    closed = LogWatch(ws_server, "connection closed")
    async with (
        ws_server.connect(additional_headers={"Authorization": f"Bearer {token}"}) as ws,
        ws_server.connect(additional_headers={"Authorization": f"Bearer {bystander}"}) as other,
    ):
        assert await _alive(ws)
        await revoke(redis_client, f"{kind}:{ident}", time.time() + 60)
        assert await _closed_with(ws) == (1008, "credential revoked")
        assert await _alive(other)  # another credential's connection stays
    assert [r["code"] for r in await closed.wait(1)] == [1008]


async def test_a_session_authenticated_by_its_first_message_is_closed_too(
    ws_server: WsServer, redis_client: aioredis.Redis
) -> None:
    token = ws_server.token()
    async with ws_server.connect(additional_headers={}) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token}))
        assert (await recv_json(ws))["type"] == "authenticated"
        await revoke(redis_client, f"sid:{_claims(token)['sid']}", time.time() + 60)
        assert await _closed_with(ws) == (1008, "credential revoked")


async def test_a_deleted_api_key_closes_its_relay_and_envelope_connections(
    ws_server: WsServer, backends: Backends, redis_client: aioredis.Redis
) -> None:
    await one_instance(ws_server, backends)
    key = issue_api_key(backends.redis_url, ["*"], name="revoked-key")
    parsed = apikeys.parse_key(key)
    assert parsed is not None
    headers = {"X-Api-Key": key}
    relay_path = f"/ws/proxy/{backends.service}/echo"
    async with (
        ws_server.connect(relay_path, additional_headers=headers) as relay,
        ws_server.connect("/ws/stream", additional_headers=headers) as stream,
        ws_server.connect(relay_path) as bystander,  # a token's relay
    ):
        await relay.send("spliced?")
        assert await relay.recv() == "spliced?"
        await revoke(redis_client, f"key:{parsed[0]}", time.time() + 60)
        assert await _closed_with(relay) == (1008, "credential revoked")
        assert await _closed_with(stream) == (1008, "credential revoked")
        await bystander.send("still here")
        assert await bystander.recv() == "still here"
