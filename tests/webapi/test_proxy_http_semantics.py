"""HTTP semantics the gateway keeps when it relays: HEAD, HTTP/1.0 clients, an answer
without Content-Type, transfer codings, Host, `Expect: 100-continue`, request targets
Sanic cannot parse, bare LFs, dot segments with parameters, and `Connection: close` on
pass-through routes.

The instance is a scripted upstream in the test's own loop, registered straight into
the registry. `/rel/` is a normal public route of it (always Sanic's route: the fast
path takes `/svc/` only), `/thru/` a pass-through route. The raw socket exchanges run
in a thread, since the instance runs in this loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.policy import update_document, wait_applied
from tests.support.raw_http import Answer, closed_by_peer, connect, read_answers
from tests.support.registry import registered
from tests.webapi.conftest import as_admin, gateway_process
from tests.webapi.upstream_servers import Peer, Upstream, ok

pytestmark = pytest.mark.timeout(120)

BODY = b"hello world"


async def _instance(peer: Peer) -> None:
    """`HEAD` gets the GET's head (Content-Length 11, no body); `.../chunked` a chunked
    answer; `.../untyped` no Content-Type; `.../gzip` a `gzip, chunked` coding;
    `.../closing` says `Connection: close` and closes; the rest `ok(BODY)` with a type."""
    async for req in peer.requests():
        last = req.target.rsplit("/", 1)[-1]
        if req.method == "HEAD":
            await peer.send(
                b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\n"
            )
        elif last == "chunked":
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")  # fmt: skip
        elif last == "untyped":
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + BODY)
        elif last == "gzip":
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                            b"4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n")  # fmt: skip
        elif last == "closing":
            await peer.send(ok(BODY, "Connection: close"))
            peer.close()
            return
        else:
            await peer.send(ok(BODY, "Content-Type: text/plain"))


@dataclass
class Relayed:
    gateway: str
    service: str
    instance: Upstream

    def exchange(self, data: bytes, answers: int = 1) -> tuple[list[Answer], bool]:
        """Send `data` on a new connection: its answers, and whether the gateway then
        closed the connection (within 3 s)."""
        with connect(self.gateway) as sock:
            sock.sendall(data)
            got = read_answers(sock, answers)
            return got, closed_by_peer(sock, 3)

    def head_then_get(self, path: str) -> tuple[bytes, Answer]:
        """HEAD `path`, then GET it on the same connection: the HEAD's answer (all
        bytes that came before the GET was sent) and the GET's."""
        with connect(self.gateway) as sock:
            sock.sendall(_get(path, method="HEAD"))
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += sock.recv(65536)
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                head += sock.recv(65536)  # a body that should not be there
            sock.settimeout(10)
            sock.sendall(_get(path))
            return head, read_answers(sock, 1)[0]

    def raw(self, data: bytes) -> bytes:
        """Send `data` on a new connection; every byte until the gateway closes it."""
        with connect(self.gateway) as sock:
            sock.sendall(data)
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            return out

    def errors(self) -> list[str]:
        """The gateway's log lines at level error."""
        path = gateway_process(self.gateway).log_path
        return [line for line in path.read_text().splitlines() if '"level": "error"' in line]


@pytest.fixture
async def relayed(gateway: str, redis_url: str) -> AsyncIterator[Relayed]:
    service = f"sem{uuid.uuid4().hex[:6]}"
    routes: list[dict[str, Any]] = [
        {"prefix": "/rel/", "service": service, "public": True},
        {"prefix": "/thru/", "service": service, "public": True, "strip_prefix": False,
         "passthrough": True},
    ]  # fmt: skip
    async with (
        Upstream(_instance) as instance,
        registered(redis_url, service, {f"{service}-a": instance.address}),
    ):
        doc = await update_document(redis_url, routes=routes)
        try:
            await asyncio.to_thread(wait_applied, gateway, doc.version)
            yield Relayed(gateway, service, instance)
        finally:
            await update_document(redis_url, routes=[])


def _get(path: str, *fields: str, method: str = "GET", version: str = "1.1") -> bytes:
    head = [f"{method} {path} HTTP/{version}", "Host: gateway.test", *fields]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


