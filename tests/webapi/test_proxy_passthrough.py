"""Pass-through routes (`webapi.passthrough`): a real gateway splicing client connections
to a real backend, byte for byte, while checking each request's route (how its
instance is reached, and what an instance does on its own: `test_proxy_passthrough_instances`).

What the splice relayed is read from the gateway's counters (`GET /admin/proxy/stats`,
`passthrough`); the backend echoes the path it saw.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.support.policy import apply_routes, set_document
from tests.support.raw_http import closed_by_peer, connect, raw_request, read_answers
from tests.webapi.conftest import Backend, as_admin
from tests.webapi.passthrough_fixtures import counters, get

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def passthrough(backend: Backend) -> Iterator[Backend]:
    """`/echo/` and `/upload` of the backend as pass-through routes; `/echo/private/` a
    normal (credential) route of the same service."""
    service = backend.service
    apply_routes(backend.gateway, backend.redis_url, [
        {"prefix": "/echo/", "service": service, "public": True, "strip_prefix": False,
         "passthrough": True},
        {"prefix": "/upload/", "service": service, "public": True, "strip_prefix": False,
         "passthrough": True},
        {"prefix": "/echo/private/", "service": service, "strip_prefix": False},
        {"prefix": "/nowhere/", "service": f"ghost{uuid.uuid4().hex[:6]}", "public": True,
         "strip_prefix": False, "passthrough": True},
    ])  # fmt: skip
    try:
        yield backend
    finally:
        apply_routes(backend.gateway, backend.redis_url, [])


def test_keep_alive_requests_are_relayed_unchanged(passthrough: Backend) -> None:
    before = counters(passthrough.gateway)
    with connect(passthrough.gateway) as sock:
        for i in range(20):
            sock.sendall(get(f"/echo/item/{i}?q={i}"))
            (reply,) = read_answers(sock, 1)
            assert reply.status == 200
            assert json.loads(reply.body)["path"] == f"/echo/item/{i}"
            # Nothing of the gateway's own: a pure pass-through.
            assert "x-gateway-latency" not in reply.headers
    after = counters(passthrough.gateway)
    assert after["connections"] == before["connections"] + 1
    assert after["requests"] == before["requests"] + 20


def test_pipelined_route_requests_are_answered_in_order(passthrough: Backend) -> None:
    with connect(passthrough.gateway) as sock:
        sock.sendall(b"".join(get(f"/echo/p/{i}") for i in range(8)))
        replies = read_answers(sock, 8)
    assert [json.loads(r.body)["path"] for r in replies] == [f"/echo/p/{i}" for i in range(8)]


def test_empty_lines_between_requests_are_not_relayed(passthrough: Backend) -> None:
    # RFC 9112 §2.2 lets a server ignore empty lines before a request line: the splice
    # drops them (relayed, a head starting with one is a 400 from the instance, Sanic).
    # Within a body they are the body's, and relayed (else the instance waits for it).
    body = b"\r\n\r\n"
    post = raw_request("POST", "/echo/post", {}, body)
    before = counters(passthrough.gateway)
    with connect(passthrough.gateway) as sock:
        sock.sendall(get("/echo/a"))
        assert read_answers(sock, 1)[0].status == 200
        for data in (b"\r\n", b"\r\n" + get("/echo/b"), post[: -len(body)], body + get("/echo/c")):
            sock.sendall(data)
            time.sleep(0.05)  # (one read each)
        replies = read_answers(sock, 3)
        assert [(r.status, json.loads(r.body)["path"]) for r in replies] == [
            (200, "/echo/b"), (200, "/echo/post"), (200, "/echo/c"),
        ]  # fmt: skip
    after = counters(passthrough.gateway)
    assert (after["connections"], after["requests"]) == (
        before["connections"] + 1, before["requests"] + 4,
    )  # fmt: skip


def test_a_request_of_another_route_goes_to_the_gateway_on_the_same_connection(
    passthrough: Backend,
) -> None:
    before = counters(passthrough.gateway)
    with connect(passthrough.gateway) as sock:
        sock.sendall(get("/echo/first"))
        assert read_answers(sock, 1)[0].status == 200
        sock.sendall(get("/health"))  # the gateway's own route
        (health,) = read_answers(sock, 1)
        assert health.status == 200 and json.loads(health.body)["status"] == "ok"
        sock.sendall(get("/echo/again"))  # spliced again
        (again,) = read_answers(sock, 1)
        assert json.loads(again.body)["path"] == "/echo/again"
    assert counters(passthrough.gateway)["connections"] == before["connections"] + 2


def test_a_request_head_split_across_reads_is_checked_before_any_of_it_goes(
    passthrough: Backend,
) -> None:
    with connect(passthrough.gateway) as sock:
        sock.sendall(get("/echo/whole"))
        assert read_answers(sock, 1)[0].status == 200
        for request, status in ((get("/echo/split"), 200), (get("/health"), 200)):
            sock.sendall(request[:7])  # "GET /he": whose route, nobody can tell yet
            time.sleep(0.05)
            sock.sendall(request[7:])
            (reply,) = read_answers(sock, 1)
            assert reply.status == status
        # The gateway answered /health itself (the backend has a /health too).
        assert json.loads(reply.body)["status"] == "ok"
        assert "instance" not in json.loads(reply.body)


def test_a_non_public_route_under_the_prefix_is_never_relayed(passthrough: Backend) -> None:
    before = counters(passthrough.gateway)
    with connect(passthrough.gateway) as sock:
        sock.sendall(get("/echo/open"))
        assert read_answers(sock, 1)[0].status == 200
        # The longer prefix is a credential route: the gateway answers 401 itself,
        # also when dot segments try to reach it from the pass-through prefix.
        for path in ("/echo/private/x", "/echo/a/../private/x", "/echo/a/%2e%2e/private/x",
                     "/echo/a/..;/private/x", "/echo/a/%2e%2e;x/private/x"):  # fmt: skip
            sock.sendall(get(path))
            (reply,) = read_answers(sock, 1)
            assert reply.status in (400, 401), (path, reply.status)
            assert "error" in json.loads(reply.body)
    assert counters(passthrough.gateway)["requests"] == before["requests"] + 1


def test_a_request_pipelined_behind_route_requests_goes_to_the_gateway(
    passthrough: Backend,
) -> None:
    # One read: route requests (one with a body), then the gateway's /health, then a
    # route request again: each answered, in order, on the one connection. (They
    # were all dropped and the connection closed: a client pipelining them again
    # would never be served.)
    post = raw_request("POST", "/echo/three", {"Content-Length": "5"}) + b"hello"
    pipeline = get("/echo/two") + post + get("/health") + get("/echo/four")
    for first in (b"", get("/echo/one")):  # starting the splice, or spliced already
        with connect(passthrough.gateway) as sock:
            sock.sendall(first + pipeline)
            answers = read_answers(sock, 5 if first else 4)
            sock.sendall(get("/echo/five"))
            (last,) = read_answers(sock, 1)
        bodies = [json.loads(a.body) for a in answers]
        paths = [b.get("path", "gateway") for b in bodies]
        expected = ["/echo/one"] if first else []
        assert paths == [*expected, "/echo/two", "/echo/three", "gateway", "/echo/four"]
        assert bodies[-2]["status"] == "ok" and "instance" not in bodies[-2]  # the gateway's
        assert json.loads(last.body)["path"] == "/echo/five"


@pytest.mark.parametrize("last", ["/echo/four", "/health"])
def test_route_requests_before_a_head_not_whole_are_answered_before_it_is_whole(
    passthrough: Backend, last: str
) -> None:
    # One read: route requests (one with a body), then the start of a head, the route's
    # or the gateway's (whose, nobody can tell yet): those before it are forwarded at
    # once (they were held with it until it was whole), the head once it is whole.
    post = raw_request("POST", "/echo/three", {"Content-Length": "5"}) + b"hello"
    head = get(last)
    with connect(passthrough.gateway) as sock:
        sock.sendall(get("/echo/one"))
        assert read_answers(sock, 1)[0].status == 200  # (spliced)
        sock.sendall(get("/echo/two") + post + head[:15])
        answers = read_answers(sock, 2)  # before the rest of the head is sent
        sock.sendall(head[15:])
        answers += read_answers(sock, 1)
    bodies = [json.loads(a.body) for a in answers]
    assert [b.get("path", "gateway") for b in bodies] == [
        "/echo/two", "/echo/three", "gateway" if last == "/health" else last
    ]  # fmt: skip


def test_a_request_of_another_route_after_a_body_tail_closes_after_the_answers(
    passthrough: Backend,
) -> None:
    # The read starts inside a route request's body: where that body ends is not known,
    # so nothing of the read is forwarded and both connections close.
    head = raw_request("POST", "/echo/tail", {"Content-Length": "10"})
    with connect(passthrough.gateway) as sock:
        sock.sendall(head + b"hello")
        time.sleep(0.3)  # (two reads)
        sock.sendall(b"world" + get("/health"))
        sock.settimeout(10)
        rest = b""
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(65536):
                rest += chunk
    assert rest == b""


@pytest.mark.parametrize(
    ("rest", "status", "code"),
    [(b"\r\nHost: g\r\nX-Big: " + b"a" * 70_000, 431, "request_header_fields_too_large"),
     (b"a" * 70_000, 414, "uri_too_long")],
    ids=["header fields", "request line"],
)  # fmt: skip
def test_a_head_held_past_its_bound_gets_431_or_414(
    passthrough: Backend, rest: bytes, status: int, code: str
) -> None:
    # A spliced connection's next head, not whole at 64 KiB (the splice's bound): the
    # connection closed with no answer, where Sanic's path answers a head over its bound.
    with connect(passthrough.gateway) as sock:
        sock.sendall(get("/echo/first"))
        assert read_answers(sock, 1)[0].status == 200
        sock.sendall(b"GET /echo/big" + rest)
        (reply,) = read_answers(sock, 1)
        assert (reply.status, json.loads(reply.body)["error"]["code"]) == (status, code)
        assert reply.headers["connection"] == "close"
        assert closed_by_peer(sock)


def test_a_fragment_is_never_relayed(passthrough: Backend) -> None:
    before = counters(passthrough.gateway)
    with connect(passthrough.gateway) as sock:
        for target in ("/echo/x#frag", "/echo/x?q=1#/../..", "/echo/..#"):
            sock.sendall(get(target))
            (reply,) = read_answers(sock, 1)
            assert reply.status == 400, target
            assert json.loads(reply.body)["error"]["code"] == "invalid_path"
    assert counters(passthrough.gateway)["requests"] == before["requests"]


def test_a_fragment_is_not_relayed_on_a_spliced_connection_either(passthrough: Backend) -> None:
    # After a first request, the connection is spliced: the splice checks each next
    # request's target itself (`PassThrough._is_ours`), as the gateway's route does.
    with connect(passthrough.gateway) as sock:
        sock.sendall(get("/echo/ok"))
        (first,) = read_answers(sock, 1)
        assert first.status == 200
        sock.sendall(get("/echo/x#frag"))
        (reply,) = read_answers(sock, 1)
    assert reply.status == 400
    assert json.loads(reply.body)["error"]["code"] == "invalid_path"


def test_head_is_answered_by_the_gateway(passthrough: Backend) -> None:
    before = counters(passthrough.gateway)
    with connect(passthrough.gateway) as sock:
        sock.sendall(raw_request("HEAD", "/echo/h", {}))
        head = b""
        while not head.endswith(b"\r\n\r\n"):  # a HEAD answer has no body
            chunk = sock.recv(65536)
            assert chunk, head
            head += chunk
        # The gateway's normal route forwarded it (the backend allows no HEAD there).
        assert head.startswith(b"HTTP/1.1 405 ") and b"X-Upstream-Instance" in head
        sock.sendall(get("/echo/after-head"))
        (after,) = read_answers(sock, 1)
    assert json.loads(after.body)["path"] == "/echo/after-head"
    assert counters(passthrough.gateway)["requests"] == before["requests"] + 1


def test_a_large_upload_streams_through(passthrough: Backend) -> None:
    payload = bytes(range(256)) * 4096 * 8  # 8 MiB
    with connect(passthrough.gateway) as sock:
        sock.sendall(raw_request("POST", "/upload", {"Content-Length": str(len(payload))}))
        for i in range(0, len(payload), 1 << 20):
            sock.sendall(payload[i : i + (1 << 20)])
        (reply,) = read_answers(sock, 1)
    assert reply.status == 200
    assert json.loads(reply.body)["sha256"] == hashlib.sha256(payload).hexdigest()


def test_no_instance_is_a_json_error_and_the_connection_closes(passthrough: Backend) -> None:
    before = counters(passthrough.gateway)
    with connect(passthrough.gateway) as sock:
        sock.sendall(get("/nowhere/x"))
        (reply,) = read_answers(sock, 1)
        assert reply.status in (502, 503, 404)
        assert "error" in json.loads(reply.body)
        assert reply.headers["connection"] == "close"
        assert sock.recv(100) == b""
    assert counters(passthrough.gateway)["connect_failures"] == before["connect_failures"] + 1


def test_a_policy_change_ends_the_route_on_open_connections(passthrough: Backend) -> None:
    with connect(passthrough.gateway) as sock:
        sock.sendall(get("/echo/before"))
        assert read_answers(sock, 1)[0].status == 200
        apply_routes(passthrough.gateway, passthrough.redis_url, [])  # the routes are gone
        sock.sendall(get("/echo/after"))
        (reply,) = read_answers(sock, 1)
    assert reply.status == 404 and "error" in json.loads(reply.body)


def test_an_unrelated_policy_change_keeps_the_splice(passthrough: Backend) -> None:
    with connect(passthrough.gateway) as sock:
        sock.sendall(get("/echo/before"))
        assert read_answers(sock, 1)[0].status == 200
        before = counters(passthrough.gateway)
        routes = set_document(passthrough.redis_url).model_dump(mode="json")["routes"]
        extra = {"prefix": "/other/", "service": passthrough.service, "public": True}
        apply_routes(passthrough.gateway, passthrough.redis_url, [*routes, extra])
        sock.sendall(get("/echo/after"))
        (reply,) = read_answers(sock, 1)
    assert json.loads(reply.body)["path"] == "/echo/after"
    after = counters(passthrough.gateway)
    assert (after["connections"], after["requests"]) == (
        before["connections"],
        before["requests"] + 1,
    )


def test_a_passthrough_route_must_be_public_and_keep_its_prefix(passthrough: Backend) -> None:
    document = {"routes": [{"prefix": "/x/", "service": "svc", "passthrough": True}]}
    reply = as_admin.post(f"{passthrough.gateway}/admin/policy/validate", json=document)
    assert reply.status_code == 422
    assert "passthrough" in reply.text
