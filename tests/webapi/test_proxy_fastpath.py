"""The proxy's fast path (webapi.fastpath) through a real gateway and a real backend.

Which path answered is read from the gateway's own counter (`GET /admin/proxy/stats`,
`fast_path.answered`): nothing else in this module is proxied while a test counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from common.compiled import build_state, c_modules_in_use
from common.policy import PolicyStore
from tests.helpers import free_port, issue_api_key, wait_for
from tests.support.policy import set_document
from tests.support.raw_http import connect, raw_request, read_answers
from tests.webapi.conftest import (
    Backend,
    answered,
    as_admin,
    fast_path,
    running_backend,
    running_gateway,
)

pytestmark = pytest.mark.timeout(120)


def direct(gateway: str) -> int:
    """How many fast requests went out on an idle upstream connection, from callbacks."""
    return fast_path(gateway)["direct"]


def pool_retries(gateway: str) -> int:
    """Stale-connection retries of the upstream pool, over all its upstreams."""
    stats = as_admin.get(f"{gateway}/admin/proxy/stats", timeout=5).json()
    return sum(int(host["retries"]) for host in stats["upstreams"].values())


# The tests.


def test_keep_alive_requests_are_answered_by_the_fast_path(backend: Backend) -> None:
    before, before_direct = answered(backend.gateway), direct(backend.gateway)
    limits = httpx.Limits(max_connections=1)
    with httpx.Client(headers=as_admin.headers, limits=limits, timeout=10) as client:
        replies = [client.get(f"{backend.base}/echo?n={i}") for i in range(50)]
    assert [r.status_code for r in replies] == [200] * 50
    assert answered(backend.gateway) - before == 50
    # All but perhaps the first (which may have to connect) on an idle upstream connection.
    assert direct(backend.gateway) - before_direct >= 49
    reply = replies[-1]
    assert reply.json()["query"] == "n=49"
    seen = reply.json()["headers"]
    assert "authorization" not in seen  # an API key never reaches a backend
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["host"] == backend.service
    assert seen["x-request-id"] == reply.headers["x-request-id"]
    assert reply.headers["x-upstream-instance"] == f"{backend.service}-a"
    assert float(reply.headers["x-gateway-latency"]) >= 0
    assert reply.headers["content-length"] == str(len(reply.content))
    assert "ratelimit-limit" not in reply.headers


def test_pipelined_requests_are_answered_in_order(backend: Backend) -> None:
    before = answered(backend.gateway)
    path = f"/svc/{backend.service}/echo"
    batch = b"".join(
        raw_request("GET", f"{path}?i={i}", {**as_admin.headers, "X-Request-Id": f"pipe-{i}"})
        for i in range(5)
    )
    # The third is Sanic's (no credential): the two after it wait for it, in order.
    batch += raw_request("GET", path, {"X-Request-Id": "pipe-sanic"})
    batch += raw_request("GET", f"{path}?i=last", {**as_admin.headers, "X-Request-Id": "pipe-last"})
    with connect(backend.gateway) as sock:
        sock.sendall(batch)
        replies = read_answers(sock, 7)
    assert [r.status for r in replies] == [200] * 5 + [401, 200]
    assert [r.headers["x-request-id"] for r in replies] == [
        *(f"pipe-{i}" for i in range(5)),
        "pipe-sanic",
        "pipe-last",
    ]
    assert [r.body.count(f'"i={i}"'.encode()) for i, r in enumerate(replies[:5])] == [1] * 5
    assert answered(backend.gateway) - before == 5  # the last one followed Sanic's


def test_a_request_split_across_reads_is_answered(backend: Backend) -> None:
    request = raw_request("GET", f"/svc/{backend.service}/echo", as_admin.headers)
    body = b"y" * 1000
    upload = raw_request("POST", f"/svc/{backend.service}/upload", as_admin.headers, body)
    before = answered(backend.gateway)
    with connect(backend.gateway) as sock:
        sock.sendall(request[:20])
        time.sleep(0.2)  # not waiting for a condition: two separate reads are the point
        sock.sendall(request[20:])
        [reply] = read_answers(sock, 1)
        assert reply.status == 200
        assert answered(backend.gateway) - before == 0  # a split head goes to Sanic
        sock.sendall(request)  # whole this time, on the same connection
        [again] = read_answers(sock, 1)
        assert again.status == 200
        assert answered(backend.gateway) - before == 1
        # The head, then the body a moment later (as many clients write them), here in two
        # parts: waited for until the whole request has arrived.
        sock.sendall(upload[:-600])
        time.sleep(0.2)
        sock.sendall(upload[-600:-300])
        time.sleep(0.2)
        sock.sendall(upload[-300:])
        [posted] = read_answers(sock, 1)
    assert posted.status == 200
    assert posted.body.count(b'"bytes":1000') == 1
    assert answered(backend.gateway) - before == 2


def test_head_and_small_post_body(backend: Backend) -> None:
    before = answered(backend.gateway)
    head = as_admin.get(f"{backend.base}/download?mb=1")  # GET for comparison
    assert head.status_code == 200
    reply = httpx.head(f"{backend.base}/echo", headers=as_admin.headers)
    assert reply.status_code == 405  # the backend's own answer (its /echo is GET only)
    assert reply.headers["allow"] == "GET"
    assert int(reply.headers["content-length"]) > 0  # the length a GET would have
    assert reply.content == b""
    body = bytes(range(256)) * 40  # 10 KiB
    posted = as_admin.post(f"{backend.base}/upload", content=body)
    assert posted.status_code == 200
    assert posted.json()["bytes"] == len(body)
    assert posted.json()["sha256"] == hashlib.sha256(body).hexdigest()
    assert answered(backend.gateway) - before == 3
    assert len(head.content) == 1024 * 1024  # streamed back chunked


def test_a_body_over_the_limit_takes_sanics_path(backend: Backend) -> None:
    body = b"x" * (64 * 1024 + 1)
    before = answered(backend.gateway)
    posted = as_admin.post(f"{backend.base}/upload", content=body)
    assert posted.status_code == 200
    assert posted.json()["bytes"] == len(body)
    assert answered(backend.gateway) - before == 0


def test_a_credential_not_cached_yet_takes_sanics_path_once(backend: Backend) -> None:
    key = issue_api_key(backend.redis_url, [backend.service], user_id="fp-user", name="fp")
    headers = {"X-Api-Key": key}
    before = answered(backend.gateway)
    first = httpx.get(f"{backend.base}/echo", headers=headers)
    assert first.status_code == 200
    assert "x-api-key" not in first.json()["headers"]
    assert answered(backend.gateway) - before == 0
    assert httpx.get(f"{backend.base}/echo", headers=headers).status_code == 200
    assert answered(backend.gateway) - before == 1


def test_refused_credentials_are_sanics(backend: Backend) -> None:
    other = issue_api_key(backend.redis_url, ["calc"], user_id="fp-other", name="fp")
    before = answered(backend.gateway)
    for _ in range(2):  # the second time the credential is cached: still refused
        lacking = httpx.get(f"{backend.base}/echo", headers={"X-Api-Key": other})
        assert lacking.status_code == 403
        assert lacking.json()["error"]["code"] == "forbidden"
    missing = httpx.get(f"{backend.base}/echo")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    bad = httpx.get(f"{backend.base}/echo", headers={"Authorization": "Basic eDp5"})
    assert bad.status_code == 401
    assert answered(backend.gateway) - before == 0


def test_a_rate_limited_service_takes_sanics_path(backend: Backend) -> None:
    rule = {"id": "fastpath", "service": backend.service, "key": "credential",
            "rate": 1000, "period": 60}  # fmt: skip
    previous = asyncio.run(_limits(backend.redis_url))
    set_document(backend.redis_url, limits=[rule])
    try:

        def limited() -> httpx.Response | None:
            reply = as_admin.get(f"{backend.base}/echo")
            return reply if "ratelimit-limit" in reply.headers else None

        before = answered(backend.gateway)
        reply = wait_for(limited, timeout=10)
        assert reply.status_code == 200
        assert reply.headers["ratelimit-limit"] == "1000"
        assert answered(backend.gateway) == before
    finally:
        set_document(backend.redis_url, limits=previous)


async def _limits(redis_url: str) -> list[dict[str, Any]]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        document = await PolicyStore(client).get()
    finally:
        await client.aclose()
    return [rule.model_dump(mode="json") for rule in document.limits]


def test_upstream_errors_are_json(backend: Backend, gateway: str) -> None:
    assert as_admin.get(f"{backend.base}/echo").status_code == 200  # an idle connection
    before, before_direct = answered(gateway), direct(gateway)
    slow = as_admin.get(f"{backend.base}/slow?ms=3000", timeout=30)
    assert slow.status_code == 504  # the test gateway's PROXY_TIMEOUT is 1 s
    assert slow.json()["error"]["code"] == "upstream_timeout"
    assert slow.headers["x-request-id"]
    assert answered(gateway) - before == 1
    assert direct(gateway) - before_direct == 1  # the timeout of the callback exchange

    service = f"fpdead{uuid.uuid4().hex[:6]}"
    beat = {"service": service, "address": f"127.0.0.1:{free_port()}"}  # nothing listens
    assert as_admin.post(f"{gateway}/heartbeat", json=beat).status_code == 200

    def known() -> httpx.Response | None:
        r = as_admin.get(f"{gateway}/svc/{service}/x", headers={"X-Request-Id": "dead-1"})
        return r if r.status_code != 404 else None

    first = wait_for(known, timeout=5)
    assert first.status_code == 502, first.text
    assert first.json()["error"]["code"] == "upstream_failed"
    assert first.headers["x-request-id"] == "dead-1"
    then = as_admin.get(f"{gateway}/svc/{service}/x")
    assert then.status_code == 503
    assert then.json()["error"]["code"] == "no_healthy_instance"
    before = answered(gateway)
    unknown = as_admin.get(f"{gateway}/svc/nosuch{uuid.uuid4().hex[:6]}/x")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_service"
    assert answered(gateway) - before == 1


def test_connection_close_is_respected(backend: Backend) -> None:
    before = answered(backend.gateway)
    request = raw_request(
        "GET", f"/svc/{backend.service}/echo", {**as_admin.headers, "Connection": "close"}
    )
    with connect(backend.gateway) as sock:
        sock.sendall(request)
        [reply] = read_answers(sock, 1)
        assert reply.headers["connection"] == "close"
        assert sock.recv(1) == b""  # the gateway closed the connection
    assert reply.status == 200
    assert answered(backend.gateway) - before == 1


def test_keep_alive_off_closes_after_each_fast_answer(redis_url: str) -> None:
    """With Sanic's KEEP_ALIVE off, every fast answer says `close` and closes. Two requests
    at once: the slow one takes the idle upstream connection (direct) and holds it, so
    the other has none left and goes through the coroutine's path."""
    with (
        running_gateway(redis_url, SANIC_KEEP_ALIVE="false") as gateway,
        running_backend(gateway, redis_url) as backend,  # its check leaves one idle connection
        connect(gateway) as first,
        connect(gateway) as second,
    ):
        before, before_direct = answered(gateway), direct(gateway)
        first.sendall(raw_request("GET", f"/svc/{backend.service}/slow?ms=500", as_admin.headers))
        second.sendall(raw_request("GET", f"/svc/{backend.service}/echo", as_admin.headers))
        for sock in (first, second):
            [reply] = read_answers(sock, 1)
            assert (reply.status, reply.headers["connection"]) == (200, "close")
            assert sock.recv(1) == b""  # the gateway closed the connection
        assert answered(gateway) - before == 2
        assert direct(gateway) - before_direct == 1


