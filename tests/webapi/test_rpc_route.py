"""`POST /rpc/<service>/<method>` and the JSON error contract, through a real gateway."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.helpers import wait_for
from tests.support.policy import set_document
from tests.webapi.conftest import Stack, answered, as_admin, policy_version


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
        ('{"a": 18446744073709551616}', 422, "invalid_params"),  # 2**64: no RPC int holds it
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
    auth = "".join(f"{k}: {v}\r\n" for k, v in as_admin.headers.items())
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
            wait_for(lambda: policy_version(base) >= doc.version, timeout=5)
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
