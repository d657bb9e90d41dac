"""What the proxy's fast path takes as its own (`webapi.fastpath.parse_request`): only
whole, plainly framed HTTP/1.1 `/svc/` requests; everything else stays Sanic's."""

from __future__ import annotations

import time

import pytest
from sanic.helpers import has_message_body

from common.errors import ConfigError
from common.forwarding import MAX_VIA_HOPS, hop_headers_out, strip_hop_by_hop_raw
from common.settings import Settings
from webapi.fastpath import MAX_FAST_BODY, Parsed, parse_request
from webapi.fastpath.head import upstream_head
from webapi.fastpath.request import Incomplete, parse_head
from webapi.fastpath.response import CHUNKED, KEPT, NONE, WHOLE, bodiless_framing, client_head
from webapi.proxy.headers import build_request_head

pytestmark = pytest.mark.timeout(10)

GET = b"GET /svc/web/a/b?q=1 HTTP/1.1\r\nHost: gw\r\nX-Api-Key: k\r\n\r\n"


def test_a_plain_request_is_taken_with_its_headers_as_sanic_reads_them() -> None:
    parsed = parse_request(GET + b"GET /svc/web/next HTTP/1.1\r\n")
    assert isinstance(parsed, Parsed)
    assert parsed.size == len(GET)  # only the first of two pipelined requests
    assert (parsed.method, parsed.service, parsed.target) == ("GET", "web", "/a/b?q=1")
    assert parsed.headers == [(b"host", b"gw"), (b"x-api-key", b"k")]
    assert parsed.first == {b"host": "gw", b"x-api-key": "k"}
    assert parsed.keep_alive and parsed.body is None


def test_a_small_body_is_taken_whole_and_a_partial_one_is_waited_for() -> None:
    post = b"POST /svc/web/up HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello"
    parsed = parse_request(post)
    assert isinstance(parsed, Parsed)
    assert (parsed.body, parsed.size) == (b"hello", len(post))
    incomplete = parse_request(post[:-2])
    assert isinstance(incomplete, Incomplete) and incomplete.needed == len(post)
    big = f"POST /svc/web/up HTTP/1.1\r\nContent-Length: {MAX_FAST_BODY + 1}\r\n\r\n"
    assert parse_request(big.encode() + b"x" * (MAX_FAST_BODY + 1)) is None


@pytest.mark.parametrize(
    "raw",
    [
        GET[:30],  # the head is not whole
        GET.replace(b"\r\n", b"\n"),  # bare LF
        GET.replace(b"HTTP/1.1", b"HTTP/1.0"),
        GET.replace(b"GET", b"TRACE"),
        GET.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        GET.replace(b"\r\n\r\n", b"\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"),
        GET.replace(b"\r\n\r\n", b"\r\nUpgrade: websocket\r\n\r\n"),
        GET.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"),
        GET.replace(b"\r\n\r\n", b"\r\nHost: other\r\n\r\n"),  # two Hosts
        GET.replace(b"\r\n\r\n", b"\r\n folded\r\n\r\n"),
        GET.replace(b"/svc/web/a/b", b"http://gw/svc/web/a/b"),  # absolute form
        GET.replace(b"/svc/web/a/b", b"/svc/web/"),  # the route needs a path after it
        GET.replace(b"/svc/web/a/b", b"/svc/web//a"),
        GET.replace(b"/svc/web/a/b", b"/svc/Web/a"),  # not a service name
        GET.replace(b"/svc/web/a/b", b"/svc/web/a/%2e%2e/b"),  # traversal: Sanic's 400
        GET.replace(b"/svc/web/a/b", b"/svc/web/a/..;x/b"),  # so is `..` with parameters
        GET.replace(b"/svc/web/a/b", b"/rpc/web/a"),
    ],
)
def test_anything_else_is_left_to_sanic(raw: bytes) -> None:
    assert parse_request(raw) is None


def test_a_request_the_gateway_has_marked_too_often_is_left_to_sanic() -> None:
    """Sanic's route answers it 508 `proxy_loop` (`refuse_loop`); fewer marks are the
    fast path's, and its head adds one more (as the route's builders do: the test below)."""
    marks = [b"Via: 1.1 switchboard"] * (MAX_VIA_HOPS - 1)
    fewer = GET.replace(b"Host: gw", b"\r\n".join([b"Host: gw", b"via: 1.0 edge", *marks]))
    parsed = parse_request(fewer)
    assert isinstance(parsed, Parsed)
    head = upstream_head(parsed, client_ip="127.0.0.9", scheme="http", request_id="rid-1")
    assert head.count(b"switchboard") == MAX_VIA_HOPS
    looped = fewer.replace(b"Host: gw", b"Host: gw\r\nVia: 1.0 edge, 1.1 switchboard")
    assert parse_request(looped) is None
    # Marks are whole received-by tokens: these are other proxies' (and a comment).
    others = b"Via: 1.1 switchboardX, 2 xswitchboard (1.1 switchboard)"
    assert isinstance(parse_request(fewer.replace(b"Host: gw", b"Host: gw\r\n" + others)), Parsed)


