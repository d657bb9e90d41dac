"""Writing a request body to an upstream connection, with write flow control."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable

from webapi.proxy.headers import CHUNKED

# A bytes body is written in slices of this size, each after the previous one drained.
WRITE_SLICE = 256 * 1024


class BodyWriter:
    """Sends request bodies on one transport; the connection forwards `pause_writing`,
    `resume_writing` and `connection_lost` to it.

    `progress_at` is the loop time the upstream last took a part of the body, for the
    connection's read timeout; `paused` says the upstream is not reading right now.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.lost = False
        self.progress_at = 0.0

    async def send(
        self,
        body: bytes | bytearray | AsyncIterable[bytes],
        framing: int,
        length: int,
        current: Callable[[], bool],
    ) -> bool:
        """Write `body` (its head is already out): in slices for bytes, chunk by chunk
        (chunked or `length` bytes) for an async iterable. Returns False if `current()`
        turned false meanwhile (the exchange ended first); raises `ValueError` when a
        streamed body does not match its declared length, and `ConnectionResetError`
        when the connection is lost."""
        write = self._transport.write
        if isinstance(body, bytes | bytearray):
            view = memoryview(body)
            for start in range(0, len(view), WRITE_SLICE):
                if not current():
                    return False
                write(view[start : start + WRITE_SLICE])
                await self._progress()
            return True
        sent = 0
        async for chunk in body:
            if not current():
                return False
            if not chunk:
                continue  # an empty chunk would end a chunked body
            if framing == CHUNKED:
                self._transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                sent += len(chunk)
                if sent > length:
                    raise ValueError(f"request body longer than its Content-Length {length}")
                write(chunk)
            await self._progress()
        if not current():
            return False
        if framing == CHUNKED:
            write(b"0\r\n\r\n")
        elif sent != length:
            raise ValueError(f"request body of {sent} bytes, Content-Length said {length}")
        return True

    async def _progress(self) -> None:
        if self.paused:
            if self.lost:
                raise ConnectionResetError("connection lost")
            waiter = self._waiter = self._loop.create_future()
            await waiter
        self.progress_at = self._loop.time()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake(None)

    def connection_lost(self) -> None:
        self.lost = True
        self._wake(ConnectionResetError("connection lost"))

    def _wake(self, exc: BaseException | None) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)