@contextmanager
def raw_upstream(gateway: str, serve: Callable[[socket.socket], None]) -> Iterator[str]:
    """A registered service whose one instance is `serve(conn)` on each accepted
    connection (each in its own thread); yields the service's name."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed at the end of the test
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            serve(conn)

    service = f"fpraw{uuid.uuid4().hex[:6]}"
    beat = {"service": service, "address": f"127.0.0.1:{port}"}

    def heartbeat() -> None:  # the test gateway forgets an instance after 1.5 s
        while not stop.wait(0.3):
            as_admin.post(f"{gateway}/heartbeat", json=beat)

    assert as_admin.post(f"{gateway}/heartbeat", json=beat).status_code == 200
    threading.Thread(target=accept, daemon=True).start()
    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        yield service
    finally:
        stop.set()
        listener.close()


def _read_request(conn: socket.socket) -> bytes:
    """One request head (and nothing after it) from `conn`; b"" at its end."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    return data


def test_an_upstream_closing_its_connection_keeps_the_client_one(gateway: str) -> None:
    """An upstream answering `Connection: close`: its connection is not reused, the
    client's stays open (Connection is hop-by-hop)."""

    def serve(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n"
                     b"X-Backend: raw\r\nX-Request-Id: upstream\r\n\r\nhello")  # fmt: skip

    with raw_upstream(gateway, serve) as service:
        request = raw_request("GET", f"/svc/{service}/x", as_admin.headers)
        with connect(gateway) as sock:

            def routed() -> bool:
                sock.sendall(request)
                return read_answers(sock, 1)[0].status == 200

            wait_for(routed, timeout=5)
            before = answered(gateway)
            sock.sendall(request * 3)
            replies = read_answers(sock, 3)
        assert [(r.status, r.body, r.headers["connection"]) for r in replies] == [
            (200, b"hello", "keep-alive")
        ] * 3
        assert replies[0].headers["x-backend"] == "raw"
        # The gateway's request id replaces the upstream's, as on Sanic's path.
        assert replies[0].names.count("x-request-id") == 1
        assert replies[0].headers["x-request-id"] != "upstream"
        assert answered(gateway) - before == 3


