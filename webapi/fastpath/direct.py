"""`DirectExchange`: a fast-path request sent on an idle upstream connection and
answered from that connection's callbacks, with no task and no future per request.

Under steady load the chosen instance nearly always has an idle keep-alive
connection in the pool; then `FastPathProtocol` sends the request on it at once
(`Connection.send`) and this object, the connection's `Receiver`, writes the answer
to the client as the response arrives. Otherwise (a connection must be made) the
request takes the protocol's coroutine path (`Proxy.forward`), and so does a retry:
a failed try here hands its `Attempts` over, so the retry rule and the tries made
are the same either way (`webapi.proxy.attempts`).

Framing to the client: a response whose body arrives whole with its head (the
usual case) is written in one write with a `Content-Length`. Otherwise the head is
written at the end of the read it arrived in, and the body streams as it comes,
with the upstream's `Content-Length` when it had one, chunked when not; a client
slower than the upstream pauses the upstream's socket (`resume` un-pauses it).
A body that fails before the head is written (in the read the head came in: a
malformed chunk, a body over the limit) is answered as Sanic's routes answer a failed
body (`client_error`: 502 `upstream_failed`, 504 `upstream_timeout`); after it, only
closing the client's connection can tell (`upstream body failed`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from common.log import request_id_var
from webapi.errors import ApiError
from webapi.fastpath.request import Parsed
from webapi.fastpath.response import CHUNKED, KEPT, WHOLE, bodiless_framing, client_head
from webapi.proxy.attempts import client_error
from webapi.proxy.connection import StaleConnection
from webapi.proxy.errors import UpstreamError, UpstreamProtocolError
from webapi.proxy.upstream import stale_retry_allowed

if TYPE_CHECKING:
    from webapi.proxy.attempts import Attempts
    from webapi.proxy.connection import Connection


class Stopping(Protocol):
    stopped: bool


class Owner(Protocol):
    """What the exchange needs of the client connection's protocol (`FastPathProtocol`)."""

    signal: Stopping  # `stopped` while the server shuts down

    def fast_write(self, data: bytes) -> int: ...

    def fast_done(self, keep_alive: bool) -> None: ...

    def fast_error(
        self, exc: Exception, req: Parsed, request_id: str, keep_alive: bool
    ) -> None: ...

    def fast_retry(self, req: Parsed, head: bytes, attempts: Attempts, stale: bool) -> None: ...

    def fast_cut(self, req: Parsed, exc: BaseException) -> None: ...