@pytest.mark.parametrize(
    "fields",
    [
        b"Authorization: Bearer sbk_key\r\nAuthorization: Bearer forged",
        b"X-Api-Key: sbk_a\r\nX-Api-Key: sbk_b",
        b"x-api-key: sbk_a\r\nAuthorization: Bearer forged",
    ],
)
def test_ambiguous_credential_fields_are_left_to_sanic(fields: bytes) -> None:
    """Sanic's `check_head` refuses them (400 `malformed_header`)."""
    raw = b"GET /svc/web/a HTTP/1.1\r\nHost: gw\r\n" + fields + b"\r\n\r\n"
    assert parse_request(raw) is None
    same = b"GET /svc/web/a HTTP/1.1\r\nHost: gw\r\nX-Api-Key: k\r\nAuthorization: Bearer k\r\n\r\n"
    assert isinstance(parse_request(same), Parsed)


def test_a_refused_requests_fields_are_read_from_any_whole_head_only() -> None:
    # (`parse_head`: the client's address of a refusal the fast path makes itself)
    xff = b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 10.0.0.1\r\n"
    upgrade = b"GET /ws/ HTTP/1.1\r\nHost: gw\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
    for head in (b"POST /static/a HTTP/1.1\r\nHost: gw\r\nContent-Length: 9\r\n", upgrade):
        parsed = parse_head(head + xff + b"\r\n{")
        assert parsed is not None
        assert parsed.header_values("x-forwarded-for") == ["203.0.113.7", "10.0.0.1"]
    assert parse_head(b"GET /static/a HTTP/1.1\r\n" + xff) is None  # not whole yet
    assert parse_head(b"GET /a HTTP/1.1\r\nBad Name: x\r\n\r\n") is None


def test_connection_is_read_as_a_list_of_tokens() -> None:
    # As `common.strict_http` reads it on Sanic's path: only a `close` token closes.
    def keep_alive(*fields: bytes) -> bool:
        head = b"".join(b"\r\nConnection: " + field for field in fields)
        parsed = parse_request(GET.replace(b"\r\n\r\n", head + b"\r\n\r\n"))
        assert isinstance(parsed, Parsed)
        return parsed.keep_alive

    assert not keep_alive(b"close")
    assert not keep_alive(b"x-secret, Close")
    assert not keep_alive(b"keep-alive", b"te,close")
    assert keep_alive(b"x-secret")
    assert keep_alive(b"keep-alive, x-secret")
    assert keep_alive(b"x-closed, unclose")


def test_the_switch() -> None:
    assert Settings.from_env({}).proxy_fast_path is True
    assert Settings.from_env({"PROXY_FAST_PATH": "off"}).proxy_fast_path is False
    assert Settings.from_env({"PROXY_FAST_PATH": "1"}).proxy_fast_path is True
    with pytest.raises(ConfigError, match="PROXY_FAST_PATH"):
        Settings.from_env({"PROXY_FAST_PATH": "maybe"})


# Requests whose upstream heads the route's builders make too (also `test_c_heads.py`'s corpus).
ROUTE_CASES: list[tuple[str, list[str], bytes]] = [
    ("GET", [], b""),
    ("GET", ["Authorization: Bearer sbk_abc.def", "Accept: */*"], b""),
    ("GET", ["X-Api-Key: sbk_x", "Authorization: Bearer sbk_x"], b""),
    ("GET", ["Authorization: Bearer eyJhbGciOi.jwt.sig"], b""),
    (
        "GET",
        [
            "X-Secret: s",
            "Connection: X-Secret, Close",
            "x-other: o",
            "connection: X-OTHER",
            "Close: c",
            "X-Kept: k",
        ],
        b"",
    ),
    (
        "GET",
        [
            "Connection: keep-alive, X-Secret",
            "X-Secret: s",
            "Keep-Alive: 5",
            "TE: trailers",
            "Proxy-Authorization: Basic eA==",
            "Trailer: x",
        ],
        b"",
    ),
    (
        "GET",
        [
            "X-Forwarded-For: 10.0.0.1",
            "X-Forwarded-For: 10.0.0.2, 10.0.0.3",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: evil",
            "X-Request-Id: theirs",
        ],
        b"",
    ),
    (
        "GET",
        [
            "Forwarded: for=6.6.6.6;proto=https",
            "X-Real-IP: 6.6.6.6",
            "X-Client-IP: 6.6.6.6",
            "True-Client-IP: 6.6.6.6",
            "X-Forwarded-Port: 443",
            "x-forwarded-prefix: /admin",
            "X-Forwarded-For: 6.6.6.6",
            "X-Tenant: acme",
        ],
        b"",
    ),
    ("GET", ["User-Agent: caf\xc3\xa9/1.0 \xff", "X-Empty: "], b""),
    ("POST", ["Content-Type: application/json"], b'{"a": 1}'),
    ("POST", [], b""),
    ("PUT", ["Content-Length: 0"], b""),
    ("DELETE", [], b""),
    ("GET", ["Content-Length: 0"], b""),
]


