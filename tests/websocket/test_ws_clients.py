"""`/ws` clients through a real websocket service: authentication (three ways, and by
API key), channel subscriptions fanned out from Redis. JSON-RPC: `test_ws_jsonrpc.py`."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid

import pytest
import redis.asyncio as aioredis
import websockets

from common import apikeys, constants, revocation
from tests.helpers import wait_for_async
from tests.support.raw_http import connect, exchange
from tests.websocket.conftest import LogWatch, WsServer, recv_json, upgrade_head

pytestmark = pytest.mark.timeout(120)


def closed_code(info: pytest.ExceptionInfo[websockets.ConnectionClosed]) -> tuple[int, str]:
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


# --- authentication --------------------------------------------------------------------


async def test_auth_by_header(ws_server: WsServer) -> None:
    async with ws_server.connect(additional_headers=ws_server.bearer()) as ws:
        await ws.send("ping")
        assert await ws.recv() == "pong"


async def test_auth_by_subprotocol(ws_server: WsServer) -> None:
    async with ws_server.connect(
        additional_headers={}, subprotocols=["bearer", ws_server.token()]
    ) as ws:
        assert ws.subprotocol == "bearer"
        await ws.send("ping")
        assert await ws.recv() == "pong"


@pytest.mark.parametrize("path", ["/ws", "/ws/stream"])
def test_bearer_is_selected_on_whichever_line_the_client_offers_it(
    ws_server: WsServer, path: str
) -> None:
    # Every `Sec-WebSocket-Protocol` line is one offer (`websocket.auth.offered_subprotocols`,
    # as authentication and the relay read it): `bearer` on a second line was not
    # selected, though it was on the first line's tail.
    selected = []
    for lines in (["chat, bearer"], ["chat", "bearer"]):
        offer = "".join(f"Sec-WebSocket-Protocol: {line}\r\n" for line in lines)
        credential = f"Authorization: Bearer {ws_server.token()}\r\n"
        head = f"{upgrade_head(path)}{credential}{offer}\r\n"
        with connect(ws_server.address) as sock:
            sock.sendall(head.encode())
            answer = b""
            while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
                answer += chunk
        status, *fields = answer.split(b"\r\n\r\n")[0].decode().split("\r\n")
        assert status.startswith("HTTP/1.1 101 "), (lines, answer)
        chosen = [f.split(":", 1)[1].strip() for f in fields
                  if f.lower().startswith("sec-websocket-protocol:")]  # fmt: skip
        selected.append(chosen)
    assert selected == [["bearer"], ["bearer"]]


async def test_auth_by_first_message(ws_server: WsServer) -> None:
    async with ws_server.connect(additional_headers={}) as ws:
        await ws.send(json.dumps({"type": "auth", "token": ws_server.token(), "id": 1}))
        answer = await recv_json(ws)
        assert answer["type"] == "authenticated" and answer["sub"] == "u1" and answer["id"] == 1
        await ws.send("ping")
        assert await ws.recv() == "pong"


@pytest.mark.parametrize("how", ["header", "subprotocol"])
async def test_bad_token_before_upgrade_is_401(ws_server: WsServer, how: str) -> None:
    forged = ws_server.token()[:-4] + "AAAA"
    kwargs = (
        {"additional_headers": {"Authorization": f"Bearer {forged}"}}
        if how == "header"
        else {"additional_headers": {}, "subprotocols": ["bearer", forged]}
    )
    with pytest.raises(websockets.InvalidStatus) as info:
        async with ws_server.connect(**kwargs):
            pass
    assert info.value.response.status_code == 401


@pytest.mark.parametrize(
    "first, reason",
    [
        ("ping", "authentication required"),
        (json.dumps({"type": "auth", "token": "not.a.jwt"}), "invalid token"),
        ("expired", "token expired"),
    ],
)
async def test_bad_first_message_closes_1008(ws_server: WsServer, first: str, reason: str):
    if first == "expired":
        first = json.dumps({"type": "auth", "token": ws_server.token(ttl=-10)})
    async with ws_server.connect(additional_headers={}) as ws:
        await ws.send(first)
        with pytest.raises(websockets.ConnectionClosed) as info:
            await recv_json(ws)
    code, got = closed_code(info)
    assert code == 1008 and got.startswith(reason)


def test_a_credential_of_undecodable_bytes_is_401(ws_server: WsServer) -> None:
    # Bytes that are not UTF-8 arrive as surrogates, which PyJWT could not encode: a 500.
    headers = [b"Authorization: Bearer \xff\xfe.abc.def", b"Authorization: Bearer eyJ\xed\xa0\x80",
               b"X-Api-Key: sbk_\xff", b"Authorization: Bearer sbk_\xc3\xa9"]  # fmt: skip
    for header, path in itertools.product(headers, ["/ws", "/ws/proxy/svc/x"]):
        answer = exchange(ws_server.address, upgrade_head(path).encode() + header + b"\r\n\r\n")
        error = json.loads(answer.body)["error"]
        assert (answer.status, error["code"]) == (401, "unauthorized"), (header, path)


async def test_a_token_with_a_lone_surrogate_is_an_invalid_token(ws_server: WsServer) -> None:
    # JSON can escape a lone surrogate, which PyJWT could not encode: the connection was
    # closed with 1011 and a traceback logged, whether it came first or as a renewal.
    failed = LogWatch(ws_server, "message handling failed")
    bad = '{"type": "auth", "token": "\\ud800", "id": 3}'
    async with ws_server.connect(additional_headers={}) as ws:
        await ws.send(bad)
        with pytest.raises(websockets.ConnectionClosed) as info:
            await recv_json(ws)
    # (Such a message is no JSON text: `common.codec.parse_json` refuses it first.)
    assert closed_code(info) == (1008, "authentication required")
    async with ws_server.connect() as ws:
        await ws.send(bad)
        assert (await recv_json(ws))["error"]["code"] == -32700  # parse error
        await ws.send("ping")  # the session goes on with its credential
        assert await ws.recv() == "pong"
    assert failed.new() == []


async def test_no_auth_within_the_timeout_closes_1008(ws_server: WsServer) -> None:
    async with ws_server.connect(additional_headers={}) as ws:  # WS_AUTH_TIMEOUT is 1 s
        with pytest.raises(websockets.ConnectionClosed) as info:
            await recv_json(ws, timeout=10)
    assert closed_code(info) == (1008, "authentication timed out")


async def test_session_closes_1008_when_its_token_expires(ws_server: WsServer) -> None:
    async with ws_server.connect(additional_headers=ws_server.bearer(ttl=2)) as ws:
        await ws.send("ping")
        assert await ws.recv() == "pong"
        with pytest.raises(websockets.ConnectionClosed) as info:
            await recv_json(ws, timeout=10)
    assert closed_code(info) == (1008, "token expired")


# --- subscriptions ---------------------------------------------------------------------


async def numsub(redis: aioredis.Redis, channel: str) -> int:
    counts = await redis.pubsub_numsub(constants.push_channel(channel))
    return int(counts[0][1])


async def subscribe(ws, channel: str) -> None:
    await ws.send(json.dumps({"type": "subscribe", "channel": channel}))
    assert await recv_json(ws) == {"type": "subscribed", "channel": channel}


async def test_200_clients_on_one_channel_all_receive_a_message(
    ws_server: WsServer, redis_client: aioredis.Redis
) -> None:
    channel = f"iptv:now:{uuid.uuid4().hex[:6]}"
    clients = [await ws_server.connect().__aenter__() for _ in range(200)]
    try:
        await asyncio.gather(*(subscribe(ws, channel) for ws in clients))
        assert await numsub(redis_client, channel) == 1  # one Redis subscription for all 200
        payload = {"channel_id": 7, "programme": {"title": "News"}}
        await redis_client.publish(constants.push_channel(channel), json.dumps(payload))
        received = await asyncio.gather(*(recv_json(ws) for ws in clients))
        assert all(m == {"type": "message", "channel": channel, "data": payload} for m in received)
    finally:
        await asyncio.gather(*(ws.close() for ws in clients))
    await wait_for_async(lambda: _zero(redis_client, channel), timeout=10)


async def _zero(redis: aioredis.Redis, channel: str) -> bool:
    return await numsub(redis, channel) == 0


async def test_unsubscribe_stops_delivery(ws_server: WsServer, redis_client: aioredis.Redis):
    a_channel, other = f"c{uuid.uuid4().hex[:6]}", f"c{uuid.uuid4().hex[:6]}"
    async with ws_server.connect() as stays, ws_server.connect() as leaves:
        for ws in (stays, leaves):
            await subscribe(ws, a_channel)
            await subscribe(ws, other)
        await leaves.send(json.dumps({"type": "unsubscribe", "channel": a_channel}))
        assert await recv_json(leaves) == {"type": "unsubscribed", "channel": a_channel}
        await redis_client.publish(constants.push_channel(a_channel), "plain text")
        assert (await recv_json(stays))["data"] == "plain text"
        # `leaves` gets the next message on the channel it kept, and nothing before it
        await redis_client.publish(constants.push_channel(other), "second")
        assert (await recv_json(leaves)) == {"type": "message", "channel": other, "data": "second"}
        assert (await recv_json(stays))["data"] == "second"
        assert await numsub(redis_client, a_channel) == 1  # `stays` still listens
        await stays.send(json.dumps({"type": "unsubscribe", "channel": a_channel}))
        await recv_json(stays)
        await wait_for_async(lambda: _zero(redis_client, a_channel), timeout=10)


def scoped(server: WsServer, *scopes: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token(scopes=scopes)}"}


async def refused_subscribe(ws, channel: str) -> None:
    await ws.send(json.dumps({"type": "subscribe", "channel": channel, "id": "s"}))
    answer = await recv_json(ws)
    assert (answer["type"], answer["id"], answer["error"]["code"]) == ("error", "s", "forbidden")
    assert channel in answer["error"]["message"]


async def test_subscribing_needs_a_scope_reaching_the_channels_service(
    ws_server: WsServer, redis_client: aioredis.Redis
) -> None:
    tag = uuid.uuid4().hex[:6]
    iptv, billing = f"iptv:now:{tag}", f"billing:{tag}"
    refused = LogWatch(ws_server, "message refused")
    async with ws_server.connect(additional_headers=scoped(ws_server, "iptv")) as ws:
        await subscribe(ws, iptv)
        await refused_subscribe(ws, billing)
        assert await numsub(redis_client, billing) == 0  # nothing subscribed in Redis
        await redis_client.publish(constants.push_channel(billing), "secret")
        await redis_client.publish(constants.push_channel(iptv), "public")
        assert await recv_json(ws) == {"type": "message", "channel": iptv, "data": "public"}
        await ws.send("ping")  # the session goes on
        assert await ws.recv() == "pong"
    assert [(r["code"], billing in r["message"]) for r in (await refused.wait(1))] == [
        ("forbidden", True)
    ]
    cases = [  # (scopes, reached, refused)
        (("iptv.get_channel",), [], [iptv]),  # a method scope never reaches a channel
        (("iptv.*", "billing.charge"), [iptv], [billing]),
        (("*",), [iptv, billing, f"c{tag}", f"News:{tag}"], [f"admin:{tag}", f"auth:{tag}"]),
        (("admin",), [f"admin:{tag}"], [iptv, f"News:{tag}"]),
        (("a.b",), [], [f"a.b:{tag}"]),  # not a service name: only "*" reaches it
    ]
    for scopes, reached, refused_channels in cases:
        async with ws_server.connect(additional_headers=scoped(ws_server, *scopes)) as ws:
            for channel in reached:
                await subscribe(ws, channel)
            for channel in refused_channels:
                await refused_subscribe(ws, channel)


async def test_a_renewal_leaves_the_channels_its_credential_does_not_reach(
    ws_server: WsServer, redis_client: aioredis.Redis
) -> None:
    tag = uuid.uuid4().hex[:6]
    iptv, billing = f"iptv:now:{tag}", f"billing:{tag}"
    async with ws_server.connect() as ws:  # scope "*"
        await subscribe(ws, iptv)
        await subscribe(ws, billing)
        narrower = ws_server.token(scopes=("iptv",))
        await ws.send(json.dumps({"type": "auth", "token": narrower, "id": 2}))
        left = {"type": "unsubscribed", "channel": billing, "reason": "forbidden"}
        assert await recv_json(ws) == left
        answer = await recv_json(ws)
        assert (answer["type"], answer["id"]) == ("authenticated", 2)
        await wait_for_async(lambda: _zero(redis_client, billing), timeout=10)
        await redis_client.publish(constants.push_channel(billing), "no longer yours")
        await redis_client.publish(constants.push_channel(iptv), "still yours")
        assert await recv_json(ws) == {"type": "message", "channel": iptv, "data": "still yours"}
        await refused_subscribe(ws, billing)
        await ws.send(json.dumps({"type": "unsubscribe", "channel": billing}))  # needs no scope
        assert await recv_json(ws) == {"type": "unsubscribed", "channel": billing}


# --- authentication by API key ---------------------------------------------------------


async def test_auth_by_api_key_until_it_is_revoked(
    ws_server: WsServer, redis_client: aioredis.Redis
) -> None:
    text, record = apikeys.new_key(str(uuid.uuid4()), "ws test", ["iptv"])
    await apikeys.write(redis_client, record)
    headers = {"Authorization": f"Bearer {text}"}
    async with ws_server.connect(additional_headers=headers) as ws:
        await ws.send("ping")
        assert await ws.recv() == "pong"
    await revocation.revoke(redis_client, f"key:{record.key_id}", time.time() + 60)

    async def refused() -> bool:
        try:
            async with ws_server.connect(additional_headers=headers):
                return False
        except websockets.InvalidStatus as exc:
            return exc.response.status_code == 401

    await wait_for_async(refused, timeout=10)
