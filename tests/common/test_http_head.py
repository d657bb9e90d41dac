"""`common.http_head.head_fault`: what a request head may hold before the gateway or the
websocket service reads it. The refusals are tested end to end in
tests/webapi/test_proxy_malformed.py and tests/websocket/test_ws_malformed.py; here,
that nothing HTTP allows is refused (a false refusal would drop real traffic), and
that a refusal says where, never what. Also `connection_tokens`: how every reader of
`Connection` splits it."""

from __future__ import annotations

import pytest

from common.http_head import connection_tokens, connection_tokens_raw, head_fault

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@pytest.mark.parametrize(
    "head",
    [
        b"",  # Sanic's stand-in for a head it could not parse
        b"GET / HTTP/1.1\r\nHost: x",
        b"GET / HTTP/1.0",  # HTTP/1.0 needs no Host
        b"GET /svc/a/b?q=1&r=%20 HTTP/1.1\r\nHost: x\r\nX-Empty:\r\nX-Tab:\ta\tb ",
        b"POST /x HTTP/1.1\r\nHost: x\r\n" + TOKEN_CHARS.encode() + b": v",
        "GET / HTTP/1.1\r\nHost: x\r\nX-Name: Zoë, 東京".encode(),  # obs-text: above 0x7f
        b'GET / HTTP/1.1\r\nCookie: a=1; b="2"\r\nAccept: */*;q=0.8, text/html\r\nHOST: x',
        b"POST / HTTP/1.1\r\ncontent-LENGTH:\t12 \r\nHost: x",
        # Host: a reg-name (sub-delims, percent-encoding), IPv4, IPv6 literal, a port, empty.
        b"GET / HTTP/1.1\r\nHost: my-host_1.example~!$&'()*+;=%41:8080",
        b"GET / HTTP/1.1\r\nHost: 10.0.0.1",
        b"GET / HTTP/1.1\r\nHost: [::1]:8000",
        b"GET / HTTP/1.1\r\nHost:",
    ],
)
def test_what_http_allows_passes(head: bytes) -> None:
    assert head_fault(head) is None


@pytest.mark.parametrize(
    ("head", "says"),
    [
        (b"GET / HTTP/1.1\r\nTransfer-Encoding : chunked", "field name 'Transfer-Encoding '"),
        (b"GET / HTTP/1.1\r\nX-A: a\nTransfer-Encoding: chunked", "value of header 'X-A'"),
        (b"GET / HTTP/1.1\r\nX-A: a\rb\r\nHost: x", "value of header 'X-A'"),
        (b"GET / HTTP/1.1\r\nX-A: a\x00b", "value of header 'X-A'"),
        (b"GET / HTTP/1.1\r\nX-A: a\x7f", "value of header 'X-A'"),
        (b"GET / HTTP/1.1\r\nX-A: a\r\n folded", "without a colon"),
        (b"GET / HTTP/1.1\r\n: no name", "field name ''"),
        (b"GET /\x01 HTTP/1.1\r\nHost: x", "in the request line"),
        ("POST / HTTP/1.1\r\nContent-Length: \u0665".encode(), "Content-Length is not"),
        (b"POST / HTTP/1.1\r\nContent-Length: 0x5", "Content-Length is not"),
        # Host (RFC 9112 §3.2): exactly one in HTTP/1.1, and a host with an optional port.
        (b"GET / HTTP/1.1", "needs a Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nhost: b", "more than one Host"),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHost: a", "more than one Host"),
        (b"GET / HTTP/1.1\r\nHost: a b", "Host is not"),
        (b"GET / HTTP/1.1\r\nHost: user@a", "Host is not"),
        (b"GET / HTTP/1.1\r\nHost: a, b", "Host is not"),
        (b"GET / HTTP/1.1\r\nHost: a:8x", "Host is not"),
        # HTTP/1.0 has no transfer codings (RFC 9112 §6.1).
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked", "HTTP/1.0"),
    ],
)
def test_what_http_forbids_is_refused_saying_where(head: bytes, says: str) -> None:
    fault = head_fault(head)
    assert fault is not None and says in fault


def test_the_refusal_never_repeats_a_value() -> None:
    """The message is logged: a credential in a malformed field must not be in it."""
    secret = "sbk_0123456789_secretsecretsecret"
    for head in (
        f"GET / HTTP/1.1\r\nX-Api-Key: {secret}\x00",
        f"GET / HTTP/1.1\r\nX-Api-Key : {secret}",
        f"GET / HTTP/1.1\r\nX-Api-Key: x\r\n {secret}",
        f"GET /?key={secret}\x01 HTTP/1.1",
    ):
        fault = head_fault(head.encode())
        assert fault is not None and "secret" not in fault


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        ("close", ["close"]),
        ("Keep-Alive, X-Foo", ["keep-alive", "x-foo"]),
        (" TE ,\tCLOSE,", ["te", "close", ""]),  # (an empty element names nothing)
    ],
)
def test_connection_tokens_are_the_lists_elements_in_lower_case(
    value: str, tokens: list[str]
) -> None:
    assert connection_tokens(value) == tokens
    assert connection_tokens_raw(value.encode()) == [t.encode() for t in tokens]


@pytest.mark.parametrize("value", ["close\u00a0", "X-Foo\u00a0", "\u212aeep-alive", "cl\u0130se"])
def test_connection_tokens_read_alike_as_text_and_as_bytes(value: str) -> None:
    # Sanic's path reads the field as text (UTF-8), the fast path as bytes: only HTTP's
    # whitespace (space, tab) and ASCII case may count, or `close` plus a no-break space
    # closed the connection on one path and kept it on the other, and a Kelvin sign
    # made `keep-alive` of a token on one only.
    raw = value.encode()
    assert connection_tokens(value) == [t.decode() for t in connection_tokens_raw(raw)]
    assert not {"close", "keep-alive", "x-foo"} & set(connection_tokens(value))
