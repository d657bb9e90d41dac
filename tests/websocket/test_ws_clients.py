"""`/ws` clients through a real websocket service: authentication (three ways),
channel subscriptions fanned out from Redis, JSON-RPC onto a real RPC worker."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.client import ClientConnection

from common import apikeys, constants, revocation
from common.settings import MIN_PAYLOAD_LIMIT
from tests.helpers import wait_for_async
from tests.support.calc_service import start_worker
from tests.support.raw_http import connect, read_answers
from tests.websocket.conftest import LogWatch, WsServer, recv_json

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
        head = (f"GET {path} HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {ws_server.token()}\r\n"
                f"{offer}\r\n")  # fmt: skip
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
        head = (f"GET {path} HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n")  # fmt: skip
        with connect(ws_server.address) as sock:
            sock.sendall(head.encode() + header + b"\r\n\r\n")
            answer = read_answers(sock, 1)[0]
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


# --- JSON-RPC ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calc(redis_url: str) -> Iterator[None]:
    proc = start_worker(redis_url)
    try:
        yield
    finally:
        proc.stop()


async def rpc(ws, request: object) -> dict[str, object]:
    await ws.send(json.dumps(request))
    answer: dict[str, object] = await recv_json(ws)
    return answer


async def test_jsonrpc_call_and_errors(ws_server: WsServer, calc: None) -> None:
    async with ws_server.connect() as ws:

        async def add() -> bool:
            call = {"jsonrpc": "2.0", "id": 1, "method": "calc.add", "params": {"a": 2, "b": 3}}
            return await rpc(ws, call) == {"jsonrpc": "2.0", "id": 1, "result": 5}

        await wait_for_async(add, timeout=30)  # the worker may still be starting
    # A new connection: the one that waited may have spent its logged refusals
    # (`websocket.errors.RefusalLog`) on calls made before the worker was up.
    async with ws_server.connect() as ws:
        positional = await rpc(ws, {"jsonrpc": "2.0", "id": "p", "method": "calc.add",
                                    "params": [40, 2]})  # fmt: skip
        assert positional["result"] == 42
        cases = [
            ({"jsonrpc": "2.0", "id": 2, "method": "calc.nope"}, -32601),
            ({"jsonrpc": "2.0", "id": 3, "method": "calc.add", "params": {"a": "x"}}, -32602),
            ({"jsonrpc": "2.0", "id": 4, "method": "calc.missing", "params": {"key": "k"}}, -32000),
            ({"jsonrpc": "2.0", "id": 5, "method": "nosuchsvc.m"}, -32601),
            ({"jsonrpc": "1.0", "id": 6, "method": "calc.add"}, -32600),
            ({"jsonrpc": "2.0", "id": 7, "method": "calc.add", "params": 3}, -32600),
            ([{"jsonrpc": "2.0", "id": 8, "method": "calc.add"}], -32600),
            ({"jsonrpc": "2.0", "id": 9, "method": "calc.sleep", "params": {"seconds": 5}}, -32003),
        ]
        refused = len(ws_server.proc.log_records("message refused"))
        failed = len(ws_server.proc.log_records("rpc error"))
        for request, code in cases:
            answer = await rpc(ws, request)
            error = answer["error"]
            assert isinstance(error, dict) and error["code"] == code, (request, answer)
            if isinstance(request, dict) and request["jsonrpc"] == "2.0":
                assert answer["id"] == request["id"]
        service_error = await rpc(ws, cases[2][0])
        assert service_error["error"]["data"]["code"] == "not_found"  # type: ignore[index]
        # Each logged once, before its answer: a caller's mistake as refused (what the
        # gateway answers with a 4xx), a service's failure (here the timeout) as an error.
        logged = ws_server.proc.log_records("message refused")[refused:]
        assert [r["code"] for r in logged] == ["method_not_found", "invalid_params", "not_found",
                                               "method_not_found", -32600, -32600, -32600,
                                               "not_found"]  # fmt: skip
        logged = ws_server.proc.log_records("rpc error")[failed:]
        assert [(r["method"], r["code"]) for r in logged] == [("calc.sleep", "timeout")]
        # a notification runs but gets no answer: the next answer is the ping's
        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "calc.add", "params": [1]}))
        await ws.send(json.dumps({"type": "ping", "id": "after"}))
        assert await recv_json(ws) == {"type": "pong", "id": "after"}


async def test_jsonrpc_handler_crash_is_answered_by_its_type_only(
    ws_server: WsServer, calc: None
) -> None:
    """As at the gateway: a crash's text (here naming a Redis address) is logged, not sent."""
    leak = "Error 111 connecting to 10.9.8.7:6379. Connection refused."
    async with ws_server.connect() as ws:
        await _calc_ready(ws)
        failed = len(ws_server.proc.log_records("rpc error"))
        answer = await rpc(ws, {"jsonrpc": "2.0", "id": 2, "method": "calc.fail",
                                "params": {"message": leak}})  # fmt: skip
    assert answer["error"] == {
        "code": -32000,
        "message": "the service's handler failed (ValueError); its log has the details",
        "data": {"code": "remote_error", "type": "ValueError"},
    }
    record = ws_server.proc.log_records("rpc error")[failed]
    assert (record["method"], record["code"], record["error"]) == ("calc.fail", "remote_error",
                                                                   leak)  # fmt: skip


