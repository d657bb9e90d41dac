"""Pass-through routes and their instances (`webapi.passthrough`, `webapi.splice`): how a
splice's instance is reached (an IPv6 address, connect failures retried, least
connections counting open splices) and what an instance does on its own (an early
answer and its close, bytes sent before the splice has started).

What the splice relayed is read from the gateway's counters (`GET /admin/proxy/stats`,
`passthrough`); the backend echoes the path it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack

import httpx
import pytest

from tests.helpers import free_port, issue_api_key, wait_for
from tests.support.policy import apply_routes
from tests.support.raw_http import connect, exchange, raw_request, read_answers
from tests.support.registry import registered
from tests.webapi.conftest import Backend, as_admin, http_instance
from tests.webapi.passthrough_fixtures import counters, get
from tests.webapi.upstream_servers import Handler, Peer, Upstream

pytestmark = pytest.mark.timeout(120)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_an_instance_registered_at_an_ipv6_address_is_spliced(backend: Backend) -> None:
    """`[::1]:port` (as the heartbeat accepts it) is connected to without its brackets."""
    service = f"v6{uuid.uuid4().hex[:6]}"
    api_key = issue_api_key(backend.redis_url, ["registry"], name="passthrough-v6")
    proc = http_instance(backend.gateway, api_key, service, f"{service}-a", HOST="::1")
    try:
        route = {"prefix": "/echo/", "service": service, "public": True, "strip_prefix": False,
                 "passthrough": True}  # fmt: skip
        apply_routes(backend.gateway, backend.redis_url, [route])

        def spliced() -> bool:
            reply = exchange(backend.gateway, get("/echo/six"))
            return reply.status == 200 and json.loads(reply.body)["instance"] == f"{service}-a"

        before = counters(backend.gateway)
        wait_for(spliced, timeout=30)  # (unknown until its first heartbeat is seen)
        assert counters(backend.gateway)["requests"] > before["requests"]  # it was spliced
    finally:
        apply_routes(backend.gateway, backend.redis_url, [])
        proc.stop()


def test_connect_failures_are_retried_within_the_services_attempt_limit(
    backend: Backend,
) -> None:
    """A splice's connects go by the same rule as a proxied request's: with `retries: 0`
    each request tries one instance (ejecting it), not every instance at once."""
    service = f"ptdead{uuid.uuid4().hex[:6]}"
    for port in (free_port(), free_port(), free_port()):  # nothing listens there
        beat = {"service": service, "address": f"127.0.0.1:{port}"}
        assert as_admin.post(f"{backend.gateway}/heartbeat", json=beat).status_code == 200

    def all_live() -> bool:
        services = httpx.get(f"{backend.gateway}/health", timeout=5).json()["services"]
        return services.get(service, {}).get("live") == 3

    wait_for(all_live, timeout=10)
    route = {"prefix": "/dead/", "service": service, "public": True, "strip_prefix": False,
             "passthrough": True}  # fmt: skip
    apply_routes(backend.gateway, backend.redis_url, [route], services={service: {"retries": 0}})
    try:
        statuses = []
        for i in range(4):
            reply = exchange(backend.gateway, get(f"/dead/{i}"))
            statuses.append(reply.status)
            assert "error" in json.loads(reply.body)
        # One instance ejected per request; then none is left.
        assert statuses == [502, 502, 502, 503]
    finally:
        apply_routes(backend.gateway, backend.redis_url, [], services={})


def test_least_connections_counts_open_splices(backend: Backend) -> None:
    """A splice is one request to its instance from connect to end: with two instances
    and least_conn, each second splice opened goes where the fewer are open."""
    api_key = issue_api_key(backend.redis_url, ["registry"], name="passthrough-b")
    second = http_instance(backend.gateway, api_key, backend.service, f"{backend.service}-b")
    route = {"prefix": "/echo/", "service": backend.service, "public": True,
             "strip_prefix": False, "passthrough": True}  # fmt: skip
    try:
        apply_routes(
            backend.gateway,
            backend.redis_url,
            [route],
            services={backend.service: {"strategy": "least_conn"}},
        )
        both = {f"{backend.service}-a", f"{backend.service}-b"}
        seen: set[str] = set()

        def both_known() -> bool:  # (a proxied request: it has ended when answered)
            seen.add(as_admin.get(f"{backend.base}/echo", timeout=5).json()["instance"])
            return seen == both

        wait_for(both_known, timeout=30)
        with ExitStack() as open_splices:
            instances = []
            for i in range(10):
                sock = open_splices.enter_context(connect(backend.gateway))
                sock.sendall(get(f"/echo/held/{i}"))
                (reply,) = read_answers(sock, 1)
                instances.append(json.loads(reply.body)["instance"])
        pairs = [set(instances[i : i + 2]) for i in range(0, 10, 2)]
        assert pairs == [both] * 5, instances
    finally:
        apply_routes(backend.gateway, backend.redis_url, [], services={})
        second.stop()


@pytest.mark.parametrize("reads_the_rest", [False, True], ids=["mid_body", "after_the_body"])
async def test_an_early_answer_then_close_ends_the_client_connection(
    backend: Backend, reads_the_rest: bool
) -> None:
    # An instance that answers before reading a request's body (a 401, keep-alive by its
    # look), then closes its connection, as servers do with an unread body. The rest of
    # that body must never be read as requests: it would reach the gateway (or another
    # instance) unchecked, in the bytes of a public route's body (request smuggling).
    # Whether the instance's close reaches the gateway before the rest of the body
    # (`mid_body`: the client sends the rest only once its connection has closed) or
    # after it (`after_the_body`: the instance reads the rest before it closes) was a
    # race when the client sent the rest as soon as it had the 401: the connection was
    # kept open in the second order. Each order is forced here: it closes in both.
    hidden = raw_request("GET", "/health", {})
    body = b"x" * 100 + hidden
    read: list[bytes] = []

    async def early(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        await peer.send(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        if reads_the_rest:
            read.append(await peer.reader.readexactly(len(body)))
        peer.close()

    async with _scripted_route(backend, "/early/", early) as instance:

        def exchange() -> bytes:
            with connect(backend.gateway) as sock:
                head = raw_request("POST", "/early/x", {"Content-Length": str(len(body))})
                sock.sendall(head + body[:100])
                (first,) = read_answers(sock, 1)
                assert first.status == 401
                rest = b""
                with contextlib.suppress(ConnectionError):
                    if not reads_the_rest:  # the body cut by the instance's close: closed
                        assert sock.recv(65536) == b""
                    sock.sendall(hidden)  # the rest of the POST's body
                    while chunk := sock.recv(65536):
                        rest += chunk
                return rest

        assert await asyncio.to_thread(exchange) == b""  # closed: no answer to /health
    # The instance had the whole body, as a body, before its close (the order forced).
    assert read == ([body] if reads_the_rest else [])
    assert instance.connections == 1


@pytest.mark.parametrize("tunnel", [False, True], ids=["checked", "tunnel"])
async def test_what_an_instance_sends_before_the_splice_starts_reaches_the_client(
    backend: Backend, tunnel: bool
) -> None:
    # An instance that answers as soon as a connection is made, then closes (an early
    # error response; a server that speaks first). Its bytes may arrive between the
    # connect and the splice's start, when they were dropped (and its close too): the
    # client's connection closed with no answer. Many connections at once make that
    # window likely (from none to 95 of 100 lost, 100 at once).
    early = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy"
    )

    async def speaks_first(peer: Peer) -> None:
        await peer.send(early)
        peer.close()

    replies = []
    async with _scripted_route(backend, "/first/", speaks_first, tunnel=tunnel):
        for _ in range(3):  # (one round of 100 lost none, now and then)
            request = get("/first/x")
            replies += await asyncio.to_thread(_all_at_once, backend.gateway, request, 100)
    assert replies == [early] * 300  # each the instance's answer, then the close


@contextlib.asynccontextmanager
async def _scripted_route(
    backend: Backend, prefix: str, handler: Handler, *, tunnel: bool = False
) -> AsyncIterator[Upstream]:
    """A pass-through route `prefix` (a tunnel: `tunnel`) to one scripted instance of a
    service of its own, serving `handler`; the routes are cleared after."""
    service = f"script{uuid.uuid4().hex[:6]}"
    async with (
        Upstream(handler) as instance,
        registered(backend.redis_url, service, {f"{service}-a": instance.address}),
    ):
        route = {"prefix": prefix, "service": service, "public": True, "passthrough": True,
                 "strip_prefix": False, "tunnel": tunnel}  # fmt: skip
        await asyncio.to_thread(apply_routes, backend.gateway, backend.redis_url, [route])
        try:
            yield instance
        finally:
            await asyncio.to_thread(apply_routes, backend.gateway, backend.redis_url, [])


def _all_at_once(gateway: str, request: bytes, count: int) -> list[bytes]:
    """Send `request` on `count` connections at once; what each received until it was
    closed (or 10 s passed)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(connect(gateway)) for _ in range(count)]
        for sock in socks:
            sock.sendall(request)
        received = {sock: b"" for sock in socks}
        open_ = set(socks)
        deadline = time.monotonic() + 10
        while open_ and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_), [], [], 0.5)
            for sock in ready:
                try:
                    chunk = sock.recv(65536)
                except ConnectionError:
                    chunk = b""
                received[sock] += chunk
                if not chunk:
                    open_.discard(sock)
        return [received[sock] for sock in socks]