def case_request(method: str, fields: list[str], body: bytes) -> bytes:
    """A `ROUTE_CASES` case as the request bytes: `/svc/web/a/b?q=1`, Host `gw.example`."""
    lines = [f"{method} /svc/web/a/b?q=1 HTTP/1.1", "Host: gw.example", *fields]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


@pytest.mark.parametrize(("method", "fields", "body"), ROUTE_CASES)
def test_the_upstream_head_is_the_routes(method: str, fields: list[str], body: bytes) -> None:
    """`upstream_head` (bytes, the fast path) builds what the `/svc/` route's builders
    (`hop_headers_out`, `build_request_head`) build."""
    parsed = parse_request(case_request(method, fields, body))
    assert isinstance(parsed, Parsed)
    ours = upstream_head(parsed, client_ip="127.0.0.9", scheme="http", request_id="rid-1")
    as_sanic = [(name.decode(), value.decode("utf-8", "surrogateescape"))
                for name, value in parsed.headers]  # fmt: skip
    headers = hop_headers_out(as_sanic, client_ip="127.0.0.9", scheme="http",
                              host="gw.example", request_id="rid-1", upstream="web")  # fmt: skip
    routes, _, _ = build_request_head(method, "/a/b?q=1", headers, "unused:1", body or None)
    assert ours == routes


_UPSTREAM = [(b"Server", b"nginx"), (b"Content-Type", b"application/json"),
             (b"Content-Length", b"64"), (b"Connection", b"keep-alive")]  # fmt: skip


# Upstream response fields (also `test_c_heads.py`'s corpus).
UPSTREAM_FIELDS = [
    _UPSTREAM,
    [
        *_UPSTREAM,
        (b"Connection", b"X-Secret"),
        (b"x-secret", b"1"),
        (b"Proxy-Foo", b"1"),
        (b"X-Request-Id", b"upstream"),
    ],
    [
        (b"Content-Length", b"3"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"x"),
        (b"connection", b"close"),
        (b"Trailer", b"x"),
        (b"Upgrade", b"h2c"),
    ],
]


@pytest.mark.parametrize("fields", UPSTREAM_FIELDS)
@pytest.mark.parametrize("framing", [WHOLE, KEPT, CHUNKED, NONE])
def test_the_client_head_keeps_what_the_general_filter_keeps(
    fields: list[tuple[bytes, bytes]], framing: int
) -> None:
    """`client_head`'s one-pass filter drops what `strip_hop_by_hop_raw` drops, then
    adds the gateway's fields and the framing."""
    head = client_head(201, fields, framing=framing, length=7, upstream_seconds=0.002,
                       received=time.perf_counter(), instance_id="web-1", request_id="rid",
                       keep_alive=False)  # fmt: skip
    assert head.startswith(b"HTTP/1.1 201 Created\r\n") and head.endswith(b"\r\n\r\n")
    lines = [tuple(line.split(b": ", 1)) for line in head[:-4].split(b"\r\n")[1:]]
    framed = {WHOLE: [(b"content-length", b"7")], CHUNKED: [(b"transfer-encoding", b"chunked")]}
    ours = [*framed.get(framing, []), (b"connection", b"close")]
    assert lines[-len(ours) :] == ours
    assert lines[-len(ours) - 2 : -len(ours)] == [(b"X-Upstream-Instance", b"web-1"),
                                                  (b"X-Request-Id", b"rid")]  # fmt: skip
    assert lines[-len(ours) - 4][0] == b"X-Upstream-Latency"
    replaced = {b"x-request-id"} if framing == KEPT else {b"content-length", b"x-request-id"}
    assert lines[: -len(ours) - 4] == strip_hop_by_hop_raw(fields, frozenset(replaced))


def test_a_response_is_bodiless_exactly_when_sanic_says() -> None:
    """`bodiless_framing` reads the status as Sanic's `has_message_body` (inlined: that
    one is a Python call per request in the compiled fast path)."""
    for status in range(100, 600):
        expected = None if has_message_body(status) else NONE  # type: ignore[no-untyped-call]
        assert bodiless_framing("GET", status) == expected
        assert bodiless_framing("HEAD", status) == KEPT
