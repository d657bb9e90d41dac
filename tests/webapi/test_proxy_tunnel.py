"""Tunnel routes (`webapi.tunnel`): after its first request is checked, a client
connection is relayed to the instance unread, whatever comes next on it."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import pytest

from tests.support.policy import apply_routes, set_document
from tests.support.raw_http import closed_by_peer, connect, exchange, raw_request, read_answers
from tests.webapi.conftest import (
    Backend,
    as_admin,
    gateway_process,
    running_backend,
    running_gateway,
)
from tests.webapi.passthrough_fixtures import counters

pytestmark = pytest.mark.timeout(120)


def _routes(service: str) -> list[dict[str, object]]:
    return [
        {"prefix": "/echo/t/", "service": service, "public": True, "strip_prefix": False,
         "passthrough": True, "tunnel": True},
        {"prefix": "/echo/private/", "service": service, "strip_prefix": False},
    ]  # fmt: skip


@pytest.fixture
def tunnel(backend: Backend) -> Iterator[Backend]:
    """`/echo/t/` of the backend a tunnel route; `/echo/private/` a normal (credential) one."""
    apply_routes(backend.gateway, backend.redis_url, _routes(backend.service))
    try:
        yield backend
    finally:
        apply_routes(backend.gateway, backend.redis_url, [])


def get(path: str, **headers: str) -> bytes:
    return raw_request("GET", path, headers)


def test_after_the_first_request_everything_reaches_the_instance_unread(tunnel: Backend) -> None:
    before = counters(tunnel.gateway)
    with connect(tunnel.gateway) as sock:
        sock.sendall(get("/echo/t/first"))
        (first,) = read_answers(sock, 1)
        assert json.loads(first.body)["path"] == "/echo/t/first"
        # A path of a credential route, then one no route has: the instance answers
        # both (a checked splice sends the first to the gateway: 401).
        sock.sendall(get("/echo/private/x") + get("/echo/anything"))
        replies = read_answers(sock, 2)
    assert [json.loads(r.body)["path"] for r in replies] == ["/echo/private/x", "/echo/anything"]
    assert all("x-gateway-latency" not in r.headers for r in replies)
    after = counters(tunnel.gateway)
    assert after["tunnels"] == before["tunnels"] + 1
    assert after["connections"] == before["connections"] + 1
    assert after["requests"] == before["requests"]  # a tunnel does not count requests


def test_a_new_connection_is_checked_again(tunnel: Backend) -> None:
    # The first request: not the tunnel's route.
    reply = exchange(tunnel.gateway, get("/echo/private/x"))
    assert reply.status == 401


@pytest.mark.parametrize("path", ["/echo/t/..;/private/x", "/echo/t/%2e%2e;x/private/x"])
def test_a_first_request_climbing_out_of_the_prefix_is_refused(tunnel: Backend, path: str) -> None:
    # (`..;`: an instance that drops path parameters before dot segments, as Tomcat
    # does, would have served it `/echo/private/x`.)
    reply = exchange(tunnel.gateway, get(path))
    assert (reply.status, json.loads(reply.body)["error"]["code"]) == (400, "invalid_path")


def test_the_instance_closing_closes_the_client_connection(tunnel: Backend) -> None:
    with connect(tunnel.gateway) as sock:
        sock.sendall(get("/echo/t/last", Connection="close"))  # the instance closes after it
        (reply,) = read_answers(sock, 1)
        assert json.loads(reply.body)["path"] == "/echo/t/last"
        assert closed_by_peer(sock, 10)


def test_a_tunnel_needs_a_passthrough_route(tunnel: Backend) -> None:
    document = {"routes": [{"prefix": "/x/", "service": "svc", "public": True,
                            "strip_prefix": False, "tunnel": True}]}  # fmt: skip
    reply = as_admin.post(f"{tunnel.gateway}/admin/policy/validate", json=document)
    assert reply.status_code == 422
    assert '\\"passthrough\\": true' in reply.text or '"passthrough": true' in reply.text


def test_shutdown_lets_an_answer_under_way_finish_then_closes(redis_url: str) -> None:
    with running_gateway(redis_url) as gateway, running_backend(gateway, redis_url) as backend:
        apply_routes(backend.gateway, backend.redis_url, _routes(backend.service))
        process = gateway_process(gateway)
        try:
            with connect(gateway) as sock:
                sock.sendall(get("/echo/t/first"))
                assert read_answers(sock, 1)[0].status == 200
                sock.sendall(get("/slow?ms=1500"))  # unread: the instance's own route
                time.sleep(0.3)
                process.send_signal(signal.SIGTERM)
                (slow,) = read_answers(sock, 1)
                assert slow.status == 200 and "instance" in json.loads(slow.body)
                assert closed_by_peer(sock, 10)
        finally:
            set_document(redis_url, routes=[])  # (this gateway is gone: no wait)
