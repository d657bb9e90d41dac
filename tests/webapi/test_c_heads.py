"""The fast path's two heads in C (`webapi/fastpath/_cheads.c`) against their Python
references, `webapi.fastpath.head.upstream_head` and `webapi.fastpath.response.client_head`,
which are the oracle here: wherever the C answers, its bytes are the Python's, and it
answers every ordinary head (it may decline, None, only what its docstring lists).

The C is reached through the glue (`head._C`, `response._C`, set to a spy that records
what the C answered), so the arguments the glue passes are tested too. The Python's
clock is fixed (`response.perf_counter`, which `client_head` reads): the latencies
are compared to the last digit.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import random
import struct
import sys
import types
from collections.abc import Callable

import pytest

from tests.webapi.cheads_fixtures import (  # noqa: F401  (the fixtures `cheads`, `heads`)
    Heads,
    Spy,
    _same,
    both_heads,
    c_heads,
)
from tests.webapi.test_fastpath_request import ROUTE_CASES, UPSTREAM_FIELDS, case_request
from webapi.fastpath import Parsed, head, parse_request
from webapi.fastpath.response import CHUNKED, KEPT, NONE, WHOLE

pytestmark = pytest.mark.timeout(60)


# The corpus: ordinary heads, which the C must build.

ORDINARY_REQUESTS = [
    b"GET /svc/web/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sbk_k\r\n\r\n",
    b"GET /svc/web/a?b=c&d=%20 HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: wrk\r\n"
    b"Accept: */*\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n"
    b"X-Api-Key: sbk_abc\r\nX-Request-Id: 7f3c\r\n\r\n",
    b"POST /svc/orders/v1/items HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: "
    b"application/json\r\nContent-Length: 13\r\nAuthorization: Bearer eyJ.a.b\r\n"
    b'Cookie: a=1; b=2\r\nVia: 1.1 edge\r\n\r\n{"x": [1, 2]}',
    b"PATCH /svc/web/p HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
    b"DELETE /svc/web/d HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 1.1.1.1\r\n"
    b"X-Forwarded-For: 2.2.2.2\r\nX-Forwarded-Proto: https\r\n\r\n",
    b"OPTIONS /svc/web/o HTTP/1.1\r\nHost: gw\r\nOrigin: https://x\r\n"
    b"Access-Control-Request-Method: PUT\r\n\r\n",
    b"HEAD /svc/web/h HTTP/1.1\r\nHost: [::1]:80\r\nAccept-Language: fr, en;q=0.5\r\n\r\n",
]


def test_the_route_cases_and_ordinary_requests_are_built_in_c_alike(heads: Heads) -> None:
    requests = [case_request(*case) for case in ROUTE_CASES] + ORDINARY_REQUESTS
    for raw in requests:
        parsed = parse_request(raw)
        assert isinstance(parsed, Parsed), raw
        for ip, scheme, rid in [("127.0.0.9", "http", "rid-1"), ("::1", "https", "a" * 64)]:
            _same(*heads.upstream(parsed, ip, scheme, rid), must_answer=True)
    assert len(heads.spy.answers) == 1  # (the last one; each call checked its own)


@pytest.mark.parametrize("fields", UPSTREAM_FIELDS)
@pytest.mark.parametrize("framing", [WHOLE, KEPT, CHUNKED, NONE])
def test_the_upstream_fields_cases_are_built_in_c_alike(
    heads: Heads, fields: list[tuple[bytes, bytes]], framing: int
) -> None:
    # Only an upstream `Connection` naming fields is declined: the Python's second pass.
    names_fields = (b"Connection", b"X-Secret") in fields
    for status in (200, 201, 204, 301, 304, 404, 500, 502, 503):
        for keep_alive in (True, False):
            answer, oracle = heads.client(status, fields, framing=framing, keep_alive=keep_alive)
            assert _same(answer, oracle, must_answer=not names_fields) != names_fields


def test_an_ordinary_response_head_is_built_in_c_alike(heads: Heads) -> None:
    fields = [(b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"), (b"Content-Type", b"text/html"),
              (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"ETag", b'"x"'),
              (b"Cache-Control", b"no-cache"), (b"Vary", b"Accept-Encoding"),
              (b"Content-Length", b"1234"), (b"CONNECTION", b"Keep-Alive"),
              (b"Keep-Alive", b"timeout=5, max=100"), (b"x-request-id", b"theirs")]  # fmt: skip
    for framing, length in [(WHOLE, 1234), (WHOLE, 0), (KEPT, 0), (CHUNKED, 0), (NONE, 0)]:
        for seconds, received in [(0.000412, 999.9993), (1.5, 998.0), (0.0, 1000.0)]:
            _same(*heads.client(200, fields, framing=framing, length=length,
                                upstream_seconds=seconds, received=received),
                  must_answer=True)  # fmt: skip


# What it declines.


def test_what_the_c_declines_the_python_answers(heads: Heads) -> None:
    parsed = parse_request(ORDINARY_REQUESTS[1])
    assert isinstance(parsed, Parsed)
    declined = [
        heads.upstream(parsed, ip="10.0.0.\u0661"),  # not ASCII: the Python's strict encode
        heads.upstream(parsed, rid="r\xe9"),
        heads.client(799, []),  # no status line of Sanic's
        heads.client(200, [(b"Connection", b"x-a, close"), (b"X-A", b"1")]),
        heads.client(200, [], framing=WHOLE, length=2**70),
        heads.client(200, [(b"a", bytearray(b"b"))]),  # type: ignore[list-item]
        heads.client(200, [(b"a", b"b", b"c")]),  # type: ignore[list-item]
        heads.client(200, [], instance_id="web-\u00e9"),
    ]
    for answer, oracle in declined:
        assert answer is None
        assert oracle is TypeError or isinstance(oracle, bytes) or oracle is UnicodeEncodeError
    # A target the Python cannot encode: it raises, and the C leaves that to it.
    parsed.target = "/\ud800"
    assert heads.upstream(parsed) == (None, UnicodeEncodeError)
    parsed.target = "/caf\xe9/\udcff"  # surrogateescape's: built, as the Python does
    assert _same(*heads.upstream(parsed))


def test_what_the_glue_never_passes_is_declined(cheads: types.ModuleType) -> None:
    # (mypyc's glue passes a float for `upstream_seconds: float`, a list for a list...)
    ok = (200, [], WHOLE, 7, 0.5, 1.0, 2.0, "i", "r", True)
    assert cheads.client_head(*ok) is not None
    for at, value in [(0, True), (1, ()), (2, 0.0), (4, 2), (5, 1), (6, None), (7, b"i"),
                      (9, 1), (9, None)]:  # fmt: skip
        assert cheads.client_head(*ok[:at], value, *ok[at + 1 :]) is None, (at, value)
    fine = ("GET", "/", [(b"a", b"b")], [], "web", "gw", None, "1.2.3.4", "http", "r")
    assert cheads.upstream_head(*fine) is not None
    for at, value in [(0, b"GET"), (2, ((b"a", b"b"),)), (2, [[b"a", b"b"]]), (3, (b"x",)),
                      (3, ["x"]), (5, None), (6, "body"), (6, bytearray(b"x"))]:  # fmt: skip
        assert cheads.upstream_head(*fine[:at], value, *fine[at + 1 :]) is None, (at, value)
    with pytest.raises(TypeError):
        cheads.upstream_head(*fine[:-1])


def test_an_uninitialized_module_declines(cheads: types.ModuleType) -> None:
    spec = importlib.util.find_spec("webapi.fastpath._cheads")
    assert spec is not None
    fresh = importlib.util.module_from_spec(spec)  # its own state, never given the constants
    assert fresh is not cheads
    args = ("GET", "/", [], [], "web", "gw", None, "1.2.3.4", "http", "r")
    client = (200, [], 0, 0, 0.0, 0.0, 0.0, "i", "r", True)
    for executed in (False, True):  # (a module's state is made when it is executed)
        assert fresh.upstream_head(*args) is None
        assert fresh.client_head(*client) is None
        if not executed:
            with pytest.raises(RuntimeError):
                head.init_c(fresh)
            spec.loader.exec_module(fresh)  # type: ignore[union-attr]
    assert cheads.upstream_head(*args) is not None
    with pytest.raises(TypeError):
        cheads.init_client(frozenset({"str"}), frozenset(), frozenset(), b"p-", frozenset(),
                           {}, 0, 1, 2)  # fmt: skip


# Random heads (seeded): names from a pool of what the heads drop, keep or replace.

_NAMES = [b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
          b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
          b"x-forwarded-port", b"x-forwarded-", b"x-forwarded", b"x-request-id",
          b"content-length", b"forwarded", b"x-real-ip", b"x-client-ip", b"true-client-ip",
          b"x-api-key", b"authorization", b"proxy-authorization", b"proxy-", b"proxy",
          b"proxy-connection", b"accept", b"user-agent", b"x-secret", b"x-other", b"close",
          b"cookie", b"via", b"content-type", b"server", b"set-cookie", b"x-a", b"a",
          b"x-upstream-latency"]  # fmt: skip
_VALUES = [b"", b" ", b"keep-alive", b"close", b"Keep-Alive", b"CLOSE", b" close ",
           b"X-Secret, close", b" x-secret ,\tX-OTHER ", b",", b"x-a,,x-a", b"te, trailer",
           b"Bearer sbk_abc", b"Bearer  \t sbk_x", b"bearer sbk_x", b"Basic sbk_",
           b"Bearer\x0bsbk_", b"Bearer \x0c\x0bsbk_", b"sbk_", b"Bearer sbk", b"Bearer",
           b"Bearer eyJhbGciOi.jwt.sig", b"1.2.3.4", b"10.0.0.1, 10.0.0.2", b"caf\xc3\xa9",
           b"\xff\xfe", b"gzip, deflate", b"*/*", b"42", b"timeout=5"]  # fmt: skip
_NOISE = b"\r\n\x00 \t\x7f\x80\xff,:;=Aa"


def _mutated(rng: random.Random, data: bytes) -> bytes:
    """`data` with a byte flipped, inserted or deleted, or its case changed."""
    kind = rng.randrange(5)
    at = rng.randrange(len(data) + 1)
    if kind == 0 and data:
        at = min(at, len(data) - 1)
        return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]
    if kind == 1:
        return data[:at] + bytes([rng.choice(_NOISE)]) + data[at:]
    if kind == 2 and data:
        return data[:at] + data[at + 1 :]
    if kind == 3:
        return data.upper()
    return bytes(b ^ 32 if 97 <= b <= 122 and rng.random() < 0.5 else b for b in data)


def _fields(rng: random.Random, names: list[bytes]) -> list[tuple[bytes, bytes]]:
    fields = []
    for _ in range(rng.choice([0, 1, 3, 6, 10, 20, 70])):
        name, value = rng.choice(names), rng.choice(_VALUES)
        if rng.random() < 0.15:
            name = _mutated(rng, name)
        if rng.random() < 0.2:
            value = _mutated(rng, value)
        fields.append((name, value))
        if rng.random() < 0.1:
            fields.append((name, value))  # duplicated
    return fields


def _text(rng: random.Random, ascii_text: str) -> str:
    """Mostly `ascii_text`; now and then with a character the strict encode refuses, or
    a non-ASCII one, or one of surrogateescape's."""
    return rng.choice([ascii_text] * 16 + [ascii_text + "\xe9", ascii_text + "\udcff",
                                           ascii_text + "\ud800", ""])  # fmt: skip


