"""JSON-RPC over `/ws` through a real websocket service onto a real RPC worker: calls,
errors, what JSON cannot carry, payload bounds, scopes, an unavailable service."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection

from common.settings import MIN_PAYLOAD_LIMIT
from tests.helpers import wait_for_async
from tests.support.calc_service import start_worker
from tests.websocket.conftest import LogWatch, WsServer, recv_json

pytestmark = pytest.mark.timeout(120)


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


async def test_jsonrpc_service_unavailable(ws_server: WsServer, redis_client: aioredis.Redis):
    from common.registry import Registry

    service = f"idle{uuid.uuid4().hex[:6]}"
    await Registry(redis_client).publish_catalog(service, {"m": {}})  # known, nobody running
    async with ws_server.connect() as ws:
        answer = await rpc(ws, {"jsonrpc": "2.0", "id": 1, "method": f"{service}.m"})
    assert answer["error"]["code"] == -32001  # type: ignore[index]
