"""The Python servers of `bench.proxy`, each in its own process (`--serve KIND`).

`aiohttp` and `sanic-aiohttp` are copied from the peers' proxy_bench.py
(`serve_aiohttp`, `_run_sanic_proxy`, `serve_sanic_aiohttp`), unchanged but
for style. `backend` is ours: the fallback backend when nginx is missing.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import serve_child, start_server
from bench.proxy_targets import BODY


def _serve_forever(protocol: Callable[[], asyncio.Protocol], port: int) -> None:
    """Serve `protocol` on 127.0.0.1:`port` until the process is stopped."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(protocol, "127.0.0.1", port, backlog=4096)
        await asyncio.Event().wait()

    asyncio.run(main())


def _address(backend: str) -> tuple[str, int]:
    """The host and port of the backend's `http://host:port` URL."""
    host, _, port = backend.removeprefix("http://").partition(":")
    return host, int(port)


def serve_backend(port: int, backend: str) -> None:
    """A minimal keep-alive HTTP/1.1 server answering BODY to every request."""
    import httptools

    body = BODY.encode()
    response = (
        b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )

    class Backend(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.transport: Any = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.close()

        def on_message_complete(self) -> None:
            self.transport.write(response)

    _serve_forever(Backend, port)


def serve_aiohttp(port: int, backend: str) -> None:
    """Simple dispatcher style: one shared ClientSession, forward body,
    decode the backend's JSON and return it with json_response()."""
    from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

    async def on_startup(app: Any) -> None:
        app["session"] = ClientSession(
            connector=TCPConnector(limit=100), timeout=ClientTimeout(total=10)
        )

    async def on_cleanup(app: Any) -> None:
        await app["session"].close()

    async def handler(request: Any) -> Any:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with request.app["session"].request(
            request.method, backend + request.path_qs, data=body or None, headers=headers
        ) as resp:
            data = await resp.json(content_type=None)
            return web.json_response(data, status=resp.status)

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handler)
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096,
        handle_signals=True,
    )  # fmt: skip


def serve_sanic_aiohttp(port: int, backend: str) -> None:
    """Sanic 1 worker + one shared aiohttp.ClientSession (limit 128), bytes passthrough."""
    import aiohttp
    from sanic import Sanic
    from sanic.response import raw

    app = Sanic("peer_sanic_aiohttp")

    @app.before_server_start
    async def setup(app: Any) -> None:
        app.ctx.client = aiohttp.ClientSession(
            base_url=backend,
            connector=aiohttp.TCPConnector(limit=128),
            timeout=aiohttp.ClientTimeout(total=10),
        )

    @app.after_server_stop
    async def teardown(app: Any) -> None:
        await app.ctx.client.close()

    async def forward(request: Any, path: str = "") -> Any:
        url = "/" + path + (("?" + request.query_string) if request.query_string else "")
        ctype = request.headers.get("content-type", "application/json")
        async with app.ctx.client.request(
            request.method, url, data=request.body or None, headers={"Content-Type": ctype}
        ) as r:
            status, body = r.status, await r.read()
            return raw(body, status=status, content_type=r.headers.get("Content-Type", ctype))

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    app.add_route(forward, "/", methods=methods, name="root")
    app.add_route(forward, "/<path:path>", methods=methods, name="any")
    app.run(
        host="127.0.0.1", port=port, single_process=True, access_log=False, debug=False,
        motd=False, backlog=4096,
    )  # fmt: skip


def serve_python_floor(port: int, backend: str) -> None:
    """The least a Python proxy on this event loop can do per request: no parsing of
    the request (its bytes are forwarded as they come), one upstream keep-alive
    connection per client connection, the response framed by its Content-Length and
    written back as received. No checks, no headers added, no choice of instance:
    not a proxy anyone should run, but the ceiling any Python proxy's throughput
    is measured against (the gateway does everything above on top of it)."""
    host, upstream_port = _address(backend)

    class Upstream(asyncio.Protocol):
        def __init__(self, client: asyncio.Transport) -> None:
            self.client = client
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data
            while (end := buf.find(b"\r\n\r\n")) >= 0:
                at = buf.lower().find(b"content-length:", 0, end)
                if at < 0:
                    raise RuntimeError("the floor proxy frames by Content-Length only")
                size = end + 4 + int(buf[at + 15 : buf.find(b"\r\n", at)])
                if len(buf) < size:
                    break
                self.client.write(buf[:size])
                buf = buf[size:]
            self.buf = buf

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.transport: Any = None
            self.upstream: asyncio.Transport | None = None
            self.waiting: list[bytes] = []

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            upstream, _ = await loop.create_connection(
                lambda: Upstream(self.transport), host, upstream_port
            )
            self.upstream = upstream
            upstream.write(b"".join(self.waiting))

        def data_received(self, data: bytes) -> None:
            if self.upstream is None:
                self.waiting.append(data)
            else:
                self.upstream.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.upstream is not None:
                self.upstream.close()

    _serve_forever(Client, port)


# What `python-lean` takes as a credential (a toy server's constant, not a secret).
LEAN_CREDENTIAL = "Bearer sbk_lean_reference"
# The request fields the gateway's normal path reads or replaces, in one pattern.
_LEAN_REQUEST_FIELDS = (
    rb"\r\n(authorization|x-api-key|x-request-id|x-service-version|x-balance-key|host"
    rb"|content-length|connection|keep-alive|transfer-encoding|upgrade|expect|te|trailer"
    rb"|proxy-[!-9;-~]+|x-forwarded-[a-z]+):[ \t]*([^\r]*)"
)
_LEAN_RESPONSE_DROPPED = (
    rb"\r\n(connection|keep-alive|proxy-[!-9;-~]+|te|trailer|transfer-encoding|upgrade"
    rb"|content-length|x-request-id):[^\r]*"
)


