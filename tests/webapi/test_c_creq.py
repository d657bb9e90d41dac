"""The fast path's request parse in C (`webapi/fastpath/_creq.c`) against its reference,
`webapi.fastpath.request.parse_request` run as Python: wherever the C answers, the
answer is the Python's, slot by slot; the ordinary requests are the C's to answer.
Then through a real gateway served in this process, with the C on."""

from __future__ import annotations

import ast
import importlib
import random
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import pytest

import webapi.fastpath  # noqa: F401  (its `prefer_compiled` first: the build's modules)
from common.compiled import hot_path_state, source_path
from common.forwarding import MAX_VIA_HOPS
from webapi.fastpath import request
from webapi.fastpath.request import MAX_FAST_BODY, MAX_FAST_HEAD, Incomplete, Parsed

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def creq() -> ModuleType:
    """The C module, imported directly (whatever `SWITCHBOARD_C` says)."""
    state = hot_path_state()
    if not state.used:
        pytest.skip(f"the compiled build is not used: {state.reason}")
    return importlib.import_module("webapi.fastpath._creq")  # (in every build: C_MODULES)


@contextmanager
def c_set(module: object) -> Iterator[None]:
    """`parse_request` with `request._C` set to `module` (None: the Python path)."""
    saved = request._C
    request._C = module  # type: ignore[assignment]  (a spy stands in for it too)
    try:
        yield
    finally:
        request._C = saved


def python_answer(raw: bytes | bytearray) -> Parsed | Incomplete | None:
    with c_set(None):
        return request.parse_request(raw)


def _slots_of(cls: str) -> list[str]:
    """The `__slots__` of class `cls` of request.py, from its source (a class compiled by
    mypyc has none at run time)."""
    tree = ast.parse(source_path("webapi.fastpath.request").read_text())
    [node] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    [slots] = [s.value for s in node.body if isinstance(s, ast.Assign)
               and getattr(s.targets[0], "id", "") == "__slots__"]  # fmt: skip
    return list(ast.literal_eval(slots))


SLOTS = [slot for slot in _slots_of("Parsed") if slot != "received"]  # (a clock reading)


def slots(answer: Parsed | Incomplete | None) -> object:
    """Every slot of `answer`, comparable."""
    if isinstance(answer, Incomplete):
        return ("Incomplete", answer.needed, slots(answer.head))
    if answer is None:
        return None
    return ("Parsed", [(slot, getattr(answer, slot)) for slot in SLOTS])


def answered(creq: ModuleType, raw: bytes) -> bool:
    """Whether the C answers `raw`; where it does, the answer is the Python's."""
    expected = python_answer(raw)
    if creq.parse(raw) is None:
        return False
    assert creq.parse(bytearray(raw)) == creq.parse(raw)
    with c_set(creq):
        got = request.parse_request(raw)
    assert slots(got) == slots(expected), raw
    if isinstance(got, Parsed) and isinstance(expected, Parsed):
        assert got.received > 0
        # The shared empty list when there is no `Connection` field, as the Python's.
        assert (got.connection is request._NONE) == (expected.connection is request._NONE)
    return True


