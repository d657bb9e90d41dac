"""Scripted upstream servers on 127.0.0.1 and the `pool` fixture, shared by the
upstream pool tests (`test_upstream_*.py`).

Each test starts a small asyncio server whose handler plays one upstream behaviour
(keep-alive, chunked, closing, stalling, malformed...). Requests are parsed with
httptools on the server side too, so request bodies are counted as they stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import httptools
import pytest

from webapi.proxy import UpstreamPool

MB = 1024 * 1024
CHUNK = bytes(range(256)) * 256  # 64 KiB


# A scripted upstream server.


@dataclass
class Req:
    method: str = ""
    target: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    size: int = 0
    crc: int = 0

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class _ReqParser:
    """httptools callbacks collecting requests; bodies over 1 MiB are only counted."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.current = Req()
        self.done: list[Req] = []

    def on_url(self, url: bytes) -> None:
        self.current.target += url.decode()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name.decode(), value.decode()))

    def on_headers_complete(self) -> None:
        self.current.method = self.parser.get_method().decode()

    def on_body(self, body: bytes) -> None:
        req = self.current
        req.size += len(body)
        req.crc = zlib.crc32(body, req.crc)
        if len(req.body) < MB:
            req.body += body

    def on_message_complete(self) -> None:
        self.done.append(self.current)
        self.current = Req()


class Peer:
    """One accepted connection, as the handler sees it."""

    def __init__(
        self, server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.index = server.connections  # 1 for the first connection, 2 for the next...
        self._parser = _ReqParser()

    async def request(self) -> Req | None:
        """The next request, or None if the client closed the connection first."""
        while not self._parser.done:
            data = await self.reader.read(256 * 1024)
            if not data:
                return None
            self._parser.parser.feed_data(data)
        req = self._parser.done.pop(0)
        self.server.requests.append(req)
        return req

    async def requests(self) -> AsyncIterator[Req]:
        while (req := await self.request()) is not None:
            yield req

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_endless(self, start: bytes, repeated: bytes) -> None:
        """Send `start`, then `repeated` over and over, up to 64 MiB or until the other
        side leaves: a response head that never ends, say."""
        block = repeated * (64 * 1024 // len(repeated))
        try:
            await self.send(start)
            for _ in range(1024):
                await self.send(block)
        except ConnectionError:
            return

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.writer.transport.abort()


Handler = Callable[[Peer], Awaitable[None]]


class Upstream:
    """`async with Upstream(handler) as up:` serves `handler` on `up.address`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[Req] = []
        self.address = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        try:
            await self.handler(Peer(self, reader, writer))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@contextlib.contextmanager
def upstream_in_thread(handler: Handler) -> Iterator[Upstream]:
    """An `Upstream` serving `handler` on an event loop of its own, in a thread: for
    synchronous tests, whose blocking calls would hold up a loop shared with them."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    up = Upstream(handler)
    try:
        asyncio.run_coroutine_threadsafe(up.__aenter__(), loop).result(10)
        try:
            yield up
        finally:
            asyncio.run_coroutine_threadsafe(up.__aexit__(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def ok(body: bytes = b"hello world", *extra: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in extra)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), head.encode(), body)


async def keep_alive(peer: Peer) -> None:
    """Answers every request with its own target as the body."""
    async for req in peer.requests():
        await peer.send(ok(req.target.encode()))


async def chunks(count: int, chunk: bytes = CHUNK) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield chunk


@pytest.fixture(name="pool")
async def upstream_pool() -> AsyncIterator[UpstreamPool]:
    """An `UpstreamPool` closed after the test; test modules import it to use `pool`."""
    p = UpstreamPool(connect_timeout=2.0, read_timeout=5.0)
    try:
        yield p
    finally:
        await p.close()


def _no_open(pool: UpstreamPool, address: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        # The sweep drops an address's entry once it has no connection left.
        entry = pool.stats().get(address)
        return entry is None or entry["open"] == 0

    return check