def serve_python_lean(port: int, backend: str) -> None:
    """The per-request header work of the gateway's normal path and nothing else: a
    reference for what that work alone costs in Python on this event loop, not a
    proxy anyone should run. Per request: httptools frames the request (no callback
    per field), one regex reads the fields, the credential is a dict lookup, a
    request id is made, the upstream head is the client's fields minus the dropped
    ones plus `Host`, `X-Forwarded-*` and `X-Request-Id`; an idle upstream keep-alive
    connection is taken (LIFO); httptools frames the response, its hop-by-hop fields
    go and the latency, instance and request id fields come. Not done (the gateway
    does all of them): timeouts, health, retries, balancing beyond one instance,
    stats, logs, streaming, error answers (anything unexpected closes), Sanic."""
    import os
    import re
    import time
    from collections import deque

    import httptools

    host, upstream_port = _address(backend)
    principals = {LEAN_CREDENTIAL.encode(): frozenset({b"echo"})}
    request_fields = re.compile(_LEAN_REQUEST_FIELDS, re.IGNORECASE)
    response_dropped = re.compile(_LEAN_RESPONSE_DROPPED, re.IGNORECASE)
    id_prefix = os.urandom(8).hex().encode()
    counter = iter(range(1 << 62))
    perf = time.perf_counter
    idle: deque[Upstream] = deque()

    class Upstream(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpResponseParser(self)
            self.transport: Any = None
            self.client: Client | None = None
            self.data = b""
            self.body = b""
            self.done = False
            self.sent = 0.0

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def send(self, client: Client, head: bytes) -> None:
            self.client, self.data, self.body, self.done = client, b"", b"", False
            self.sent = perf()
            self.transport.write(head)

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.done = True

        def data_received(self, data: bytes) -> None:
            client = self.client
            if client is None:
                self.transport.close()
                return
            self.data += data
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                client.transport.close()
                self.transport.close()
                return
            if not self.done:
                return
            self.client = None
            idle.append(self)
            client.answer(self.parser.get_status_code(), self.data, self.body, self.sent)

        def connection_lost(self, exc: Exception | None) -> None:
            if self in idle:
                idle.remove(self)
            if self.client is not None:
                self.client.transport.close()

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.transport: Any = None
            self.ip = b""
            self.url = b""
            self.complete = False
            self.received = 0.0
            self.request_id = b""

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.ip = transport.get_extra_info("peername")[0].encode()

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_message_complete(self) -> None:
            self.complete = True

        def data_received(self, data: bytes) -> None:
            self.received = perf()
            self.url, self.complete = b"", False
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.complete = False
            url, end = self.url, data.find(b"\r\n\r\n")
            slash = url.find(b"/", 5) if url.startswith(b"/svc/") else -1
            # One whole request per read, `/svc/<service>/...`, else the connection ends.
            if not self.complete or end + 4 != len(data) or slash < 0:
                self.transport.close()
                return
            service, target = url[5:slash], url[slash:]
            head = data[:end]
            fields: dict[bytes, bytes] = {}
            for name, value in request_fields.findall(head):
                fields.setdefault(name.lower(), value)
            allowed = principals.get(fields.get(b"authorization", b""))
            if allowed is None or service not in allowed:
                self.transport.close()
                return
            request_id = fields.get(b"x-request-id") or b"%s%016x" % (id_prefix, next(counter))
            self.request_id = request_id
            kept = request_fields.sub(b"", head[head.find(b"\r\n") :])
            upstream_head = (
                b"%s %s HTTP/1.1%s\r\nHost: %s\r\nX-Forwarded-For: %s\r\n"
                b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: %s\r\nX-Request-Id: %s\r\n\r\n"
                % (self.parser.get_method(), target, kept, service, self.ip,
                   fields.get(b"host", b""), request_id)
            )  # fmt: skip
            if idle:
                idle.pop().send(self, upstream_head)
            else:
                asyncio.get_running_loop().create_task(self.connect(upstream_head))

        async def connect(self, head: bytes) -> None:
            loop = asyncio.get_running_loop()
            _, upstream = await loop.create_connection(Upstream, host, upstream_port)
            upstream.send(self, head)

        def answer(self, status: int, data: bytes, body: bytes, sent: float) -> None:
            now = perf()
            head_end = data.find(b"\r\n\r\n")
            kept = response_dropped.sub(b"", data[data.find(b"\r\n") : head_end])
            upstream_ms = (now - sent) * 1e3
            if not self.transport.is_closing():
                self.transport.write(
                    b"HTTP/1.1 %d OK%s\r\nX-Upstream-Latency: %.3f\r\nX-Gateway-Latency: %.3f"
                    b"\r\nX-Upstream-Instance: echo-1\r\nX-Request-Id: %s\r\n"
                    b"content-length: %d\r\nconnection: keep-alive\r\n\r\n%s"
                    % (status, kept, upstream_ms, (now - self.received) * 1e3 - upstream_ms,
                       self.request_id, len(body), body)
                )  # fmt: skip

    _serve_forever(Client, port)


SERVERS = {
    "backend": serve_backend,
    "python-floor": serve_python_floor,
    "python-lean": serve_python_lean,
    "aiohttp": serve_aiohttp,
    "sanic-aiohttp": serve_sanic_aiohttp,
}


def serve(kind: str, port: int, backend: str, loop: str) -> None:
    serve_child(SERVERS, kind, port, backend, loop)


def start_python(
    kind: str, tmp: Path, port: int, backend: str, loop: str
) -> subprocess.Popen[bytes]:
    return start_server("bench.proxy", kind, tmp, port, "--backend-url", backend, loop)
