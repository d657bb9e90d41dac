"""Proxy loops: an instance whose address leads back to the gateway. Every forwarded
request carries the gateway's `Via` mark and one that carries `MAX_VIA_HOPS` of them is
answered 508 `proxy_loop`; a splice (pass-through, tunnel), which forwards no header,
refuses an instance that is the gateway itself."""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from common.forwarding import MAX_VIA_HOPS
from tests.helpers import issue_user_token, wait_for
from tests.support.policy import apply_routes
from tests.support.raw_http import exchange
from tests.support.registry import deregister, register
from tests.webapi.conftest import Backend, as_admin

pytestmark = pytest.mark.timeout(60)


def _live(gateway: str, service: str) -> bool:
    body = as_admin.get(f"{gateway}/health", timeout=5).json()
    return bool(body["services"].get(service, {}).get("instances"))


@pytest.fixture
def looping(gateway: str, redis_url: str) -> Iterator[str]:
    """A service whose one instance is the gateway itself (written to the registry as a
    record the heartbeat would refuse: a DNS name may lead back just as well), with a
    public route, a pass-through one and a tunnel one; the service's name."""
    service = f"loop{uuid.uuid4().hex[:6]}"
    instance = f"{service}-self"
    asyncio.run(register(redis_url, service, {instance: f"127.0.0.1:{gateway.rpartition(':')[2]}"}))
    wait_for(lambda: _live(gateway, service), timeout=10)
    route = {"service": service, "public": True, "strip_prefix": False}
    apply_routes(gateway, redis_url, [
        {"prefix": f"/{service}/", **route},
        {"prefix": f"/{service}-pt/", **route, "passthrough": True},
        {"prefix": f"/{service}-tn/", **route, "passthrough": True, "tunnel": True},
    ])  # fmt: skip
    try:
        yield service
    finally:
        apply_routes(gateway, redis_url, [])
        asyncio.run(deregister(redis_url, service, instance))


def test_a_loop_through_svc_ends_in_508(gateway: str, redis_url: str, looping: str) -> None:
    auth = {"Authorization": "Bearer " + issue_user_token(redis_url, "u-loop", "loop")}
    # `/svc/` strips its prefix: a path that names the service again at each hop.
    path = f"/svc/{looping}" * 10 + "/x"
    answer = httpx.get(f"{gateway}{path}", headers=auth, timeout=10)
    assert answer.status_code == 508, answer.text
    assert answer.json()["error"]["code"] == "proxy_loop"
    # It went round MAX_VIA_HOPS times at most (each hop adds its latency headers)...
    assert len(answer.headers.get_list("x-upstream-instance")) <= MAX_VIA_HOPS
    # ... and the 508s, 5xx answers of the looping instance, have ejected it.
    again = httpx.get(f"{gateway}{path}", headers=auth, timeout=10)
    assert again.json()["error"]["code"] in ("proxy_loop", "no_healthy_instance")


def test_a_loop_through_a_public_route_ends_in_508(gateway: str, looping: str) -> None:
    answer = httpx.get(f"{gateway}/{looping}/x", timeout=10)  # no credential: public
    assert (answer.status_code, answer.json()["error"]["code"]) == (508, "proxy_loop")


@pytest.mark.parametrize("suffix", ["-pt", "-tn"])
def test_a_splice_to_the_gateway_itself_is_refused(gateway: str, looping: str, suffix: str) -> None:
    answer = exchange(gateway, f"GET /{looping}{suffix}/x HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    assert answer.status == 508, answer
    assert b"proxy_loop" in answer.body


def _host_address() -> str | None:
    """An address of this host other than loopback (the one a route out would use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # (UDP: nothing is sent)
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("suffix", ["-pt", "-tn"])
def test_another_server_on_the_gateways_port_at_another_address_is_no_loop(
    gateway: str, redis_url: str, suffix: str
) -> None:
    """The gateway listens on 127.0.0.1 only: a server of this host on the same port at
    another of its addresses is another server, spliced to as any instance."""
    address = _host_address()
    if address is None:
        pytest.skip("no address of this host besides loopback")
    port = int(gateway.rpartition(":")[2])
    try:
        server = ThreadingHTTPServer((address, port), _Ok)
    except OSError as exc:
        pytest.skip(f"cannot listen on {address}:{port}: {exc}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    service = f"near{uuid.uuid4().hex[:6]}"
    instance = f"{service}-1"
    try:
        asyncio.run(register(redis_url, service, {instance: f"{address}:{port}"}))
        wait_for(lambda: _live(gateway, service), timeout=10)
        route = {"prefix": f"/{service}{suffix}/", "service": service, "public": True,
                 "strip_prefix": False, "passthrough": True, "tunnel": suffix == "-tn"}  # fmt: skip
        apply_routes(gateway, redis_url, [route])
        head = f"GET /{service}{suffix}/x HTTP/1.1\r\nHost: gw\r\n\r\n"
        answer = exchange(gateway, head.encode())
        assert (answer.status, answer.body) == (200, b"ok"), answer
    finally:
        server.shutdown()
        server.server_close()
        apply_routes(gateway, redis_url, [])
        asyncio.run(deregister(redis_url, service, instance))


def test_a_request_with_fewer_marks_is_forwarded_more_is_refused(backend: Backend) -> None:
    for marks, status in ((MAX_VIA_HOPS - 1, 200), (MAX_VIA_HOPS, 508)):
        via = ", ".join(["1.1 switchboard"] * marks)
        for _ in range(2):  # Sanic's route, then the fast path's
            answer = as_admin.get(f"{backend.base}/echo", headers={"Via": via}, timeout=10)
            assert answer.status_code == status, answer.text