class DirectExchange:
    """One request on one upstream connection (module docstring). Hot path."""

    __slots__ = ("_attempts", "_body", "_conn", "_framing", "_instance_id", "_owner", "_req",
                 "_request_head",
                 "_request_id", "_upstream_seconds", "answered", "ended", "head_written",
                 "keep_alive", "raw_headers", "reason", "status")  # fmt: skip

    def __init__(
        self,
        owner: Owner,
        req: Parsed,
        head: bytes,
        request_id: str,
        attempts: Attempts,
        keep_alive: bool,
        conn: Connection,
    ) -> None:
        self._owner = owner
        self._req = req
        self._request_head = head  # sent upstream; kept for a retry
        self._request_id = request_id
        self._attempts = attempts
        assert attempts.endpoint is not None  # the instance `conn` goes to
        self._instance_id = attempts.endpoint.instance_id
        self._conn = conn
        self.keep_alive = keep_alive
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._framing = WHOLE
        self._upstream_seconds = 0.0
        self.answered = False  # the response head has arrived
        self.head_written = False  # and has been written to the client
        self.ended = False

    def start(self, now: float) -> None:
        """Send the request; `now` is the loop's time (the timeouts count from it)."""
        req, attempts = self._req, self._attempts
        body = req.body
        remaining = attempts.remaining()  # of the total timeout, if the service has one
        end = None if remaining is None else now + remaining
        self._conn.send(self._request_head + body if body else self._request_head, self,
                        req.method == "HEAD", now + attempts.timeout, end)  # fmt: skip

    def cancel(self) -> None:
        """The client left or timed out: drop the exchange (its connection is closed)."""
        if not self.ended:
            self.ended = True
            self._conn.abandon()
            if not self.answered:
                self._attempts.abandoned()

    def resume(self) -> None:
        """The client's socket takes writes again: read the upstream's again."""
        conn = self._conn
        if not self.ended and conn.reading_paused:
            conn.consumed(True)

    # `Receiver`: called by the connection.

    def _head(self) -> None:
        self.answered = True
        self._upstream_seconds = self._attempts.answered(self.status)

    def _feed(self, data: bytes) -> int:
        if not self.head_written:
            self._body.append(data)  # written at the end of this read
            return 0
        if self._framing == CHUNKED:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        return self._owner.fast_write(data)

    def _flush(self) -> None:
        """A read ended inside the response: once the head is in, start streaming."""
        if self.ended or not self.answered or self.head_written:
            return
        framing = bodiless_framing(self._req.method, self.status)
        if framing is None:
            upstream_length = any(name.lower() == b"content-length" for name, _ in self.raw_headers)
            framing = KEPT if upstream_length else CHUNKED
        self._write_head(framing, 0)
        body, self._body = self._body, []
        for chunk in body:
            self._feed(chunk)

    def _complete(self) -> None:
        if self.ended:
            return
        self.ended = True
        owner = self._owner
        if self.head_written:
            if self._framing == CHUNKED:
                owner.fast_write(b"0\r\n\r\n")
        else:
            framing = bodiless_framing(self._req.method, self.status)
            if framing is None:
                body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
                self._write_head(WHOLE, len(body), body)
            else:
                self._write_head(framing, 0)
        owner.fast_done(self.keep_alive)

    def _fail(self, exc: BaseException) -> None:
        if self.ended:
            return
        self.ended = True
        owner, req = self._owner, self._req
        token = request_id_var.set(self._request_id)  # for the logs below
        try:
            if self.head_written:  # only closing the connection can tell the client
                owner.fast_cut(req, exc)
                owner.fast_done(False)
                return
            if self.answered:  # the body failed before any of it was written
                error = exc if isinstance(exc, Exception) else UpstreamError(str(exc))
                if isinstance(error, UpstreamError):  # as Sanic's routes answer it
                    error = client_error(req.service, error)
                owner.fast_error(error, req, self._request_id, self._keep_alive())
                return
            if isinstance(exc, StaleConnection):
                # The pool's rule: a reused connection closed before any response
                # byte is the idle-close race, not the instance's fault.
                if stale_retry_allowed(req.method, req.body):
                    owner.fast_retry(req, self._request_head, self._attempts, True)
                    return
                exc = UpstreamProtocolError(str(exc))
            if not isinstance(exc, UpstreamError):
                exc = UpstreamError(str(exc) or type(exc).__name__)
            try:
                self._attempts.failed(exc)
            except ApiError as error:
                owner.fast_error(error, req, self._request_id, self._keep_alive())
                return
            owner.fast_retry(req, self._request_head, self._attempts, False)
        finally:
            request_id_var.reset(token)

    # Writing.

    def _keep_alive(self) -> bool:
        return self.keep_alive and not self._owner.signal.stopped  # shutting down: say so

    def _write_head(self, framing: int, length: int, body: bytes = b"") -> None:
        self.keep_alive = self._keep_alive()
        self._framing = framing
        head = client_head(
            self.status,
            self.raw_headers,
            framing=framing,
            length=length,
            upstream_seconds=self._upstream_seconds,
            received=self._req.received,
            instance_id=self._instance_id,
            request_id=self._request_id,
            keep_alive=self.keep_alive,
        )
        self.head_written = True
        self._owner.fast_write(head + body if body else head)