def _random_parsed(rng: random.Random) -> Parsed:
    """A `Parsed` made by hand: what the C must treat as the Python does, whatever
    httptools would have let through."""
    req = Parsed()
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "get", "M\xc9THODE", ""]
    req.method = rng.choice(methods)
    req.target = _text(rng, rng.choice(["/", "/a/b?q=1", "/%2e", "/x y"]))
    req.service = _text(rng, rng.choice(["web", "orders-v1"]))
    req.headers = _fields(rng, _NAMES)
    if rng.random() < 0.7:  # as `on_header` collects them
        req.connection = [value for name, value in req.headers if name == b"connection"]
    else:
        req.connection = [rng.choice(_VALUES) for _ in range(rng.randrange(3))]
    if rng.random() < 0.8:
        req.first = {b"host": _text(rng, rng.choice(["gw", "gw.example:8080", "[::1]"]))}
    req.body = rng.choice([None, b"", b"x", b"{}" * 700])
    return req


def _random_request(rng: random.Random) -> bytes:
    """Request bytes for `parse_request`: mostly ones it takes."""
    method = rng.choice(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    fields = [(b"Host", b"gw")] + [
        (name, value)
        for name, value in _fields(rng, [n for n in _NAMES if n not in _REFUSED])
        if b"\r" not in name + value and b"\n" not in name + value
    ]
    body = rng.choice([b"", b"hello", b"{}" * 100])
    fields = [(n, v) for n, v in fields if n.lower() != b"content-length"]
    if body or rng.random() < 0.3:
        fields.insert(rng.randrange(len(fields) + 1), (b"Content-Length", b"%d" % len(body)))
    lines = [f"{method} /svc/web/a/b?q=1 HTTP/1.1".encode()] + [n + b": " + v for n, v in fields]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


_REFUSED = {b"transfer-encoding", b"upgrade", b"host"}


def test_random_request_heads_are_built_in_c_alike(heads: Heads) -> None:
    rng = random.Random(4025)
    answered = parsed_count = cases = 0
    for i in range(4000):
        if i % 2:
            req: Parsed | None = _random_parsed(rng)
        else:
            taken = parse_request(_random_request(rng))
            req = taken if isinstance(taken, Parsed) else None
            parsed_count += req is not None
        if req is None:
            continue
        ip = rng.choice(["127.0.0.1", "::1", "2001:db8::1", "10.0.0.1"] * 3 + ["10.0.0.\u0661"])
        scheme = rng.choice(["http", "https"])
        rid = rng.choice(["rid", "0" * 32] * 5 + ["r\xe9"])
        cases += 1
        answered += _same(*heads.upstream(req, ip, scheme, rid))
    print(f"request heads: {cases} cases ({parsed_count} parsed), {answered} built in C")
    assert parsed_count > 800 and answered > cases * 0.6


_RESPONSE_NAMES = [b"Connection", b"Keep-Alive", b"TE", b"Trailer", b"Transfer-Encoding",
                   b"Upgrade", b"Content-Length", b"X-Request-Id", b"Proxy-Authenticate",
                   b"PROXY-x", b"Proxy", b"Server", b"Content-Type", b"Set-Cookie", b"ETag",
                   b"X-Upstream-Latency", b"connection", b"CONNECTION", b"x-secret", b"x-a",
                   b"Date", b"Vary", b"content-length"]  # fmt: skip


# `Connection` values that name no field (most upstreams' own).
_PLAIN = [b"keep-alive", b"close", b"", b"Keep-Alive", b"CLOSE"]


def _seconds(rng: random.Random) -> float:
    """A latency in seconds, of every magnitude, with ties of `%.3f` (of its ms) and the
    special values."""
    kind = rng.randrange(9)
    if kind == 0:
        return rng.uniform(0, 0.01)
    if kind == 1:
        return rng.uniform(0, 100)
    if kind == 2:
        return _tie(rng) / 1000
    if kind == 3:
        return 10 ** rng.uniform(-12, 300)
    if kind == 4:
        return rng.choice([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, sys.float_info.max])
    if kind == 5:
        return -rng.uniform(0, 1)
    if kind == 6:
        return rng.randrange(10**9) / 10**6
    if kind == 7:
        return rng.randrange(1, 10**7) / 10**7
    value = struct.unpack("<d", rng.randbytes(8))[0]
    return value


def _tie(rng: random.Random) -> float:
    """A value `%.3f` rounds half to even: an odd multiple of 1/16 (x.xxx5 exactly)."""
    return (2 * rng.randrange(2**40 >> rng.randrange(40)) + 1) / 16


def test_random_response_heads_are_built_in_c_alike(heads: Heads) -> None:
    rng = random.Random(2507)
    answered = 0
    cases = 3000
    for _ in range(cases):
        fields = [
            (name, rng.choice(_PLAIN) if name.lower() == b"connection" and rng.random() < 0.9
             else value)
            for name, value in _fields(rng, _RESPONSE_NAMES)
        ]  # fmt: skip
        now = rng.choice([rng.uniform(0, 1e6), 1000.0, _tie(rng)])
        received = now - rng.choice([rng.uniform(-1, 10), 0.0, _seconds(rng)])
        answer, oracle = heads.client(
            rng.choice([200] * 4 + [201, 204, 304, 404, 500, 502, 100, 299, 799, 0, 10**20]),
            fields,
            framing=rng.choice([WHOLE, WHOLE, KEPT, CHUNKED, NONE, 7, -1]),
            length=rng.choice([0, 7, 65536, 2**40, -1, 2**70]),
            upstream_seconds=_seconds(rng),
            received=received,
            now=now,
            instance_id=_text(rng, "web-1"),
            request_id=_text(rng, "rid-" + str(rng.randrange(10**6))),
            keep_alive=rng.random() < 0.5,
        )
        answered += _same(answer, oracle)
    print(f"response heads: {cases} cases, {answered} built in C")
    assert answered > cases * 0.4


def test_latencies_are_formatted_as_python_formats_them(heads: Heads) -> None:
    # `%.3f` of every kind of value, ties (x.xxx5 exactly) and large ones included: the
    # latency lines of the C's head are the Python's.
    rng = random.Random(3)
    ties = [_tie(rng) for _ in range(4000)]
    exact_ties = [t / 1000 for t in ties if (t / 1000) * 1000 == t]
    values = exact_ties + [_seconds(rng) for _ in range(6000)] + [0.0005, 0.0015, 0.0025]
    assert len(exact_ties) > 1000
    for seconds in values:
        finite = math.isfinite(seconds) and abs(seconds) < 1e9
        received = 1000.0 - 2 * seconds if finite else 0.0
        answer, oracle = heads.client(200, [], upstream_seconds=seconds, received=received)
        assert _same(answer, oracle, must_answer=True)
    # The gateway's share: max(x, 0.0) keeps a -0.0 and a NaN as they are.
    edges = [(0.0, 0.0, -0.0), (-0.0, 0.0, -0.0), (0.0, -0.0, 0.0), (0.001, 5.0, 5.0),
             (math.nan, 1.0, 2.0), (0.0, math.inf, math.inf), (math.inf, 0.0, 1.0),
             (-math.inf, 0.0, 1.0), (1e-300, 0.0, 1e-300), (0.0, 2.0, 1.0)]  # fmt: skip
    lines = set()
    for seconds, received, now in edges:
        answer, oracle = heads.client(200, [], upstream_seconds=seconds, received=received,
                                      now=now)  # fmt: skip
        assert _same(answer, oracle, must_answer=True)
        lines.add(oracle.split(b"\r\n")[2])
    assert {b"X-Gateway-Latency: -0.000", b"X-Gateway-Latency: nan"} <= lines


def test_no_reference_or_block_is_leaked(heads: Heads, cheads: types.ModuleType) -> None:
    parsed = parse_request(ORDINARY_REQUESTS[2])
    assert isinstance(parsed, Parsed)
    named = [(b"Connection", b"x-a"), (b"X-A", b"1")]
    calls: list[Callable[[], object]] = [
        lambda: cheads.upstream_head("POST", "/a", parsed.headers, parsed.connection, "web",
                                     "gw", parsed.body, "1.2.3.4", "http", "r"),
        lambda: cheads.upstream_head("GET", "/\udcff", parsed.headers, [b"x, y"], "web",
                                     "g\xe9", None, "1.2.3.4", "http", "r"),
        lambda: cheads.upstream_head("GET", "/", parsed.headers, [], "web", "gw", None,
                                     "\xe9", "http", "r"),  # declined
        lambda: cheads.client_head(200, UPSTREAM_FIELDS[0], WHOLE, 5, 0.1, 1.0, 2.0, "i",
                                   "r", True),
        lambda: cheads.client_head(200, named, WHOLE, 5, 0.1, 1.0, 2.0, "i", "r", True),
        lambda: cheads.client_head(799, [], WHOLE, 5, 0.1, 1.0, 2.0, "i", "r", False),
    ]  # fmt: skip
    watched = [None, True, parsed.body, parsed.headers[0][0], *parsed.headers[0]]
    for call in calls:
        for _ in range(100):  # warm up: caches, interned strings
            call()
        refs = [sys.getrefcount(obj) for obj in watched]
        blocks = sys.getallocatedblocks()
        for _ in range(20_000):
            call()
        # A reference or a block leaked per call would be 20,000 (a few come and go).
        assert sys.getallocatedblocks() - blocks < 100
        assert all(
            abs(sys.getrefcount(obj) - n) < 100 for obj, n in zip(watched, refs, strict=True)
        )
