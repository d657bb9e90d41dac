"""One keep-alive HTTP/1.1 connection to an upstream: an `asyncio.Protocol` that writes a
request head once and parses the response with httptools (a whole simple one in C when
the compiled build: `webapi.proxy.replay`). Two ways to run an exchange:
`exchange()` resolves a future when the head arrives (the caller then reads the body
from the `UpstreamResponse`); `send()` returns at once and reports the response to a
`Receiver` from the connection's own callbacks (no future, no task: the fast path).

A connection carries one exchange at a time (no pipelining). It is handed back to its
owner as soon as the response is complete, keep-alive holds and the request body is
fully sent; anything else (errors, early responses, stray bytes) closes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import Protocol, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from common.compiled import c_module
from webapi.proxy.deadlines import Deadlines
from webapi.proxy.errors import (
    UpstreamBodyTooLarge,
    UpstreamError,
    UpstreamHeadTooLarge,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from webapi.proxy.headers import NO_BODY, RequestBody
from webapi.proxy.replay import replay
from webapi.proxy.response import HIGH_WATER, Receiver, UpstreamResponse
from webapi.proxy.writer import BodyWriter

# A bytes body up to this size goes out in the same write as the head; larger ones
# (and streamed ones) are written by a task, with write flow control.
INLINE_BODY = 64 * 1024
# The most a response head may take, interim (1xx) heads included: beyond it the
# exchange fails (502), as nginx's "upstream sent too big header" and Envoy's 60 KiB
# limit, rather than holding it, and a growing head in memory, until a timeout.
MAX_RESPONSE_HEAD = 64 * 1024
# The C's read of a whole simple response (`webapi.proxy.replay`), or None: httptools'.
_C = c_module("webapi.proxy._cresp")


class StaleConnection(Exception):
    """A reused connection closed before any response byte (internal: the pool decides
    whether to retry or to raise `UpstreamProtocolError`)."""


class Owner(Protocol):
    """What a connection reports to: the pool's per-host record."""

    address: str

    def release(self, conn: Connection) -> None: ...

    def forget(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """Hot path: every upstream request runs `exchange()` and the callbacks below."""

    def __init__(
        self,
        owner: Owner,
        loop: asyncio.AbstractEventLoop,
        read_timeout: float,
        max_body: int | None,
        deadlines: Deadlines,
    ) -> None:
        self._owner = owner
        self._deadlines = deadlines
        self._loop = loop
        self._read_timeout = read_timeout
        self._max_body = max_body
        self._transport: asyncio.Transport | None = None
        self._parser: HttpResponseParser | None = None
        self.lost = False
        self.reused = False
        self.idle_since = 0.0
        self.reading_paused = False
        self._writer: BodyWriter | None = None
        self._lost_waiter: asyncio.Future[None] | None = None
        # The current exchange; `_resp` is None between exchanges.
        self._resp: Receiver | None = None
        self._head_fut: asyncio.Future[None] | None = None
        self._upload: asyncio.Task[None] | None = None
        self._upload_done = True
        self._head_deadline: float | None = None
        self._end_deadline: float | None = None  # the whole exchange's (total timeout)
        self._progress_at = 0.0
        self._got_data = False
        self._head_request = False
        self._head_done = False
        self._interim = False
        self._message_done = False
        self._keep_alive = False
        self._framed = False
        self._coded = False  # a transfer coding other than chunked
        self._broken = False
        self._received = 0
        self._head_bytes = 0  # read before the end of the response head
        self._reason = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._content_length: bytes | None = None

    # The exchange.

    async def exchange(
        self,
        head: bytes,
        body: RequestBody,
        framing: int,
        length: int,
        head_request: bool,
        deadline: float | None,
        end: float | None = None,
    ) -> UpstreamResponse:
        """Send one request and return once the response head has arrived: by `deadline`
        (loop time), and the whole response by `end` (None: no bound but the read
        timeout's on each silence)."""
        transport = self._transport
        assert transport is not None and self._resp is None and not self.lost
        resp = UpstreamResponse(self)
        fut = self._head_fut = self._loop.create_future()
        self._begin(resp, head_request, deadline, end)
        if framing == NO_BODY:
            transport.write(head)
        elif isinstance(body, bytes | bytearray) and len(body) <= INLINE_BODY:
            transport.write(head + body)
        else:
            assert body is not None
            transport.write(head)
            self._upload_done = False
            self._upload = self._loop.create_task(self._send_body(resp, body, framing, length))
        try:
            await fut
        except asyncio.CancelledError:
            self.abandon()
            raise
        return resp

    def send(
        self,
        request: bytes,
        receiver: Receiver,
        head_request: bool,
        deadline: float | None,
        end: float | None = None,
    ) -> None:
        """Send one whole request (head and body in `request`) and return at once; the
        response goes to `receiver` (see `Receiver`); `deadline` and `end` as in
        `exchange`. Hot path."""
        transport = self._transport
        assert transport is not None and self._resp is None and not self.lost
        self._head_fut = None
        self._begin(receiver, head_request, deadline, end)
        transport.write(request)

    def _begin(
        self, resp: Receiver, head_request: bool, deadline: float | None, end: float | None
    ) -> None:
        self._resp = resp
        self._got_data = self._head_done = self._interim = False
        self._message_done = self._keep_alive = self._framed = False
        self._head_request = head_request
        self._upload_done = True
        self._received = self._head_bytes = 0
        self._reason = b""
        self._raw_headers = []
        self._content_length = None
        if self._parser is None:
            self._parser = HttpResponseParser(self)
        now = self._progress_at = self._loop.time()
        if end is not None and (deadline is None or end < deadline):
            deadline = end  # the head cannot come later than the whole response
        self._head_deadline = deadline
        self._end_deadline = end
        when = now + self._read_timeout
        self._deadlines.set(
            self, when if deadline is None or when < deadline else deadline, self._on_timer
        )

    async def _send_body(
        self,
        resp: UpstreamResponse,
        body: bytes | bytearray | AsyncIterable[bytes],
        framing: int,
        length: int,
    ) -> None:
        assert self._writer is not None
        try:
            if await self._writer.send(body, framing, length, lambda: self._resp is resp):
                self._upload_done = True
        except Exception as exc:
            # The caller's body failed (its error is raised as is), or the connection
            # was lost, which connection_lost() has already reported.
            if self._resp is resp:
                self._fail(exc)

    def _on_timer(self) -> None:
        if self._resp is None:
            return
        now = self._loop.time()
        end = self._end_deadline
        if end is not None and now >= end and self._head_done:
            self._fail(
                UpstreamTimeout(f"the response from {self._owner.address} was not over in time")
            )
            return
        deadline = None if self._head_done else self._head_deadline
        if deadline is not None and now >= deadline:
            self._fail(UpstreamTimeout(f"no response head from {self._owner.address} in time"))
            return
        if deadline is not None and self._upload_done:
            # Request sent, head awaited: the head's own deadline (the request's timeout,
            # which may be longer than the read timeout: a model may think for a minute
            # before it answers) is the only bound.
            self._deadlines.set(self, deadline, self._on_timer)
            return
        writer = self._writer
        assert writer is not None
        gap_end = max(self._progress_at, writer.progress_at) + self._read_timeout
        if not self._upload_done and not writer.paused:
            # Waiting on the caller's request body, not on the upstream.
            gap_end = now + self._read_timeout
        if now >= gap_end:
            self._fail(
                UpstreamTimeout(
                    f"no progress from {self._owner.address} for {self._read_timeout:g} s"
                )
            )
            return
        when = gap_end if deadline is None or gap_end < deadline else deadline
        if end is not None and end < when:
            when = end
        self._deadlines.set(self, when, self._on_timer)

    def _finish(self) -> None:
        resp = self._resp
        assert resp is not None
        self._end_exchange()
        keep = self._keep_alive and not self._broken and self._upload_done and not self.lost
        if self.reading_paused:
            self._resume()
        # Released first: a receiver may send its connection's next request in _complete.
        if keep:
            self._owner.release(self)
        else:
            self.close()
        resp._complete()

    def _fail(self, exc: BaseException) -> None:
        resp = self._resp
        if resp is None:
            return
        fut = self._head_fut
        self._end_exchange()
        if fut is not None and not fut.done():
            fut.set_exception(exc)
        else:
            resp._fail(exc)
        self._abort()

    def abandon(self) -> None:
        """Drop the exchange (caller cancelled, or closed the response early)."""
        if self._resp is not None:
            self._end_exchange()
            self._abort()

    def _end_exchange(self) -> None:
        self._resp = None
        self._head_fut = None
        self._deadlines.clear(self)
        upload = self._upload
        if upload is not None:
            self._upload = None
            if not upload.done():
                upload.cancel()
                self._upload_done = False

    # Flow control.

    def consumed(self, below_low_water: bool) -> None:
        """The consumer took a chunk while reading was paused."""
        self._progress_at = self._loop.time()
        if below_low_water:
            self._resume()

    def _resume(self) -> None:
        self.reading_paused = False
        if self._transport is not None and not self.lost:
            self._transport.resume_reading()

    def pause_writing(self) -> None:
        if self._writer is not None:
            self._writer.pause_writing()

    def resume_writing(self) -> None:
        if self._writer is not None:
            self._writer.resume_writing()

    # asyncio.Protocol.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._writer = BodyWriter(self._transport, self._loop)

    def data_received(self, data: bytes) -> None:
        resp = self._resp
        parser = self._parser
        if resp is None or parser is None:
            # Bytes while idle: the server is confused or closing; never reuse.
            self._broken = True
            self._abort()
            return
        fresh = not self._got_data
        self._got_data = True
        self._progress_at = self._loop.time()
        in_head = not self._head_done
        if in_head:
            self._head_bytes += len(data)
        # The usual response, whole in its exchange's first read, read in C when it is on.
        whole = _C.parse_response(data, self._head_request) if _C is not None and fresh else None
        try:
            if whole is None:
                parser.feed_data(data)
            else:
                replay(self, resp, whole)
        except HttpParserUpgrade as exc:
            self._broken = True
            self._fail_from(UpstreamProtocolError("unexpected protocol switch"), exc)
        except HttpParserError as exc:
            self._broken = True
            if not self._message_done:
                self._fail_from(UpstreamProtocolError(f"malformed response: {exc}"), exc)
        if in_head and not self._head_done and self._head_bytes > MAX_RESPONSE_HEAD:
            self._broken = True
            self._fail(UpstreamHeadTooLarge(f"response head over {MAX_RESPONSE_HEAD} bytes"))
        if self._resp is resp:
            if self._message_done:
                self._finish()
            elif self._head_fut is None:  # `send()`: the receiver writes as reads end
                resp._flush()

    def _fail_from(self, err: UpstreamError, cause: BaseException) -> None:
        err.__cause__ = cause
        self._fail(err)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._writer is not None:
            self._writer.connection_lost()
        if self._resp is not None:
            if not self._head_done:
                if self.reused and not self._got_data:
                    self._fail(
                        StaleConnection(f"reused connection to {self._owner.address} closed")
                    )
                else:
                    self._fail(
                        UpstreamProtocolError(
                            f"{self._owner.address} closed the connection before the response head"
                        )
                    )
            elif not self._framed and exc is None and not self._message_done:
                self._message_done = True  # a body delimited by the end of the connection
                self._finish()
            else:
                self._fail(
                    UpstreamProtocolError(
                        f"{self._owner.address} closed the connection before the end of the body"
                    )
                )
        self._owner.forget(self)
        if self._lost_waiter is not None and not self._lost_waiter.done():
            self._lost_waiter.set_result(None)

    # httptools callbacks.

    def on_message_begin(self) -> None:
        if self._message_done:
            self._broken = True  # a second response to one request

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done or self._message_done:
            return  # trailers, or a response nobody asked for
        self._raw_headers.append((name, value))
        size = len(name)
        if size == 14 and name.lower() == b"content-length":
            self._framed = True
            self._content_length = value
        elif size == 17 and name.lower() == b"transfer-encoding":
            # Only `chunked` is taken (as nginx does): the field is hop-by-hop, so any
            # other coding (`gzip, chunked`) would reach the client undecoded and unsaid.
            self._framed = True
            if value.strip().lower() != b"chunked":
                self._coded = True

    def on_headers_complete(self) -> None:
        resp = self._resp
        parser = self._parser
        if resp is None or parser is None or self._head_done or self._message_done:
            return
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                self._fail(UpstreamProtocolError("unexpected 101 Switching Protocols"))
                return
            self._interim = True  # 100 Continue, 103 Early Hints: wait for the real head
            self._reason = b""
            self._raw_headers = []
            self._framed = False
            self._content_length = None
            return
        if self._coded:
            self._broken = True
            self._fail(UpstreamProtocolError("unsupported transfer coding in the response"))
            return
        self._head(resp, status, self._head_request and parser.should_keep_alive())

    def _head(self, resp: Receiver, status: int, keep_alive: bool) -> None:
        """A final head has arrived; `keep_alive` is `should_keep_alive()` (a HEAD's)."""
        resp.status = status
        resp.reason = self._reason.decode("latin-1")
        resp.raw_headers = self._raw_headers
        self._head_done = True
        limit, declared = self._max_body, self._content_length
        if limit is not None and declared is not None and int(declared) > limit:
            self._fail(UpstreamBodyTooLarge(f"response body over {limit} bytes"))
            return
        if self._head_request:
            # The head is the whole response; the parser would wait for a body that never
            # comes, so the next exchange gets a fresh one.
            self._keep_alive = keep_alive
            self._message_done = True
            self._parser = None
        fut = self._head_fut
        if fut is None:
            resp._head()  # `send()`
        elif not fut.done():
            fut.set_result(None)

    def on_body(self, body: bytes) -> None:
        resp = self._resp
        if resp is None or self._message_done:
            self._broken = True
            return
        self._received += len(body)
        if self._max_body is not None and self._received > self._max_body:
            self._fail(UpstreamBodyTooLarge(f"response body over {self._max_body} bytes"))
            return
        if (
            resp._feed(body) > HIGH_WATER
            and not self.reading_paused
            and self._transport is not None
        ):
            self.reading_paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._resp is None or self._message_done or self._parser is None:
            return
        self._keep_alive = self._parser.should_keep_alive()
        self._message_done = True

    # Closing.

    def usable(self) -> bool:
        """Open and not closing (a closing transport has not reported its loss yet)."""
        return not self.lost and self._transport is not None and not self._transport.is_closing()

    def close(self) -> None:
        """Close the connection; an exchange in progress fails with `UpstreamError`."""
        if self._resp is not None:
            self._fail(UpstreamError(f"connection to {self._owner.address} closed by the pool"))
        elif self._transport is not None and not self.lost:
            self._transport.close()

    def _abort(self) -> None:
        if self._transport is not None and not self.lost:
            self._transport.abort()

    async def wait_closed(self) -> None:
        if not self.lost:
            if self._lost_waiter is None:
                self._lost_waiter = self._loop.create_future()
            await self._lost_waiter