async def test_jsonrpc_lone_surrogate_and_unanswerable_result_are_answered(
    ws_server: WsServer, calc: None
) -> None:
    async with ws_server.connect() as ws:
        await _calc_ready(ws)
        # "\ud800" alone is no text: not JSON, a parse error; a pair is one character.
        await ws.send(
            r'{"jsonrpc": "2.0", "id": 7, "method": "calc.add", "params": {"a": "\ud800"}}'
        )
        answer = await recv_json(ws)
        assert answer["id"] is None and answer["error"]["code"] == -32700, answer
        pair = r'{"jsonrpc": "2.0", "id": 8, "method": "calc.add", "params": {"a": "\ud83d\ude00"}}'
        await ws.send(pair)
        answer = await recv_json(ws)
        assert answer["id"] == 8 and answer["error"]["code"] == -32602, answer  # not an int
        # A result JSON cannot hold (a bytes map key): answered as the gateway's 502
        # `invalid_result`, logged once as a service's failure, without a traceback.
        failed = LogWatch(ws_server, "rpc error")
        answer = await rpc(ws, {"jsonrpc": "2.0", "id": 9, "method": "calc.opaque"})
        assert answer["error"]["code"] == -32000, answer
        assert answer["error"]["data"] == {"code": "invalid_result"}
        assert answer["error"]["message"].startswith(
            "the answer cannot be sent as JSON: it holds a map key that is not text"
        )
        logged = await failed.wait(1)
        assert [(r["method"], r["code"]) for r in logged] == [("calc.opaque", "invalid_result")]
        await ws.send(json.dumps({"type": "ping", "id": "after"}))  # the session goes on
        assert await recv_json(ws) == {"type": "pong", "id": "after"}
    assert "never retrieved" not in ws_server.proc.log_tail(400)
    assert ws_server.proc.log_records("call failed") == []


async def test_jsonrpc_bytes_are_utf8_text_or_invalid_result(
    ws_server: WsServer, calc: None
) -> None:
    """As at the gateway: never decoded with U+FFFD in place of what is not UTF-8."""
    async with ws_server.connect() as ws:
        await _calc_ready(ws)
        text = await rpc(ws, {"jsonrpc": "2.0", "id": 1, "method": "calc.blob",
                              "params": {"utf8": True}})  # fmt: skip
        assert text == {"jsonrpc": "2.0", "id": 1, "result": "café"}
        binary = await rpc(ws, {"jsonrpc": "2.0", "id": 2, "method": "calc.blob"})
        assert binary["error"]["code"] == -32000, binary
        assert binary["error"]["data"] == {"code": "invalid_result"}
        assert "bytes that are not UTF-8 text (10 bytes)" in binary["error"]["message"]


