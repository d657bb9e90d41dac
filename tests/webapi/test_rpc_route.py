"""`POST /rpc/<service>/<method>` and the JSON error contract, through a real gateway."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
import uuid

import httpx
import pytest

from common.settings import MIN_PAYLOAD_LIMIT, get_settings
from tests.helpers import serve_until_live, wait_for, wait_for_async
from tests.support.calc_service import build
from tests.support.policy import set_document, wait_applied
from tests.webapi.conftest import Stack, answered, as_admin, running_gateway


def _error(response: httpx.Response) -> dict[str, str]:
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, str] = response.json()["error"]
    assert error["code"] and error["message"]
    return error


async def test_call_returns_result(http: httpx.AsyncClient) -> None:
    response = await http.post("/rpc/calc/add", json={"a": 2, "b": 3})
    assert response.status_code == 200
    assert response.json() == {"result": 5}


async def test_empty_body_means_no_arguments(http: httpx.AsyncClient) -> None:
    response = await http.post("/rpc/calc/whoami")
    assert response.status_code == 200
    assert response.json()["result"]["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ('{"a": ', 400, "malformed_json"),
        ("[1, 2]", 400, "malformed_json"),
        ('"text"', 400, "malformed_json"),
        (b"\xff\xfe", 400, "malformed_json"),
        ("[" * 50_000 + "]" * 50_000, 400, "malformed_json"),  # past Python's recursion
        ('{"a": NaN}', 400, "malformed_json"),  # Python's, not JSON
        ('{"a": 1e400}', 400, "malformed_json"),  # too large for a double: not infinity
        ('{"a": "two"}', 422, "invalid_params"),
        ('{"b": 1}', 422, "invalid_params"),
        ('{"a": 1, "zzz": 1}', 422, "invalid_params"),
    ],
)
async def test_bad_input_is_a_precise_4xx(
    http: httpx.AsyncClient, body: str | bytes, status: int, code: str
) -> None:
    response = await http.post(
        "/rpc/calc/add", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    assert _error(response)["code"] == code


@pytest.mark.parametrize(
    ("body", "json_type"),
    [
        ("null", "null"),
        ("[1, 2]", "array"),
        ('"text"', "string"),
        ("1", "number"),
        ("2.5", "number"),
        ("true", "boolean"),
    ],
)
async def test_a_body_that_is_no_object_is_named_by_its_json_type(
    http: httpx.AsyncClient, body: str, json_type: str
) -> None:
    """The client sent JSON: Python's names for it (NoneType, list, str) mean nothing to it."""
    response = await http.post(
        "/rpc/calc/add", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert _error(response) == {
        "code": "malformed_json",
        "message": f"body must be a JSON object, not {json_type}",
    }


async def test_ints_past_64_bits_reach_the_handler_and_come_back(http: httpx.AsyncClient) -> None:
    """JSON has them and so has Python: the RPC codec carries them (an extension type)."""
    response = await http.post(
        "/rpc/calc/add",
        content='{"a": 18446744073709551616, "b": -1}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200
    assert response.text == '{"result":18446744073709551615}'
    response = await http.post("/rpc/calc/add", json={"a": -(10**30)})
    assert response.json() == {"result": -(10**30) + 1}


async def test_a_number_too_large_for_a_double_is_malformed_not_infinity(
    http: httpx.AsyncClient,
) -> None:
    # Python reads -1e400 as -inf: the call would run and answer `-Infinity`, not JSON.
    response = await http.post(
        "/rpc/calc/sleep",
        content='{"seconds": -1e400}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert _error(response)["code"] == "malformed_json"


async def test_invalid_params_list_the_fields(http: httpx.AsyncClient) -> None:
    response = await http.post("/rpc/calc/add", json={"a": "x", "b": "y"})
    assert {d["field"] for d in response.json()["error"]["details"]} == {"a", "b"}


@pytest.mark.parametrize(
    "path", ["/rpc/calc/nope", "/rpc/no_such_service/x", "/rpc/Calc/add", "/rpc/calc/a.b"]
)
async def test_unknown_service_or_method_is_404(http: httpx.AsyncClient, path: str) -> None:
    response = await http.post(path, json={})
    assert response.status_code == 404
    assert _error(response)["code"] in ("method_not_found", "not_found")


async def test_handler_error_codes_map_to_statuses(http: httpx.AsyncClient) -> None:
    response = await http.post("/rpc/calc/missing", json={"key": "k"})
    assert response.status_code == 404
    assert _error(response) == {
        "code": "not_found",
        "message": "no such thing: k",
        "type": "NotFound",
    }
    response = await http.post("/rpc/calc/fail", json={"message": "kaput"})
    assert response.status_code == 502
    assert _error(response)["code"] == "remote_error"


async def test_a_handler_crash_reaches_the_client_by_its_type_only(
    http: httpx.AsyncClient, stack: Stack
) -> None:
    """A crash's text may name the worker's insides (redis-py's names Redis's address):
    the client gets its type, the gateway's error line its text. An application
    error (a `ServiceError`, above) keeps its message."""
    leak = "Error 111 connecting to redis://:hunter2@10.9.8.7:6379. Connection refused."
    logged = len(stack.processes["webapi"].log_records("rpc error"))
    response = await http.post("/rpc/calc/fail", json={"message": leak})
    assert response.status_code == 502
    assert _error(response) == {
        "code": "remote_error",
        "message": "the service's handler failed (ValueError); its log has the details",
        "type": "ValueError",
    }
    assert "10.9.8.7" not in response.text and "hunter2" not in response.text
    record = stack.processes["webapi"].log_records("rpc error")[logged]
    assert (record["status"], record["code"], record["error"]) == (502, "remote_error", leak)


async def test_timeout_is_504(http: httpx.AsyncClient) -> None:
    response = await http.post("/rpc/calc/sleep", json={"seconds": 5})
    assert response.status_code == 504
    assert _error(response)["code"] == "timeout"


async def test_oversized_body_is_413(http: httpx.AsyncClient) -> None:
    response = await http.post("/rpc/calc/add", content=b"x" * (2 * 1024 * 1024))
    assert response.status_code == 413
    _error(response)


def test_a_413_is_readable_while_the_client_is_still_sending(stack: Stack) -> None:
    # The gateway refuses the body before reading it; it must keep reading (and
    # dropping) what the client still sends, or its close resets the connection and
    # the client never sees the 413 (a lingering close, as nginx does).
    host, port = stack.base_url.removeprefix("http://").split(":")
    body = b"x" * (4 * 1024 * 1024)
    auth = as_admin.field_lines()
    head = (f"POST /rpc/calc/add HTTP/1.1\r\nHost: gw\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + body[:65536])
        time.sleep(0.5)  # the 413 is written and the close has begun by now
        sock.sendall(body[65536:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"error"' in answer


async def test_unknown_route_and_wrong_method_are_json(http: httpx.AsyncClient) -> None:
    response = await http.get("/nothing/here")
    assert response.status_code == 404
    _error(response)
    response = await http.get("/rpc/calc/add")
    assert response.status_code == 405
    _error(response)


async def test_a_result_json_cannot_carry_is_a_502_not_infinity(http: httpx.AsyncClient) -> None:
    # pydantic reads the string "-inf" as a float, and `sleep` returns it: -Infinity
    # is no JSON, which a strict parser (a browser's) refuses.
    response = await http.post("/rpc/calc/sleep", json={"seconds": "-inf"})
    assert response.status_code == 502
    assert _error(response)["code"] == "invalid_result"
    assert (await http.post("/rpc/calc/sleep", json={"seconds": 0})).json() == {"result": 0}
    # An error whose details hold NaN: answered without them.
    refused = await http.post("/rpc/calc/refuse", json={"value": "nan"})
    assert refused.status_code == 422
    assert _error(refused) == {"code": "invalid_params", "message": "refused"}
    kept = await http.post("/rpc/calc/refuse", json={"value": 1.5})
    assert kept.json()["error"]["details"] == [{"loc": ["value"], "input": 1.5}]


async def test_bytes_reach_the_client_as_utf8_text_or_a_502(http: httpx.AsyncClient) -> None:
    """Never decoded with U+FFFD in place of what is not UTF-8: JSON has no bytes type."""
    text = await http.post("/rpc/calc/blob", json={"utf8": True})
    assert text.status_code == 200
    assert text.json() == {"result": "café"}
    binary = await http.post("/rpc/calc/blob", json={})
    assert binary.status_code == 502
    error = _error(binary)
    assert error["code"] == "invalid_result"
    assert "bytes that are not UTF-8 text (10 bytes)" in error["message"]
    assert "\ufffd" not in binary.text and "�" not in binary.text


async def test_a_result_json_cannot_hold_is_a_502_naming_the_cause(
    http: httpx.AsyncClient,
) -> None:
    # A map with a bytes key (msgpack carries it, JSON does not): not a 500.
    response = await http.post("/rpc/calc/opaque")
    assert response.status_code == 502
    error = _error(response)
    assert error["code"] == "invalid_result"
    assert error["message"].startswith(
        "the answer cannot be sent as JSON: it holds a map key that is not text"
    )
    infinity = await http.post("/rpc/calc/sleep", json={"seconds": "-inf"})
    assert _error(infinity)["message"] == (
        "the answer cannot be sent as JSON: it holds a number that is NaN or an infinity, "
        "which JSON cannot carry"
    )


async def test_payloads_over_rpc_max_payload_bytes(redis_url: str, auth: dict[str, str]) -> None:
    """Arguments over the bound are the caller's: 413, nothing sent. A result over it is
    the service's: 502 `result_too_large`, the worker answering at once."""
    limit = MIN_PAYLOAD_LIMIT
    svc = build(f"calc_{uuid.uuid4().hex[:8]}")
    svc.settings = dataclasses.replace(get_settings(), rpc_max_payload_bytes=limit)
    task = await serve_until_live(svc, redis_url)
    try:
        with running_gateway(redis_url, RPC_MAX_PAYLOAD_BYTES=str(limit)) as base:
            async with httpx.AsyncClient(base_url=base, timeout=10, headers=auth) as http:
                url = f"/rpc/{svc.name}/text"
                await wait_for_async(lambda: _answered(http, url, {"size": 1}))
                args = await http.post(url, json={"size": 1, "pad": "x" * limit})
                assert args.status_code == 413
                error = _error(args)
                assert error["code"] == "payload_too_large"
                assert error["message"].endswith(
                    f"over the {limit}-byte limit (RPC_MAX_PAYLOAD_BYTES)"
                )
                result = await http.post(url, json={"size": limit})
                assert result.status_code == 502
                error = _error(result)
                assert error["code"] == "result_too_large"
                assert error["message"].startswith(f"the result of {svc.name}.text encodes to ")
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 30)


async def _answered(http: httpx.AsyncClient, url: str, body: dict[str, object]) -> bool:
    return (await http.post(url, json=body)).status_code == 200


async def test_request_id_is_kept_or_made(http: httpx.AsyncClient) -> None:
    kept = await http.post("/rpc/calc/whoami", headers={"x-request-id": "abc-123"})
    assert kept.headers["x-request-id"] == "abc-123"
    assert kept.json()["result"]["request_id"] == "abc-123"
    replaced = await http.post("/rpc/calc/whoami", headers={"x-request-id": "bad id\x01"})
    assert replaced.headers["x-request-id"] != "bad id\x01"
    assert len(replaced.headers["x-request-id"]) == 32


async def test_health_lists_redis_and_live_instances(http: httpx.AsyncClient) -> None:
    body = (await http.get("/health")).json()
    assert body["status"] == "ok"
    assert body["redis"]["ok"] is True
    for service in ("calc", "iptv", "auth"):
        assert body["services"][service]["live"] >= 1


def test_an_rpc_service_behind_a_proxy_route_is_a_404_naming_its_rpc_route(stack: Stack) -> None:
    """/svc/<rpc service>/..., /nlp and /ai_server/ naming one, and a policy route to one
    are 404 `rpc_service` pointing at POST /rpc/<service>/<method>, not 503 "no live
    instance" while /health shows it live; from the fast path (a keep-alive request
    whose credential is cached) as from Sanic's handler (a chunked body: never fast)."""
    base = stack.base_url
    message = "'calc' is an RPC service, not an HTTP one: call POST /rpc/calc/<method>"
    error = {"code": "rpc_service", "message": message}

    def refused(response: httpx.Response) -> None:
        assert (response.status_code, response.json()["error"]) == (404, error), response.text

    assert httpx.get(f"{base}/health").json()["services"]["calc"]["live"] >= 1
    before = answered(base)
    with httpx.Client(headers=as_admin.headers, timeout=10) as client:
        for _ in range(5):
            refused(client.get(f"{base}/svc/calc/add"))
        assert answered(base) - before >= 4  # (the first may be Sanic's)
        before = answered(base)
        refused(client.post(f"{base}/svc/calc/add", content=iter([b'{"a": 1}'])))  # chunked
        assert answered(base) == before  # Sanic's
        refused(client.post(f"{base}/nlp", json={"service_name": "calc"}))
        envelope = client.post(f"{base}/ai_server/", json={"server_name": "calc"})
        refused(envelope)
        assert (envelope.json()["status"], envelope.json()["msg"]) == (404, error["message"])

        doc = set_document(stack.redis_url, routes=[{"prefix": "/calc-http/", "service": "calc"}])
        try:
            wait_applied(base, doc.version, timeout=5)
            refused(client.get(f"{base}/calc-http/add"))
        finally:
            set_document(stack.redis_url, routes=[])


def test_no_live_instance_is_503_at_once(stack: Stack) -> None:
    """Last in the module: stops the calc worker (graceful, it deregisters)."""
    stack.processes["calc"].stop()
    wait_for(lambda: httpx.get(f"{stack.base_url}/health").json()["services"]["calc"]["live"] == 0)
    started = time.monotonic()
    response = as_admin.post(f"{stack.base_url}/rpc/calc/add", json={"a": 1}, timeout=10)
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert _error(response)["code"] == "service_unavailable"
    assert elapsed < 1.0  # fails fast instead of waiting for the RPC timeout
