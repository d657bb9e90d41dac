"""Malformed requests to the proxy routes: each gets a 4xx with a JSON error body, none
reaches the instance, and the gateway goes on serving.

The requests are exact bytes on a socket (`raw_http`), since the point is what no HTTP
client would send: smuggling attempts (two lengths, a length and chunked framing),
broken chunking, bad header lines, NUL bytes, oversized heads, paths that climb out of
the service. Each goes to `/svc/<service>/upload` with a valid credential, so the
instance's upload counter (`/admin/state`) says whether any of it got through.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.malformed import CASES
from tests.support.policy import set_document, wait_applied
from tests.support.raw_http import Answer, exchange
from tests.webapi.conftest import Backend, as_admin, gateway_process, running_gateway

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def gateway(redis_url: str) -> Iterator[str]:
    """The module's gateway, logging every refusal: each case checks its own line (the
    bound per client is `test_refusals_logged.py`'s)."""
    with running_gateway(redis_url, LOG_REFUSALS_PER_CLIENT="0") as base:
        yield base


def _uploads(backend: Backend) -> int:
    return int(as_admin.get(f"{backend.base}/admin/state", timeout=5).json()["uploads"])


def _refusals(backend: Backend) -> list[dict[str, Any]]:
    return gateway_process(backend.gateway).log_records("request refused")


def _error(answer: Answer) -> str:
    """The error code of a JSON error answer."""
    assert answer.headers.get("content-type", "").startswith("application/json"), answer
    error = json.loads(answer.body)["error"]
    assert error["message"]
    return str(error["code"])


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_request_gets_a_json_4xx_and_reaches_nobody(
    backend: Backend, case: str
) -> None:
    fields, status, code = CASES[case]
    uploads = _uploads(backend)
    refusals = len(_refusals(backend))
    head = f"POST /svc/{backend.service}/upload HTTP/1.1\r\nHost: gateway.test\r\n"
    answer = exchange(backend.gateway, (head + as_admin.field_lines() + fields).encode("latin-1"))
    assert (answer.status, _error(answer)) == (status, code), answer.body
    assert _uploads(backend) == uploads  # nothing of it reached the instance
    # Logged once (design §10), before the answer was written; not the credential.
    logged = _refusals(backend)[refusals:]
    assert [(r["status"], r["code"]) for r in logged] == [(status, code)]
    assert as_admin.headers["Authorization"].split()[1] not in json.dumps(logged)
    assert as_admin.get(f"{backend.base}/echo", timeout=5).status_code == 200


@pytest.mark.parametrize(
    "target",
    ["/../admin/state", "/%2e%2e/admin/state", "/a/%2E%2E/%2e%2e/admin", "/a%2fb", "/a%00b",
     # Dot segments with path parameters: Tomcat, Jetty and Spring drop `;...` first.
     "/..;/admin/state", "/a/%2e%2e;x/admin", "/a/..%3bx/admin", "/a/.;/b",
     # No request target has a fragment (RFC 9112 §3.2); `..#` is `..` to a backend
     # that drops it.
     "/echo#frag", "/..#", "/a/..#/admin/state", "/echo?q=1#frag"],
)  # fmt: skip
def test_a_path_that_leaves_the_service_is_refused(backend: Backend, target: str) -> None:
    head = f"GET /svc/{backend.service}{target} HTTP/1.1\r\nHost: gateway.test\r\n"
    answer = exchange(backend.gateway, (head + as_admin.field_lines() + "\r\n").encode())
    assert (answer.status, _error(answer)) == (400, "invalid_path")


def test_a_fragment_in_a_policy_routes_target_is_refused(backend: Backend) -> None:
    doc = set_document(backend.redis_url, routes=[
        {"prefix": "/pub/", "service": backend.service, "strip_prefix": True, "public": True},
    ])  # fmt: skip
    try:
        wait_applied(backend.gateway, doc.version, timeout=5)
        uploads = _uploads(backend)
        for target in ("/pub/upload#frag", "/pub/..#", "/pub/x/..#/upload"):
            head = f"POST {target} HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: 0\r\n\r\n"
            answer = exchange(backend.gateway, head.encode())
            assert (answer.status, _error(answer)) == (400, "invalid_path"), target
        assert _uploads(backend) == uploads  # none reached the instance
        answer = exchange(backend.gateway, b"POST /pub/upload HTTP/1.1\r\nHost: gateway.test\r\n"
                          b"Content-Length: 0\r\n\r\n")  # fmt: skip
        assert answer.status == 200 and _uploads(backend) == uploads + 1
    finally:
        set_document(backend.redis_url, routes=[])


@pytest.mark.parametrize(
    ("request_line", "status", "code"),
    [
        ("G@T /svc/{s}/echo HTTP/1.1", 405, "method_not_allowed"),
        ("GET /svc/{s}/echo", 400, "bad_request"),
        ("GET /svc/{s}/echo HTTP/1.1 extra", 400, "bad_request"),
        ("GET /svc/{s}/echo HTTP/2.0", 400, "bad_request"),
    ],
    ids=["bad method", "no version", "extra part", "unknown version"],
)
def test_a_malformed_request_line_gets_a_json_4xx(
    backend: Backend, request_line: str, status: int, code: str
) -> None:
    line = request_line.format(s=backend.service)
    head = f"{line}\r\nHost: gateway.test\r\n{as_admin.field_lines()}\r\n"
    answer = exchange(backend.gateway, head.encode())
    assert (answer.status, _error(answer)) == (status, code)