def _head_and_body(raw: bytes) -> tuple[str, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.decode().lower(), body


async def test_head_on_sanic_route_says_the_instances_length_and_logs_no_error(
    relayed: Relayed,
) -> None:
    errors = len(relayed.errors())
    head, after = await asyncio.to_thread(relayed.head_then_get, "/rel/page")
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\ncontent-length: 11\r\n" in head.lower()
    assert (after.status, after.body) == (200, BODY)  # no body came between the two
    assert relayed.errors()[errors:] == []


async def test_an_http10_client_never_gets_chunked(relayed: Relayed) -> None:
    raw = await asyncio.to_thread(relayed.raw, _get("/rel/chunked", version="1.0"))
    head, body = _head_and_body(raw)
    assert "transfer-encoding" not in head and "content-length" not in head
    assert "connection: close" in head and body == BODY  # delimited by the close
    # An answer of known length keeps it.
    raw = await asyncio.to_thread(relayed.raw, _get("/rel/sized", version="1.0"))
    head, body = _head_and_body(raw)
    assert "content-length: 11" in head and "transfer-encoding" not in head
    assert body == BODY


async def test_the_instances_length_is_kept_and_no_content_type_invented(
    relayed: Relayed,
) -> None:
    (answer,), _ = await asyncio.to_thread(relayed.exchange, _get("/rel/untyped"))
    assert answer.headers["content-length"] == "11" and "transfer-encoding" not in answer.headers
    assert "content-type" not in answer.headers and answer.body == BODY


async def test_a_transfer_coding_other_than_chunked_is_a_502(relayed: Relayed) -> None:
    (answer,), _ = await asyncio.to_thread(relayed.exchange, _get("/rel/gzip"))
    assert answer.status == 502
    assert json.loads(answer.body)["error"]["code"] == "upstream_failed"


_HOSTS = {
    "none": ("",),
    "two": ("Host: gateway.test", "Host: other.test"),
    "a space": ("Host: gateway.test other",),
    "userinfo": ("Host: user@other.test",),
    "a list": ("Host: gateway.test, other.test",),
}


# (Not on a pass-through route: the splice relays Host for the instance to judge, as
# behind nginx's `stream` module; `webapi.passthrough`.)
@pytest.mark.parametrize("path", ["/rel/x", "/svc/{service}/x"])
@pytest.mark.parametrize("host", list(_HOSTS))
async def test_a_request_without_exactly_one_valid_host_is_refused(
    relayed: Relayed, path: str, host: str
) -> None:
    fields = [f for f in _HOSTS[host] if f] + [f"{k}: {v}" for k, v in as_admin.headers.items()]
    target = path.format(service=relayed.service)
    data = ("\r\n".join([f"GET {target} HTTP/1.1", *fields]) + "\r\n\r\n").encode()
    seen = len(relayed.instance.requests)
    (answer,), closed = await asyncio.to_thread(relayed.exchange, data)
    assert answer.status == 400 and closed
    assert json.loads(answer.body)["error"]["code"] == "malformed_header"
    assert len(relayed.instance.requests) == seen  # nothing reached the instance


@pytest.mark.parametrize("path", ["/rel/x", "/thru/x"])
async def test_http10_with_transfer_encoding_is_refused(relayed: Relayed, path: str) -> None:
    data = _get(path, "Transfer-Encoding: chunked", method="POST", version="1.0")
    seen = len(relayed.instance.requests)
    (answer,), closed = await asyncio.to_thread(relayed.exchange, data + b"5\r\nhello\r\n0\r\n\r\n")
    assert (answer.status, closed) == (400, True)
    assert len(relayed.instance.requests) == seen


async def test_pass_through_refuses_http10_keep_alive_with_transfer_encoding(
    relayed: Relayed,
) -> None:
    # `should_keep_alive()` is true for it, so it reaches the splice's parser; an instance
    # that takes HTTP/1.0 as having no transfer coding would read the body as requests.
    post = _get("/thru/x", "Connection: keep-alive", "Transfer-Encoding: chunked",
                method="POST", version="1.0")  # fmt: skip
    body = b"5\r\nhello\r\n0\r\n\r\n"
    seen = len(relayed.instance.requests)
    # The connection's first request: Sanic's route refuses it.
    (answer,), closed = await asyncio.to_thread(relayed.exchange, post + body)
    assert (answer.status, closed) == (400, True)
    # Pipelined behind a route request in one read: that one is spliced, then Sanic's
    # route refuses this one.
    answers, closed = await asyncio.to_thread(relayed.exchange, _get("/thru/a") + post + body, 2)
    assert [a.status for a in answers] == [200, 400] and closed
    assert len(relayed.instance.requests) == seen + 1  # /thru/a only

    # Its head in one read, its body in the next: the head went upstream, but not the
    # body (no chunk reaches the instance) and the connection closes.
    def split() -> tuple[int, bool]:
        with connect(relayed.gateway) as sock:
            sock.sendall(_get("/thru/b"))
            status = read_answers(sock, 1)[0].status
            sock.sendall(post)
            time.sleep(0.3)  # (two reads: the gateway has the head before the body)
            sock.sendall(body)
            return status, closed_by_peer(sock, 3)

    assert await asyncio.to_thread(split) == (200, True)
    assert [r.body for r in relayed.instance.requests[seen:]] == [b"", b""]  # the GETs


async def test_pass_through_honours_connection_close(relayed: Relayed) -> None:
    # The client's `Connection: close`, and an HTTP/1.0 request: closed after the answer.
    for data in (_get("/thru/a", "Connection: close"), _get("/thru/b", version="1.0")):
        raw = await asyncio.to_thread(relayed.raw, data)  # (returns at the close)
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(BODY)
    # The instance's `Connection: close`, relayed as is: the gateway closes too.
    (answer,), closed = await asyncio.to_thread(relayed.exchange, _get("/thru/closing"))
    assert (answer.status, answer.headers["connection"], closed) == (200, "close", True)
    # Keep-alive otherwise.
    _, closed = await asyncio.to_thread(relayed.exchange, _get("/thru/c"))
    assert not closed


async def test_no_100_continue_before_a_refusal(relayed: Relayed) -> None:
    data = _get(f"/svc/{relayed.service}/x", "X-Api-Key: sbk_not-a-key",
                "Content-Length: 1000", "Expect: 100-continue", method="POST")  # fmt: skip
    raw = await asyncio.to_thread(relayed.raw, data)  # the body is never sent
    assert raw.startswith(b"HTTP/1.1 401 ")  # no `100 Continue` first; then the close


@pytest.mark.parametrize("line", ["GET /rel/a\tb HTTP/1.1", "GET /health\t HTTP/1.1",
                                  "CONNECT 127.0.0.1:22 HTTP/1.1"])  # fmt: skip
async def test_a_target_sanic_cannot_parse_gets_a_json_400(relayed: Relayed, line: str) -> None:
    errors = len(relayed.errors())
    data = f"{line}\r\nHost: gateway.test\r\n\r\n".encode()
    (answer,), closed = await asyncio.to_thread(relayed.exchange, data)
    assert answer.status == 400 and closed
    error = json.loads(answer.body)["error"]
    assert error["code"] == "bad_request" and "\t" not in error["message"]
    assert relayed.errors()[errors:] == []


async def test_chunk_data_not_ended_by_crlf_cuts_the_upload(relayed: Relayed) -> None:
    # The first chunk is whole and goes upstream (the body streams); the bytes after it
    # are not the CRLF that must end it. (The shared table's chunk cases fail at the
    # first chunk, before anything is sent.)
    data = _get("/rel/upload", "Transfer-Encoding: chunked", method="POST")
    seen = len(relayed.instance.requests)
    (answer,), closed = await asyncio.to_thread(relayed.exchange, data + b"5\r\nhelloXX0\r\n\r\n")
    assert (answer.status, closed) == (400, True)
    assert json.loads(answer.body)["error"]["code"] == "bad_request"
    assert len(relayed.instance.requests) == seen  # no whole request reached it


@pytest.mark.parametrize("path", ["/rel/up", "/thru/up", "/svc/{service}/up"])
@pytest.mark.parametrize("body", [b"5\nhello\n0\n\n", b"5\r\nhello\r\n0\r\n\n"])
async def test_a_bare_lf_in_chunked_framing_is_a_prompt_400(
    relayed: Relayed, path: str, body: bytes
) -> None:
    # Ending a size line or the body: refused as it arrives. (Sanic waited for a CRLF
    # until its response timeout, then answered 503 and left the connection open.)
    credential = [f"{k}: {v}" for k, v in as_admin.headers.items()]
    data = _get(path.format(service=relayed.service), "Transfer-Encoding: chunked",
                *credential, method="POST")  # fmt: skip
    seen, errors = len(relayed.instance.requests), len(relayed.errors())
    (answer,), closed = await asyncio.to_thread(relayed.exchange, data + body)
    assert (answer.status, closed) == (400, True)
    assert json.loads(answer.body)["error"]["code"] == "bad_request"
    assert len(relayed.instance.requests) == seen  # no whole request reached it
    assert relayed.errors()[errors:] == []


@pytest.mark.parametrize("path", ["/rel/x", "/thru/x", "/svc/{service}/x"])
async def test_a_head_of_bare_lf_lines_is_a_prompt_400(relayed: Relayed, path: str) -> None:
    # (Sanic waited for a CRLF CRLF until its request timeout, then answered 408.)
    credential = "".join(f"{k}: {v}\n" for k, v in as_admin.headers.items())
    target = path.format(service=relayed.service)
    data = f"GET {target} HTTP/1.1\nHost: gateway.test\n{credential}\n".encode()
    seen = len(relayed.instance.requests)
    (answer,), closed = await asyncio.to_thread(relayed.exchange, data)
    assert (answer.status, closed) == (400, True)
    assert json.loads(answer.body)["error"]["code"] == "bad_request"
    assert len(relayed.instance.requests) == seen


@pytest.mark.parametrize("path", ["/rel/a/..;/x", "/rel/a/%2e%2e;x/x", "/thru/..;/x"])
async def test_a_dot_segment_with_parameters_is_refused(relayed: Relayed, path: str) -> None:
    # An instance that drops a segment's `;...` before resolving dot segments (Tomcat,
    # Jetty, Spring) would read `/x`: another route's path, perhaps a credential one.
    seen = len(relayed.instance.requests)
    (answer,), _ = await asyncio.to_thread(relayed.exchange, _get(path))
    assert (answer.status, json.loads(answer.body)["error"]["code"]) == (400, "invalid_path")
    assert len(relayed.instance.requests) == seen


async def test_a_transfer_coding_name_is_read_ignoring_case(relayed: Relayed) -> None:
    # RFC 9112 §7: `Chunked` is chunked (Sanic compared it exactly: a 400 "Bad
    # content-length"); `Chunked ` too (a field value's trailing space is not its own).
    for coding in ("Chunked", "CHUNKED ", "chunked"):
        seen = len(relayed.instance.requests)
        data = _get("/rel/up", f"Transfer-Encoding: {coding}", method="POST")
        (answer,), _ = await asyncio.to_thread(relayed.exchange, data + b"2\r\nhi\r\n0\r\n\r\n")
        assert answer.status == 200, coding
        assert relayed.instance.requests[seen].body == b"hi"


@pytest.mark.parametrize("path", ["/rel/x?q=1", "/thru/x?q=1", "/svc/{service}/x?q=1"])
async def test_an_absolute_form_target_is_proxied_as_its_path(relayed: Relayed, path: str) -> None:
    target = "http://gateway.test" + path.format(service=relayed.service)
    credential = [f"{k}: {v}" for k, v in as_admin.headers.items()]
    seen = len(relayed.instance.requests)
    (answer,), _ = await asyncio.to_thread(relayed.exchange, _get(target, *credential))
    assert (answer.status, answer.body) == (200, BODY)
    # The instance got the origin form: the route's path (its prefix stripped or not).
    got = relayed.instance.requests[seen].target
    assert got in ("/x?q=1", "/thru/x?q=1"), got