async def test_jsonrpc_arguments_over_rpc_max_payload_bytes_are_invalid_params(
    make_ws_server: Callable[..., WsServer], calc: None
) -> None:
    server = make_ws_server(RPC_MAX_PAYLOAD_BYTES=str(MIN_PAYLOAD_LIMIT),
                            WS_MAX_MESSAGE_BYTES=str(4 * MIN_PAYLOAD_LIMIT))  # fmt: skip
    async with server.connect() as ws:
        await _calc_ready(ws)
        pad = "x" * MIN_PAYLOAD_LIMIT
        answer = await rpc(ws, {"jsonrpc": "2.0", "id": 3, "method": "calc.add",
                                "params": {"a": 1, "pad": pad}})  # fmt: skip
        assert answer["error"]["code"] == -32602, answer
        assert answer["error"]["data"] == {"code": "payload_too_large"}
        assert "RPC_MAX_PAYLOAD_BYTES" in answer["error"]["message"]


async def test_numbers_json_cannot_hold_are_refused_and_never_sent(
    ws_server: WsServer, calc: None
) -> None:
    async with ws_server.connect() as ws:
        await _calc_ready(ws)
        # 1e400 is no double: Python reads infinity, which would be echoed as `Infinity`
        for message in [
            '{"type": "ping", "id": 1e400}',
            '{"type": "subscribe", "channel": "iptv:now:1", "id": -1e400}',
            '{"jsonrpc": "2.0", "id": 1e400, "method": "calc.add", "params": [1]}',
        ]:
            await ws.send(message)
            answer = _strict(await ws.recv())
            assert answer["id"] is None and answer["error"]["code"] == -32700, answer
        # A service's result that is no JSON number (pydantic reads "-inf" as a float):
        # answered as the gateway answers it (502 `invalid_result`), logged once as a
        # service's failure, without a traceback.
        failed = LogWatch(ws_server, "rpc error")
        sleep = {"jsonrpc": "2.0", "id": 2, "method": "calc.sleep", "params": {"seconds": "-inf"}}
        await ws.send(json.dumps(sleep))
        invalid = {"code": -32000, "data": {"code": "invalid_result"},
                   "message": "the answer cannot be sent as JSON: it holds a number that is "
                              "NaN or an infinity, which JSON cannot carry"}  # fmt: skip
        assert _strict(await ws.recv()) == {"jsonrpc": "2.0", "id": 2, "error": invalid}
        assert [r["method"] for r in await failed.wait(1)] == ["calc.sleep"]


def _strict(text: str | bytes) -> Any:
    """`text` as JSON, strictly: `Infinity` and `NaN` are not JSON (a browser refuses them)."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in {text!r}")

    return json.loads(text, parse_constant=refuse)


async def _answered(ws: ClientConnection, call: dict[str, object]) -> bool:
    return "result" in await rpc(ws, call)


async def _calc_ready(ws: ClientConnection) -> None:
    """Wait until the calc worker answers (it may still be starting)."""
    add = {"jsonrpc": "2.0", "id": 1, "method": "calc.add", "params": [1]}
    await wait_for_async(lambda: _answered(ws, add), timeout=30)


async def test_jsonrpc_needs_a_scope_for_the_method(ws_server: WsServer) -> None:
    narrow = {"Authorization": f"Bearer {ws_server.token(scopes=('calc.add',))}"}
    async with ws_server.connect(additional_headers=narrow) as ws:
        for method in ("calc.sleep", "iptv.list_channels", "auth.set_roles"):
            answer = await rpc(ws, {"jsonrpc": "2.0", "id": 1, "method": method})
            assert answer["error"]["code"] == -32005, (method, answer)  # type: ignore[index]
    async with ws_server.connect() as ws:  # scope "*": everything but the admin-only auth
        answer = await rpc(ws, {"jsonrpc": "2.0", "id": 2, "method": "auth.set_roles"})
        assert answer["error"]["code"] == -32005  # type: ignore[index]


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


async def test_jsonrpc_service_unavailable(ws_server: WsServer, redis_client: aioredis.Redis):
    from common.registry import Registry

    service = f"idle{uuid.uuid4().hex[:6]}"
    await Registry(redis_client).publish_catalog(service, {"m": {}})  # known, nobody running
    async with ws_server.connect() as ws:
        answer = await rpc(ws, {"jsonrpc": "2.0", "id": 1, "method": f"{service}.m"})
    assert answer["error"]["code"] == -32001  # type: ignore[index]