def test_a_stale_idle_connection_is_retried_for_idempotent_requests_only(gateway: str) -> None:
    """The idle-close race on the callback exchange: an upstream that closes a kept-alive
    connection on its second request, unanswered. A GET is sent again on a new
    connection (not the instance's fault); a POST may have been applied, so it is a 502."""

    def serve(conn: socket.socket) -> None:
        if _read_request(conn):  # the first request is answered, keep-alive
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            _read_request(conn)  # the second one is not: the connection just closes

    with raw_upstream(gateway, serve) as service:
        url = f"{gateway}/svc/{service}/x"
        wait_for(lambda: as_admin.get(url).status_code == 200, timeout=5)
        before, retries_before = direct(gateway), pool_retries(gateway)
        again = as_admin.get(url)  # on the idle connection, which closes: sent again
        assert (again.status_code, again.text) == (200, "ok")
        assert direct(gateway) - before == 1
        assert pool_retries(gateway) - retries_before == 1  # the pool's rule, counted there
        post = as_admin.post(url, content=b"x")  # on the new connection's second request
        assert post.status_code == 502, post.text
        assert post.json()["error"]["code"] == "upstream_failed"
        assert direct(gateway) - before == 2
        assert as_admin.get(url).status_code == 200  # the instance was not ejected