def head(*fields: str, target: str = "/svc/echo/api/echo", method: str = "GET",
         body: bytes = b"") -> bytes:  # fmt: skip
    lines = [f"{method} {target} HTTP/1.1", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


KEY = "sbk_0123456789ab.cdefghijklmnopqrstuvwxyzABCDEFGHIJKLM"
# The requests the C must answer: the benchmark's (wrk) and a client's usual ones.
ORDINARY = [
    head("Host: 127.0.0.1:27100", f"X-Api-Key: {KEY}"),  # wrk's
    head("Host: gw", f"Authorization: Bearer {KEY}"),
    head("Host: gw", "Authorization: Bearer eyJhbGciOi.jwt.sig", "Accept: */*"),
    head("Host: gw", f"X-Api-Key: {KEY}", "Content-Type: application/json",
         "Content-Length: 13", method="POST", body=b'{"a": [1, 2]}'),
    head("Host: gw", f"X-Api-Key: {KEY}", "X-Request-Id: 0f2c-41aa-9"),
    head("Host: gw", f"X-Api-Key: {KEY}", "Connection: close"),
    head("Host: gw", f"X-Api-Key: {KEY}", "Connection: keep-alive"),
    head("Host: gw", f"X-Api-Key: {KEY}", "Connection: X-Secret, Close", "X-Secret: s"),
    head("Host: gateway.example.com", "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
         "Accept: text/html,application/xhtml+xml;q=0.9,*/*;q=0.8",
         "Accept-Language: en-US,en;q=0.5", "Accept-Encoding: gzip, deflate, br",
         f"Authorization: Bearer {KEY}", "Cookie: a=1; b=2", "Upgrade-Insecure-Requests: 1",
         "Sec-Fetch-Mode: navigate", "X-Service-Version: 2", "X-Balance-Key: user-7",
         "Cache-Control: no-cache", target="/svc/web/a/b?q=1&r=%20x&s=/./"),
    head("Host: [::1]:8080", f"X-Api-Key: {KEY}", f"Authorization: Bearer {KEY}"),
    head("Host: gw", "X-Api-Key: k", "Authorization: bearer   k  "),
    head("Host: gw", "X-Api-Key: ", "Authorization: Bearer other"),  # an empty key is none
    head("Host: gw", "X-Api-Key: k", "Authorization: Basic dXNlcjpwdw=="),
    head("host:gw", "x-api-key:\tk \t", "X-Empty:", "User-Agent: caf\xe9 \u2603"),
    head("Host: gw", "Content-Length: 0", method="PUT", target="/svc/a_b-c9/x.json"),
    head("Host: gw", "Content-Length: 005", method="PATCH", body=b"hello"),
    head("Host: gw", method="DELETE", target="/svc/s/items/7"),
    head("Host: gw", method="HEAD", target="/svc/s/a.b/c..d/e.?x"),
    head("Host: gw", method="OPTIONS", target="/svc/" + "s" * 63 + "/x"),
    head("Host: gw", "Content-Length: 65536", method="POST", body=b"x" * 65536),
    head("Host:", "Via-Not: 1.1 switchboard"),  # an empty Host is allowed
]  # fmt: skip


def test_the_ordinary_requests_are_answered_by_the_c(creq: ModuleType) -> None:
    for raw in ORDINARY:
        assert answered(creq, raw), raw
    post = ORDINARY[3]
    # Pipelined: only the first; its body not whole yet: Incomplete, the head read.
    assert answered(creq, post + ORDINARY[0])
    for cut in (len(post) - 13, len(post) - 1):
        assert answered(creq, post[:cut])
        assert isinstance(python_answer(post[:cut]), Incomplete)


def test_the_limits_are_the_pythons(creq: ModuleType) -> None:
    assert (creq.MAX_HEAD, creq.MAX_BODY) == (MAX_FAST_HEAD, MAX_FAST_BODY)
    cookie = "Cookie: " + "c" * (MAX_FAST_HEAD - len(head("Host: gw", "Cookie: ")))
    at_bound = head("Host: gw", cookie)
    assert len(at_bound) == MAX_FAST_HEAD and answered(creq, at_bound)
    over = head("Host: gw", cookie + "c")
    assert python_answer(over) is None and creq.parse(over) is None


GET = head("Host: gw", "X-Api-Key: k")
# Edge cases, from the Python's own tests (test_fastpath_request.py) and beyond.
EDGES = [
    GET[:30],
    GET[:-1],
    GET.replace(b"\r\n", b"\n"),
    GET.replace(b"\r\n", b"\n", 1),
    GET.replace(b"HTTP/1.1", b"HTTP/1.0"),
    GET.replace(b"HTTP/1.1", b"HTTP/1.1 "),
    GET.replace(b"HTTP/1.1", b"http/1.1"),
    GET.replace(b"GET", b"TRACE"),
    GET.replace(b"GET", b"get"),
    GET.replace(b"GET ", b"GET  "),
    GET.replace(b" HTTP", b"  HTTP"),
    GET.replace(b"GET ", b"GET\t"),
    b"\r\n" + GET,
    GET.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"),
    GET.replace(b"\r\n\r\n", b"\r\nUpgrade: websocket\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\nConnection: upgrade\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\nHost: other\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\n folded\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\n\tfolded\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\nBad Name: x\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\nBad\xe9: x\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\n: x\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\nX-A : x\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\nX-A: a\x00b\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\nX-A: a\x7fb\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\nX-A: a\rb\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\nX-A: a\xff\xfeb\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\nX-Request-Id: \xc3\xa9\xff\r\n\r\n"),
    GET.replace(b"\r\n\r\n", b"\r\nX-Request-Id: a\r\nX-Request-Id: b\r\n\r\n"),
    GET.replace(b"/svc/echo/api/echo", b"http://gw/svc/echo/api/echo"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/?a"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo//a"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/Echo/a"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/-echo/a"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/" + b"s" * 64 + b"/a"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a/%2e%2e/b"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a/%41"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a/..;x/b"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a/../b"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a/./b"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a/.hidden"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a\\b"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a#frag"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a?q#frag"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a?q=%zz\\/../"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a\xc3\xa9"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a\x7f"),
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a{}|^`\"<>"),
    GET.replace(b"/svc/echo/api/echo", b"/rpc/echo/a"),
    GET.replace(b"Host: gw\r\n", b""),
    *(
        GET.replace(b"Host: gw", b"Host: " + host)
        for host in (b"gw:", b"gw:80 \t", b"a b", b"a@b", b"a,b", b"[::1", b"[]", b"[::1]x",
                     b"gw:8a", b"\xc3\xa9", b"%41.example", b"[v1.x]:1", b"gw::1")
    ),
    *(
        head("Host: gw", f"Content-Length: {value}", method="POST", body=b"12345")
        for value in ("5 ", " 5", "\t5", "", "+5", "5x", "1e3", "0x5", "\u0665", "65537",
                      "99999999999999999999999", "0000000000000000000005")
    ),
    head("Host: gw", "Authorization: Bearer sbk_key", "Authorization: Bearer forged"),
    head("Host: gw", "X-Api-Key: sbk_a", "X-Api-Key: sbk_b"),
    head("Host: gw", "x-api-key: sbk_a", "Authorization: Bearer forged"),
    head("Host: gw", "X-Api-Key: k", "Authorization: Bearer"),
    head("Host: gw", "X-Api-Key: k", "Authorization: Bearer\tk"),
    head("Host: gw", "X-Api-Key: k\xa0", "Authorization: Bearer k"),
    head("Host: gw", "X-Api-Key: k", "Authorization: Bearer k\u2003"),
    head("Host: gw", "X-Api-Key: k", "Authorization: BEARER k"),
    head("Host: gw", "Via: 1.1 switchboard"),
    head("Host: gw", *["Via: 1.1 switchboard"] * MAX_VIA_HOPS),
    head("Host: gw", *[f"X-{i}: {i}" for i in range(120)]),
    *(
        head("Host: gw", *(f"Connection: {v}" for v in values))
        for values in (["close"], ["x-secret, Close"], ["keep-alive", "te,close"],
                       ["x-secret"], ["x-closed, unclose"], [" , ,close\t"], ["clos e"],
                       ["CLOSE"], ["close\xe9"])
    ),
]  # fmt: skip


# What the Python takes and the C declines on purpose (`_creq.c`'s docstring): unusual.
DECLINED = [
    GET.replace(b" HTTP", b"  HTTP"),  # (httptools takes two spaces)
    b"\r\n" + GET,  # an empty line first
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a/%41"),  # an escape in the path
    GET.replace(b"/svc/echo/api/echo", b"/svc/echo/a/.hidden"),  # "/." in the path
    head("Host: gw", "Content-Length: 5 ", method="POST", body=b"12345"),
    head("Host: gw", "X-Api-Key: k\xa0", "Authorization: Bearer k"),  # non-ASCII
    head("Host: gw", "X-Api-Key: k", "Authorization: Bearer k\u2003"),  # credentials
    head("Host: gw", "Via: 1.1 switchboard"),  # (the Python counts its hops)
    head("Host: gw", *[f"X-{i}: {i}" for i in range(120)]),  # more than 100 fields
]  # fmt: skip


def test_the_edge_cases_are_answered_as_the_python_does_or_declined(creq: ModuleType) -> None:
    answers = [answered(creq, raw) for raw in EDGES]
    assert sum(answers) >= 20  # (those below aside, the C answers what the Python does)
    taken = [raw for raw in EDGES if python_answer(raw) is not None]
    assert [raw for raw in taken if creq.parse(raw) is None] == DECLINED


# Bytes a mutation writes: line ends, controls, separators, high bytes.
_NASTY = b'\r\n\x00\t \x0b\x7f\x80\xa0\xff:;,/.%?#\\"@[]'
# Field lines a mutation inserts: framing, credentials, and malformed ones.
_LINES = [b"Host: x", b"Via: 1.1 switchboard", b"Transfer-Encoding: chunked",
          b"Content-Length: 3", b"Content-Length: 70000", b"Connection: close",
          b"Authorization: Bearer k", b"X-Api-Key: k", b"X-Api-Key: j", b"Upgrade: h2c",
          b"Expect: 100-continue", b" folded", b"Bad Name: x", b"X-Request-Id: r",
          b"X-A: \xc3\xa9", b"X-B:", b"X-Service-Version: 1", b"X-Balance-Key: b"]  # fmt: skip


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:  # overwrite a byte
            data[min(at, len(data) - 1)] = rng.choice(_NASTY + bytes([rng.randrange(256)]))
        elif op == 1:  # insert one
            data[at:at] = bytes([rng.choice(_NASTY)])
        elif op == 2 and data:  # delete some
            del data[at : at + rng.randint(1, 3)]
        elif op == 3:  # change the case of a stretch
            data[at : at + 8] = data[at : at + 8].swapcase()
        elif op in (4, 5):  # insert a field line, or duplicate one
            lines = bytes(data).split(b"\r\n")
            end = lines.index(b"") if b"" in lines else len(lines)
            if end > 1:
                where = rng.randint(1, end)
                line = rng.choice(_LINES) if op == 4 else lines[rng.randint(1, end - 1)]
                lines.insert(where, line)
                data = bytearray(b"\r\n".join(lines))
        elif op == 6:  # cut it short
            del data[at:]
        else:  # the body longer or shorter than said
            data += b"x" * rng.randint(0, 5)
    return bytes(data)


def test_mutated_requests_are_answered_as_the_python_does_or_declined(creq: ModuleType) -> None:
    rng = random.Random(20250425)
    ordinary = ORDINARY[:-2]  # (not the 64 KiB body: slow to mutate)
    cases = [_mutate(rng, rng.choice(ordinary if rng.random() < 0.8 else EDGES))
             for _ in range(20000)]  # fmt: skip
    count = sum(answered(creq, raw) for raw in cases)
    taken = sum(python_answer(raw) is not None for raw in cases)
    assert count > len(cases) // 10  # the answering path is exercised too (4,300)
    assert count <= taken


def test_every_byte_anywhere_in_the_benchmarks_request_is_answered_alike(
    creq: ModuleType,
) -> None:
    """Each byte value written over, or inserted at, each position of wrk's request."""
    raw, count = ORDINARY[0], 0
    for at in range(len(raw)):
        for byte in range(256):
            count += answered(creq, raw[:at] + bytes([byte]) + raw[at + 1 :])
            count += answered(creq, raw[:at] + bytes([byte]) + raw[at:])
    assert count > 10000


def test_no_reference_is_leaked(creq: ModuleType) -> None:
    """The constants' and the buffer's reference counts are where they were after many
    calls (what each call makes is freed with its answer); the RSS over 10^6 calls is
    in the report."""
    raw = ORDINARY[8]
    host = creq.parse(raw)[6][0][0]  # the cached `b"host"`
    counts = (sys.getrefcount(host), sys.getrefcount(raw), sys.getrefcount(None))
    for _ in range(20000):
        for sample in (raw, ORDINARY[3], ORDINARY[3][:-3], EDGES[0]):
            creq.parse(sample)
    assert (sys.getrefcount(host), sys.getrefcount(raw)) == counts[:2]
    assert abs(sys.getrefcount(None) - counts[2]) < 100  # (None is everywhere)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(50000):
        creq.parse(raw)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2048  # KiB


def test_it_refuses_what_is_not_bytes(creq: ModuleType) -> None:
    with pytest.raises(TypeError):
        creq.parse("GET /svc/a/b HTTP/1.1\r\nHost: gw\r\n\r\n")
    with pytest.raises(TypeError):
        creq.parse(memoryview(GET))
