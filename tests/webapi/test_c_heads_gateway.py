"""The fast path's two heads in C (`webapi/fastpath/_cheads.c`) through a real gateway,
in this process: the same answers with the C as without (`test_c_heads.py` compares
them head by head)."""

from __future__ import annotations

import asyncio
import json
import re
import types
import uuid

import httptools
import pytest

from common.settings import Settings
from tests.support.registry import registered
from tests.support.served import served
from tests.webapi.cheads_fixtures import Spy, c_heads  # noqa: F401  (the fixture `cheads`)
from tests.webapi.conftest import as_admin
from tests.webapi.upstream_servers import Peer, Upstream
from webapi.app import create_app
from webapi.fastpath import FastPathProtocol, head, response

pytestmark = pytest.mark.timeout(60)


# Through a real gateway, in this process: the same answers with the C as without.


def _echo_head(status: int, req_headers: list[tuple[str, str]], method: str, target: str,
               body: bytes) -> bytes:  # fmt: skip
    """The instance's answer: what it received, as JSON, with fields the gateway drops."""
    content = json.dumps({"method": method, "target": target, "headers": req_headers,
                          "body": body.decode("latin-1")}).encode()  # fmt: skip
    fields = [("Server", "echo"), ("Content-Type", "application/json"),
              ("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("Proxy-Foo", "x"),
              ("X-Request-Id", "the instance's"), ("X-Kept", "k")]  # fmt: skip
    if target.endswith("/named"):
        fields += [("Connection", "X-Secret"), ("X-Secret", "1")]  # declined by the C
    if status in (204, 304):
        content = b""
    else:
        fields.append(("Content-Length", str(len(content))))
    if method == "HEAD":
        content = b""
    lines = [f"HTTP/1.1 {status} Whatever"] + [f"{k}: {v}" for k, v in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + content


async def _echo(peer: Peer) -> None:
    async for req in peer.requests():
        status = int(req.target.rsplit("/", 1)[1]) if "/s/" in req.target else 200
        await peer.send(_echo_head(status, req.headers, req.method, req.target, req.body))


class _Answer:
    """httptools callbacks for one response."""

    def __init__(self, head_only: bool) -> None:
        self.head_only = head_only
        self.body: list[bytes] = []
        self.done = False

    def on_headers_complete(self) -> None:
        self.done = self.done or self.head_only

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


_LATENCY = re.compile(rb"\r\n(X-(?:Upstream|Gateway)-Latency): \d+\.\d{3}(?=\r\n)")
_FRAMING = re.compile(rb"\r\n(?:content-length: \d+|transfer-encoding: chunked)(?=\r\n)")


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    raw: bytes) -> tuple[bytes, bytes, int]:  # fmt: skip
    """The answer's head (its latency values and the gateway's framing left out: they
    depend on time), its body, and how many latency fields it has (2 from the fast path,
    none from Sanic's)."""
    writer.write(raw)
    answer = _Answer(raw.startswith(b"HEAD "))
    parser = httptools.HttpResponseParser(answer)
    data = b""
    while not answer.done:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk, "the gateway closed the connection"
        data += chunk
        parser.feed_data(chunk)
    head_bytes = data[: data.index(b"\r\n\r\n") + 4]
    head_bytes, latencies = _LATENCY.subn(rb"\r\n\1: <ms>", head_bytes)
    return _FRAMING.sub(b"", head_bytes), b"".join(answer.body), latencies


def _requests(service: str) -> list[bytes]:
    auth = as_admin.field_lines().encode()
    fields = [
        b"",
        b"Accept: */*\r\nUser-Agent: test\r\n",
        b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\nForwarded: for=x\r\n"
        b"X-Real-IP: 6.6.6.6\r\n",
        b"Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
        b"Proxy-Authorization: Basic eA==\r\n",
    ]
    requests = []
    for i, (method, path, body) in enumerate(
        [("GET", "a?q=1", b""), ("GET", "fwd", b""), ("GET", "conn", b""),
         ("POST", "post", b'{"a": 1}'), ("PUT", "empty", b""), ("HEAD", "head", b""),
         ("DELETE", "del", b""), ("GET", "named", b""), ("GET", "s/201", b""),
         ("GET", "s/204", b""), ("GET", "s/404", b""), ("GET", "s/502", b"")]
    ):  # fmt: skip
        length = b"Content-Length: %d\r\n" % len(body) if body or method == "PUT" else b""
        requests.append(
            f"{method} /svc/{service}/{path} HTTP/1.1\r\nHost: gw.test\r\n".encode()
            + auth + fields[i % len(fields)] + b"X-Request-Id: cheads-%d\r\n" % i
            + length + b"\r\n" + body
        )  # fmt: skip
    return requests


async def test_a_gateway_with_the_c_heads_answers_as_it_does_without(
    redis_url: str, cheads: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = f"ch{uuid.uuid4().hex[:6]}"
    app = create_app(Settings(redis_url=redis_url), name=f"cheads_{uuid.uuid4().hex[:6]}")
    requests = _requests(service)
    async with (
        Upstream(_echo) as instance,
        served(app, FastPathProtocol) as base,
        registered(redis_url, service, {f"{service}-a": instance.address}),
    ):
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            # Sanic's path until the registry view has the instance (and the credential
            # is cached): then the fast path answers.
            async def fast() -> bool:
                before = app.ctx.fast_path.answered
                await _exchange(reader, writer, requests[0])
                return app.ctx.fast_path.answered > before

            for _ in range(200):
                if await fast():
                    break
                await asyncio.sleep(0.05)
            spy = Spy(cheads)
            answers = {}
            for mode, module in (("python", None), ("c", spy.module)):
                monkeypatch.setattr(head, "_C", module)
                monkeypatch.setattr(response, "_C", module)
                before = app.ctx.fast_path.answered
                answers[mode] = [await _exchange(reader, writer, raw) for raw in requests]
                assert app.ctx.fast_path.answered - before == len(requests)
                assert [latencies for _, _, latencies in answers[mode]] == [2] * len(requests)
        finally:
            writer.close()
    assert answers["c"] == answers["python"]
    count = len(requests)
    assert spy.counts() == {("upstream_head", True): count, ("client_head", True): count - 1,
                            ("client_head", False): 1}  # fmt: skip
    # What the instance saw: the heads' work, end to end (`_requests`' fields).
    forwarded, connection = (json.loads(answers["c"][i][1])["headers"] for i in (2, 3))
    assert dict(forwarded)["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    names = [name.lower() for name, _ in connection]
    assert "x-secret" not in names and "authorization" not in names and "te" not in names
    assert answers["c"][0][0].startswith(b"HTTP/1.1 200 OK\r\nServer: echo\r\n")