def test_a_large_download_streams_to_a_slow_client(backend: Backend) -> None:
    """A 16 MiB response on the callback exchange, read only after a pause: the upstream's
    socket is paused meanwhile and read again once the client takes the bytes."""
    assert as_admin.get(f"{backend.base}/echo").status_code == 200  # an idle connection
    before = direct(backend.gateway)
    request = raw_request("GET", f"/svc/{backend.service}/download?mb=16", as_admin.headers)
    with connect(backend.gateway) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(request)
        time.sleep(1.0)  # the gateway's buffers fill up and the upstream is paused
        [reply] = read_answers(sock, 1)
    assert reply.status == 200
    assert reply.headers["transfer-encoding"] == "chunked"  # the backend's is chunked too
    expected = bytes(range(256)) * 256 * 16 * 16
    assert len(reply.body) == len(expected)
    assert hashlib.sha256(reply.body).digest() == hashlib.sha256(expected).digest()
    assert direct(backend.gateway) - before == 1


def test_the_gateway_says_whether_its_hot_path_runs_compiled(gateway: str) -> None:
    # `make test` compiles it first (`make compile`), and a build that no longer matches
    # its sources is never used (`common.compiled`): the suite tests the compiled path.
    expected = build_state()
    stats = as_admin.get(f"{gateway}/admin/proxy/stats", timeout=5).json()
    assert stats["hot_path"] == {
        "compiled": expected.used,
        "state": expected.reason,
        "c_modules": list(c_modules_in_use()),  # (the suite's gateway runs in this process)
    }
    if os.environ.get("SWITCHBOARD_COMPILED") != "0":
        assert expected.used, f"the hot path runs interpreted: {expected.reason}"
