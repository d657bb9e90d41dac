"""`StrictHttp`: Sanic's HTTP/1.1 connection handler where a proxy must be stricter than
Sanic. Both Sanic services serve with it (`HTTP_CLASS` of their protocols).

- **Chunked request bodies** are parsed as RFC 9112 §7.1 writes them: a chunk size is
  ASCII hex digits (Sanic's `int(size, 16)` also takes `0x5`, ` 5` and Unicode
  digits), a chunk extension holds no control character, and chunk data ends in a
  CRLF (Sanic skips the two bytes unchecked). A front end that frames such a body
  differently from the gateway is the TE.TE request-smuggling vector, and the gateway
  forwards bodies re-framed: so anything else is a 400 and the connection closes.
  A bare LF ending a size line (`5\\nhello`), chunk data or the body is refused as
  soon as it arrives (Sanic waited for a CRLF that never came, until the response
  timeout: a 503 for a malformed request). `Content-Length` is checked before
  (`common.http_head`).
- **Trailer fields** after a chunked body's last chunk (`0\\r\\nX-Checksum: abc\\r\\n\\r\\n`,
  RFC 9112 §7.1.2) are read and dropped: each must be a well-formed field line, the
  section is bounded as a head is (`HEADER_MAX_SIZE`; more is a 431), and none is
  passed on (the proxy re-frames the body it forwards, with no trailer, as a proxy
  that does not know a trailer field may; nor does any handler see one). Sanic
  refused every trailer with a 400.
- **A stalled request body** (nginx's `client_body_timeout`): a handler waiting for body
  bytes that do not come within the request timeout (`REQUEST_TIMEOUT`, Sanic's
  `REQUEST_TIMEOUT`, which bounds each wait for a head's next bytes too) gets a 408
  `request_timeout`, and the connection closes. Sanic counted the wait in its response
  timeout (a 503, as if the service had failed), then waited for the rest of the body
  with no bound at all: the socket stayed open for as long as the client kept it.
  Whenever a connection is to close after a response, the unread rest of the body is not
  waited for (the gateway's lingering close drops what still comes, for a bounded time).
- **A request head that keeps trickling** (slowloris; nginx's `client_header_timeout`):
  the whole head must arrive within `REQUEST_HEAD_TIMEOUT` of the read that began it
  (the app's `REQUEST_HEAD_TIMEOUT` config, by default its `REQUEST_TIMEOUT`), else a
  408 `request_timeout` and the connection closes. Sanic's own bound on the head is
  the request timeout counted from the last byte read: a client sending a byte a
  little more often held a connection for good.
- **A response given before any of the request's body was read** (a 401 from the access
  check, a 404) closes the connection after it unless the whole body has already
  arrived: the body nobody asked for is not waited for (a client sending it slowly
  held the connection), and keeping the connection would mean reading it all.
- **An oversized head** is a 431 `request_header_fields_too_large` (a 414
  `uri_too_long` when its request line alone passes the bound) where Sanic answered
  413, a status about bodies.
- **`Connection`** is read as the list of tokens it is (RFC 9110 §7.6.1, RFC 9112 §9.3):
  a connection closes after the request when a token is `close` (or, in HTTP/1.0,
  unless one is `keep-alive`). Sanic compared the whole value to `keep-alive`, so
  `Connection: keep-alive, X-Foo` or `Connection: X-Foo` closed it.
- **A request head whose lines end in a bare LF** (`GET / HTTP/1.1\\nHost: a\\n\\n`)
  is a 400 as soon as its empty last line arrives, and the connection closes: Sanic
  waited for a CRLF CRLF that never came, until the request timeout (408). (A bare
  LF inside a head that does end in CRLF CRLF is `common.http_head`'s to refuse.)
- **Empty lines before a request line** (a client's CRLF after the previous request's
  body, RFC 9112 §2.2) are dropped, as nginx does and as the gateway's pass-through
  splice does (`webapi.passthrough`): Sanic took them for an empty request line (400).
  They restart no timer: the head's deadline (`REQUEST_HEAD_TIMEOUT`) runs from the
  first of them, so a client sending one now and then holds no connection.
- **A target Sanic cannot make a request of** (a TAB in it, CONNECT's authority form)
  gets the usual 400 JSON error. Sanic builds its error-handling request from the same
  target, fails again, and the client got no answer at all and the log a traceback.
- **`Expect: 100-continue`**: a final answer given before the body was asked for (a
  401, a 413) goes out without the `100 Continue` Sanic would put before it, and the
  connection closes after it (RFC 9110 §10.1.1): the client then need not send a body
  nobody reads, and one already sent is drained by the lingering close.
- **HTTP/1.0 clients** never get `Transfer-Encoding: chunked` (RFC 9112 §6.1): a
  streamed response of unknown length is delimited by closing the connection, as
  nginx does.
- **Transfer coding names are case-insensitive** (RFC 9112 §7): a request's
  `Transfer-Encoding: Chunked` is chunked (Sanic compares the value to `chunked`
  exactly, and refused it as a bad Content-Length). Any other coding (`gzip,
  chunked`) is a 400 saying so, and the connection closes: its body cannot be
  framed. (RFC 9112 §6.1 suggests a 501 where the coding is well formed, as nginx
  answers it; our rule is that a request the gateway cannot take is a 4xx.)
  `StrictRequest` reads the field as Sanic builds the request, before Sanic does.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from sanic import Request
from sanic.compat import Header
from sanic.exceptions import (
    BadRequest,
    PayloadTooLarge,
    RequestTimeout,
    SanicException,
    ServiceUnavailable,
)
from sanic.headers import format_http1_response
from sanic.helpers import has_message_body
from sanic.http import Http, Stage

from common.http_head import EMPTY_LINE, MAX_HEAD, connection_tokens, well_formed_field

# `\r\n` (the end of the previous chunk's data, or of the head), then a chunk-size line:
# hex digits, optionally a chunk extension (`BWS ";" ...`, no control character but
# tab), and CRLF (RFC 9112 §7.1.1).
_CHUNK_LINE = re.compile(rb"\r\n([0-9A-Fa-f]+)(?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?\r\n")
# The longest chunk-size line taken (Sanic's own bound).
_MAX_CHUNK_LINE = 64
# The empty line ending a head whose lines end in a bare LF, looked for only where
# there is no CRLF CRLF (the `\n\r\n` a CR precedes is the end of a proper head).
_LF_HEAD_END = re.compile(rb"\n\r?\n")


# The 408's message (the gateway's fast path, which holds a body itself, says it too).
BODY_STALLED = "the request body stalled: no byte of it came in time"
# The 408's message when the head has not all come within its deadline.
HEAD_STALLED = "the request head did not all come in time"


def head_timeout(protocol: Any) -> float:
    """How long after its first bytes a request head may take to come whole on the
    connection of `protocol` (Sanic's `HttpProtocol`): the app's `REQUEST_HEAD_TIMEOUT`,
    else (0, unset) its request timeout."""
    deadline: float = protocol.app.config.get("REQUEST_HEAD_TIMEOUT") or protocol.request_timeout
    return deadline


def _drop_empty_lines(buf: bytearray) -> None:
    """Drop the empty lines at the start of `buf`, before a request line (module docstring)."""
    kept = buf.lstrip(EMPTY_LINE)
    if len(kept) != len(buf):
        del buf[: len(buf) - len(kept)]


class HeaderFieldsTooLarge(SanicException):
    """A request head (or a chunked body's trailer section) over the size bound."""

    status_code = 431
    code = "request_header_fields_too_large"
    quiet = True


class UriTooLong(SanicException):
    """A request line over the head's size bound."""

    status_code = 414
    code = "uri_too_long"
    quiet = True


def oversized_head(buf: bytes | bytearray, limit: int) -> HeaderFieldsTooLarge | UriTooLong:
    """The refusal of the request head at the start of `buf`, over `limit` bytes: a 414
    when its request line alone passes `limit`, else a 431 (module docstring)."""
    if buf.find(b"\r\n", 0, limit) == -1:
        return UriTooLong("the request line is too long")
    return HeaderFieldsTooLarge("the request's header fields are too large")


class StrictHttp(Http):
    """Sanic's `Http` made strict where the module docstring says."""

    __slots__ = ("_awaiting_body",)
    # Fixed here: Sanic sets `Http.HEADER_MAX_SIZE` for the whole process, as the least
    # of REQUEST_MAX_HEADER_SIZE (8 KiB by default), REQUEST_MAX_SIZE (a body's bound:
    # the websocket service's 1 KiB made its heads 1 KiB) and others, at each app's config.
    HEADER_MAX_SIZE = MAX_HEAD

    def __init__(self, protocol: Any) -> None:
        super().__init__(protocol)  # type: ignore[no-untyped-call]
        self._awaiting_body = False  # a handler is waiting for body bytes (or was, when cut)
        self._receive_more = self._receive_bounded

    def init_for_request(self) -> None:
        super().init_for_request()  # type: ignore[no-untyped-call]
        self._awaiting_body = False

    async def _receive_bounded(self) -> None:
        """Sanic's wait for more bytes; while a handler waits for the request's body,
        bounded by the request timeout (then 408). A head's waits are bounded by Sanic's
        own check of the same timeout, and the whole head by its deadline
        (`http1_request_header`)."""
        if self.stage is not Stage.HANDLER:
            await self.protocol.receive_more()  # type: ignore[no-untyped-call]
            return
        self._awaiting_body = True
        try:
            async with asyncio.timeout(self.protocol.request_timeout):
                await self.protocol.receive_more()  # type: ignore[no-untyped-call]
        except TimeoutError:
            raise self._body_timed_out() from None
        self._awaiting_body = False

    def _body_timed_out(self) -> RequestTimeout:
        """The 408 of a stalled body; the connection closes after it, unread."""
        self.keep_alive = False
        self.request_body = None  # (the lingering close drops what still comes)
        return RequestTimeout(BODY_STALLED)

    async def error_response(self, exception: Exception) -> None:
        if self._awaiting_body and isinstance(exception, ServiceUnavailable):
            # Sanic's response timeout, struck while the handler waited for the body: the
            # client's delay, not the service's.
            exception = self._body_timed_out()
        await super().error_response(exception)
        if not self.keep_alive:
            # Sanic would now wait for the rest of the body with no bound; the lingering
            # close drops it instead, for a bounded time.
            self.request_body = None

    async def read(self) -> bytes | None:
        if self.expecting_continue and (self.request_bytes or 0) > self.request_max_size:
            # A declared length over the limit: refused before the 100 Sanic would send.
            raise PayloadTooLarge("Request body exceeds the size limit")
        framing: object = self.request_body  # (Sanic's stub says bytes; it is "chunked")
        if framing == "chunked" and self.request_bytes_left == 0:
            await self._check_chunk_line()
        return await super().read()

    async def _check_chunk_line(self) -> None:
        """Wait for the next chunk-size line and refuse it unless well formed: Sanic's
        `read()` then parses it again, knowing its size is plain hex."""
        buf = self.recv_buffer
        # The line ends at its first LF, CR or not: a bare LF is refused on arrival,
        # not waited past. So are two bytes after chunk data that are not CRLF.
        while (end := buf.find(b"\n", 2)) == -1:
            if len(buf) > _MAX_CHUNK_LINE or (len(buf) >= 2 and buf[:2] != b"\r\n"):
                break
            await self._receive_more()
        line = None if end == -1 else _CHUNK_LINE.fullmatch(buf, 0, end + 1)
        if line is None:
            self.keep_alive = False
            raise BadRequest("Bad chunked encoding")
        if not line.group(1).strip(b"0"):
            await self._check_body_end(end + 1)

    async def _check_body_end(self, start: int) -> None:
        """After the last chunk's size line (ending before `start`), the trailer section
        and the CRLF ending the body: trailer fields are checked, then dropped from the
        buffer (Sanic refuses any), so that they are never passed on. A bare LF is
        refused at once, where Sanic waits for a second byte."""
        buf = self.recv_buffer
        limit = self.HEADER_MAX_SIZE
        pos = start
        while True:
            while (end := buf.find(b"\n", pos)) == -1:
                if len(buf) - start > limit:
                    self.keep_alive = False
                    raise HeaderFieldsTooLarge("the chunked body's trailer fields are too large")
                await self._receive_more()
            if end == pos + 1 and buf[pos] == 0x0D:  # the empty line: the body's end
                break
            if buf[end - 1] != 0x0D or not well_formed_field(buf[pos : end - 1]):
                self.keep_alive = False
                raise BadRequest("Bad chunked encoding")
            pos = end + 1
            if pos - start > limit:
                self.keep_alive = False
                raise HeaderFieldsTooLarge("the chunked body's trailer fields are too large")
        del buf[start:pos]  # the trailer fields: read, never passed on

    async def http1_request_header(self) -> None:
        buf = self.recv_buffer
        if buf and buf[0] in EMPTY_LINE:  # (Sanic calls this once bytes have come)
            _drop_empty_lines(buf)
        end = buf.find(b"\r\n\r\n")
        if end == -1:  # not whole yet: rare, once read
            await self._receive_head_in_time()
            end = buf.find(b"\r\n\r\n")
        if end == -1 or end >= self.HEADER_MAX_SIZE:
            self.keep_alive = False
            raise oversized_head(buf, self.HEADER_MAX_SIZE)
        try:
            await super().http1_request_header()  # type: ignore[no-untyped-call]
        except BadRequest as exc:
            if not str(exc).startswith("Bad URL"):
                raise
            # Sanic's message quotes the target, which may hold a credential and is logged.
            raise BadRequest("malformed request target") from None
        self.keep_alive = self._persistent()

    def _persistent(self) -> bool:
        """Whether the connection stays open after this request, from its `Connection`
        tokens (see the module docstring)."""
        request = self.request
        values = request.headers.getall("connection", None)
        tokens = {t for v in values for t in connection_tokens(v)} if values else ()
        if "close" in tokens or not self.protocol.app.config.KEEP_ALIVE:
            return False
        return request.version == "1.1" or "keep-alive" in tokens

    async def _receive_head_in_time(self) -> None:
        """`_receive_head` within the head's deadline, counted from now (the read that
        began the head has just been taken): Sanic's check of the request timeout
        restarts at every byte, and bounds a head sent a byte at a time not at all."""
        try:
            async with asyncio.timeout(head_timeout(self.protocol)):
                await self._receive_head()
        except TimeoutError:
            self.keep_alive = False
            raise RequestTimeout(HEAD_STALLED) from None

    async def _receive_head(self) -> None:
        """Wait, as Sanic's `http1_request_header` does, until the buffer holds a CRLF
        CRLF (or passes Sanic's head size limit, which Sanic then refuses), but refuse
        a head that has ended in a bare-LF empty line instead. (A head that came whole
        costs its caller one `find`, and no call of this.)"""
        buf = self.recv_buffer
        start = 0
        while True:
            if not start:  # nothing of the request line yet: empty lines before it go
                _drop_empty_lines(buf)
            if buf.find(b"\r\n\r\n", start) != -1:
                return
            if _LF_HEAD_END.search(buf, start) is not None:
                self.keep_alive = False
                raise BadRequest("the request head's lines must end in CRLF, not a bare LF")
            start = max(0, len(buf) - 3)
            if start >= self.HEADER_MAX_SIZE:
                return
            await self._receive_more()

    def create_empty_request(self) -> None:
        try:
            super().create_empty_request()
        except BadRequest:  # the target itself is what failed (Sanic's `BadURL`)
            self.url = "*"
            super().create_empty_request()

    async def http1_response_header(self, data: bytes, end_stream: bool) -> None:
        if self.expecting_continue or self._body_unread():
            # Answered before the body was asked for: no 100, and no keep-alive, since
            # the client may or may not send the body now (or is sending it slowly).
            # Nor is the body waited for (Sanic would, to keep the connection, with no
            # bound): the lingering close drops it.
            self.expecting_continue = False
            self.keep_alive = False
            self.request_body = None
        response = self.response
        assert response is not None and self.request is not None
        if (
            self.request.version == "1.0"
            and not end_stream
            and not self.head_only
            and "content-length" not in response.headers
            and has_message_body(response.status)  # type: ignore[no-untyped-call]
        ):
            await self._close_delimited_header(data)
            return
        await super().http1_response_header(data, end_stream)

    def _body_unread(self) -> bool:
        """None of the request's body has been read, and it has not all arrived either
        (a Content-Length body that has is read at once: the connection may stay)."""
        framing: object = self.request_body
        if not framing or self.request_bytes != self.request_bytes_left:
            return False  # no body, or the handler has read some of it
        if framing == "chunked":
            return True
        return len(self.recv_buffer) < (self.request_bytes_left or 0)

    async def _close_delimited_header(self, data: bytes) -> None:
        """Send a streamed response's head to an HTTP/1.0 client with no framing: its body
        ends where the connection does."""
        response = self.response
        assert response is not None
        self.keep_alive = False
        self.response_size = len(data)
        response.headers["connection"] = "close"
        if self.protocol.access_log:
            self.log_response()
        await self._send(format_http1_response(response.status, response.processed_headers) + data)
        self.response_func = self._close_delimited_body
        self.stage = Stage.RESPONSE

    async def _close_delimited_body(self, data: bytes, end_stream: bool) -> None:
        if data:
            await self._send(data)
        if end_stream:
            self.response_func = None  # type: ignore[assignment]
            self.stage = Stage.IDLE


class StrictRequest(Request):
    """Sanic's `Request` reading `Transfer-Encoding` as the module docstring says (the
    `request_class` of both services)."""

    __slots__ = ()

    def __init__(self, url_bytes: bytes, headers: Header, *args: Any, **kwargs: Any) -> None:
        coding = headers.get("transfer-encoding")
        if coding is not None and coding != "chunked":
            if coding.strip().lower() != "chunked":
                raise BadRequest("Transfer-Encoding: only chunked is supported")
            headers["transfer-encoding"] = "chunked"  # (Sanic reads this very mapping)
        super().__init__(url_bytes, headers, *args, **kwargs)
