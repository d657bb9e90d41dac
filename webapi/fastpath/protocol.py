"""`FastPathProtocol`: Sanic's HTTP/1.1 protocol answering eligible `/svc/` requests
from `data_received` (see the package docstring for what is eligible and why), and
starting the splice of a pass-through route's request (`splicing.SplicingProtocol`,
its base, owns the splice once it has started)."""

from __future__ import annotations

import asyncio
from functools import partial
from time import monotonic as current_time
from typing import Any

from sanic.exceptions import RequestTimeout
from sanic.http.constants import Stage

from common.balancing import Endpoint
from common.balancing.sticky import balance_key
from common.log import get_logger, request_id_var
from common.policy import RouteRule
from common.request_ids import request_id_of
from common.strict_http import BODY_STALLED
from webapi.context import GatewayApp
from webapi.errors import ApiError, log_cut
from webapi.fastpath.admission import admit, allowed, may_qualify
from webapi.fastpath.direct import DirectExchange
from webapi.fastpath.request import Incomplete, Parsed, parse_request
from webapi.fastpath.response import CHUNKED, WHOLE, bodiless_framing, client_head
from webapi.fastpath.splicing import SplicingProtocol
from webapi.passthrough_routes import passthrough_request
from webapi.proxy.attempts import Attempts
from webapi.proxy.forward import Forwarded
from webapi.splice import connect

log = get_logger("webapi.fastpath")

# Bytes held while a fast request is answered; beyond this the socket stops being read.
_HOLD_LIMIT = 256 * 1024


class FastPathProtocol(SplicingProtocol):
    """Sanic's HTTP/1.1 protocol, answering eligible `/svc/` requests itself."""

    __slots__ = ("_awaiting", "_fast", "_fast_ok", "_fast_written", "_held")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held = bytearray()
        self._awaiting = 0  # held bytes the request needs before it is parsed again
        # The fast request being answered: a coroutine's task, or a `DirectExchange`.
        self._fast: asyncio.Task[None] | DirectExchange | None = None
        self._fast_written = False  # some of the current coroutine's response is written
        config = self.app.config
        self._fast_ok = not (config.get("SERVER_NAME") or config.FORWARDED_SECRET
                             or config.PROXIES_COUNT or config.REAL_IP_HEADER)  # fmt: skip

    # asyncio.Protocol callbacks

    def data_received(self, data: bytes) -> None:
        splice = self._passthrough
        if splice is not None:
            # (empty lines between requests are no activity: `PassThrough.from_client`)
            if splice.from_client(data):
                self._time = current_time()
            return
        if self._fast is not None or self._held:  # answering, or a body is arriving
            self._time = current_time()
            self._held += data
            if self._fast is None:
                if len(self._held) >= self._awaiting:  # (a body still arriving: wait)
                    self._pump()
            elif len(self._held) > _HOLD_LIMIT and self.transport is not None:
                self.transport.pause_reading()
            return
        if not (data and self._fast_ok and self._sanic_idle()):
            super().data_received(data)
            return
        self._time = current_time()
        self._held += data
        self._pump(idle=True)

    def connection_lost(self, exc: Exception | None) -> None:
        task, self._fast = self._fast, None
        if task is not None:
            task.cancel()
        self._held.clear()
        super().connection_lost(exc)

    # Sanic's connection bookkeeping

    def check_timeouts(self) -> None:
        """Sanic's timeouts (a splice's: `SplicingProtocol.check_timeouts`); while a fast
        request runs (Sanic sees an idle connection) the response timeout applies,
        counted from the last byte read or written, and while its body is held, the
        request timeout."""
        task = self._fast
        if task is None and self._held:  # a request body on its way: the request timeout
            if current_time() - self._time > self.request_timeout:
                self._body_timed_out()
                return
        elif task is None:
            super().check_timeouts()
            return
        elif current_time() - self._time > self.response_timeout:
            log.info("response timeout: closing the connection")
            task.cancel()
            self.close()
            return
        if self._task:
            self._pace_checks()

    def close_if_idle(self) -> bool:
        if self._fast is not None:
            return False  # closed once its response is written (`signal.stopped`)
        result: bool = super().close_if_idle()
        return result

    def resume_writing(self) -> None:
        super().resume_writing()
        if isinstance(self._fast, DirectExchange):
            self._fast.resume()

    # Pass-through routes (`webapi.passthrough`)

    async def _start_passthrough(self, rule: RouteRule, method: str, url: bytes) -> None:
        """Connect to an instance of the route's service, then splice (or answer the error)."""
        app: GatewayApp = self.app
        try:
            leg, attempts = await connect(app.ctx.proxy, rule.service, method, self.transport,
                                          bind_host=app.ctx.settings.bind_host)  # fmt: skip
        except Exception as exc:  # (a cancellation is not an Exception: it goes through)
            app.ctx.passthrough.connect_failures += 1
            self._fast = None
            if self.transport is not None and not self.transport.is_closing():
                # (Before the head is whole: the peer.)
                client = partial(self._held_client, self._held)
                self.transport.write(self._error(exc, method, url, request_id_of(None), False,
                                                 client))  # fmt: skip
            self._held.clear()
            self.close()
            return
        self._fast = None
        transport = self.transport
        if transport is None or transport.is_closing():
            leg.transport.close()  # type: ignore[union-attr]
            attempts.closed()
            return
        held = bytes(self._held)
        self._held.clear()
        self._splice(transport, rule, leg, attempts, held)

    # The fast path

    def _sanic_idle(self) -> bool:
        # Sanic's `http` property, without its Python call per request (hot path).
        http = getattr(self, "_http", None)
        if http is None:  # the connection task has not started yet (or has ended)
            return self._task is not None
        return (
            http.stage is Stage.IDLE
            and http.keep_alive
            and not getattr(http, "request_body", None)  # no body of a request left to drain
            and not self.recv_buffer
        )

    def _pump(self, idle: bool | None = None) -> None:
        """Answer the request at the start of the held bytes, or hand them all to Sanic.
        `idle`: whether Sanic's side of the connection is idle, when already known."""
        app: GatewayApp = self.app
        self._awaiting = 0
        if idle is None:
            idle = self._sanic_idle()
        # Where the method ends: one glance at the request line serves every check below.
        space = self._held.find(b" ", 0, 16) if idle else -1
        if space > 0:
            route = passthrough_request(self._held, space, app.ctx.policy.current, app.ctx.gate)
            if route is not None:
                self._fast = self.loop.create_task(self._start_passthrough(*route))
                return
        try:
            worth = space > 0 and may_qualify(app.ctx, self._held, space)
            parsed = parse_request(self._held) if worth else None
            if isinstance(parsed, Incomplete):
                if allowed(app.ctx, parsed.head):
                    # Wait for the rest of the body (`check_timeouts` bounds the wait).
                    self._awaiting = parsed.needed
                    return
                # Sanic's: a credential it must check, or refuse (401) without waiting
                # for a body nobody will read.
                parsed = None
            admitted = (admit(app.ctx, parsed, self._peer, self._scheme)
                        if isinstance(parsed, Parsed) else None)  # fmt: skip
        except Exception:  # a bug here must not lose the bytes: Sanic still answers them
            log.exception("fast path: parsing or admission failed")
            parsed = admitted = None
        if not isinstance(parsed, Parsed) or admitted is None:
            data = bytes(self._held)
            self._held.clear()
            app.ctx.fast_path.handed_over += 1
            super().data_received(data)
            return
        del self._held[: parsed.size]
        if len(self._held) <= _HOLD_LIMIT and self.transport is not None:
            self.transport.resume_reading()
        self._start(parsed, admitted)

    def _body_timed_out(self) -> None:
        """The held request's body stalled for the request timeout: a 408, as Sanic's path
        answers it (`common.strict_http`), and the connection closes (lingering)."""
        held = bytes(self._held)
        self._held.clear()
        self._refuse_held(held, RequestTimeout(BODY_STALLED))

    def _start(self, req: Parsed, head: bytes) -> None:
        """Choose the instance; send on one of its idle connections (`DirectExchange`),
        or, when it has none, forward from a coroutine. Hot path."""
        app: GatewayApp = self.app
        proxy = app.ctx.proxy
        first = req.first
        request_id = first[b"x-request-id"]
        # Whether the connection stays open after it; a coroutine's try (`_answer`) reads it too.
        # (The item, not the attribute: Sanic's `Config.__getattr__` is Python, per request.)
        keep_alive = req.keep_alive = req.keep_alive and bool(app.config["KEEP_ALIVE"])
        hash_on = proxy.policy.hash_on(req.service)
        if hash_on is None:  # the default header, already read by the parse; empty: no key
            key = first.get(b"x-balance-key") or None
        else:
            key = balance_key(hash_on, req.header, partial(self._client_address, req))
        try:
            attempts = proxy.attempts(
                req.service, req.method, version=first.get(b"x-service-version") or None, key=key
            )
            endpoint = attempts.next()
        except ApiError as exc:  # no such service, no healthy instance
            self.fast_error(exc, req, request_id, keep_alive and not self.signal.stopped)
            return
        conn = proxy.pool.idle_connection(endpoint.address)
        if conn is None:
            self._fast = self.loop.create_task(self._answer(req, head, attempts, endpoint))
            return
        exchange = DirectExchange(self, req, head, request_id, attempts, keep_alive, conn)
        self._fast = exchange
        app.ctx.fast_path.direct += 1
        exchange.start(self.loop.time())

    # What a `DirectExchange` calls.

    def fast_write(self, data: bytes) -> int:
        """Write to the client; the bytes its socket has yet to take (0 once it is gone:
        `connection_lost` ends the exchange)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return 0
        transport.write(data)
        self._time = current_time()
        return int(transport.get_write_buffer_size())

    def fast_done(self, keep_alive: bool) -> None:
        """The fast request's response is written: go on with the connection."""
        self.app.ctx.fast_path.answered += 1
        self._fast = None
        if not keep_alive or self.signal.stopped:
            self._held.clear()
            self.close()
        elif self._held:
            self._pump()

    def fast_error(self, exc: Exception, req: Parsed, request_id: str, keep_alive: bool) -> None:
        """Answer the fast request with `exc`'s JSON error response."""
        client = partial(self._client_address, req)
        self.fast_write(self._error(exc, req.method, req.url, request_id, keep_alive, client))
        self.fast_done(keep_alive)

    def fast_cut(self, req: Parsed, exc: BaseException) -> None:
        """The upstream's body failed after some of the response was written: logged
        within its service's budget (`webapi.errors.log_cut`); the caller closes."""
        app: GatewayApp = self.app
        log_cut(app.ctx.error_logs, req.service, exc)

    def fast_retry(self, req: Parsed, head: bytes, attempts: Attempts, stale: bool) -> None:
        """Go on with the request from a coroutine: on the same instance over a new
        connection (`stale`: its reused one went stale, the pool's retry rule), else on
        the next instance `attempts` allows."""
        self._fast = self.loop.create_task(
            self._answer(req, head, attempts, attempts.endpoint if stale else None, stale)
        )

    async def _answer(
        self,
        req: Parsed,
        head: bytes,
        attempts: Attempts,
        first: Endpoint | None,
        stale_first: bool = False,
    ) -> None:
        """Forward one admitted request from a coroutine (a connect is needed, or a
        retry) and write its response."""
        app: GatewayApp = self.app
        request_id = req.first[b"x-request-id"]
        request_id_var.set(request_id)
        keep_alive = req.keep_alive  # (`_start` applied KEEP_ALIVE)
        self._fast_written = False
        try:
            forwarded = await app.ctx.proxy.forward(
                req.service, req.method, req.target, head, req.body,
                attempts=attempts, first=first, stale_first=stale_first,
            )  # fmt: skip
            keep_alive = keep_alive and not self.signal.stopped  # shutting down: say so
            try:
                await self._relay(req, forwarded, request_id, keep_alive)
            finally:
                # No `await` in a `finally` here: mypyc compiles one so that, on the way
                # out without an exception, it re-raises whatever `sys.exc_info()`
                # holds, and compiled coroutines leave there the exception they last
                # handled (another request's cut answer, say): a whole answer was then
                # logged as cut and its client's keep-alive connection closed.
                forwarded.response.close()
        except asyncio.CancelledError:
            raise  # the connection was lost or timed out: nothing more to write
        except Exception as exc:
            if self.transport is None or self.transport.is_closing():
                return  # the client left (`connection_lost` ends the rest)
            if self._fast_written:
                # Half written: only closing the connection can tell the client.
                self.fast_cut(req, exc)
                keep_alive = False
            else:
                keep_alive = keep_alive and not self.signal.stopped
                client = partial(self._client_address, req)
                self._write(self._error(exc, req.method, req.url, request_id, keep_alive, client))
        self.fast_done(keep_alive)

    async def _relay(
        self, req: Parsed, forwarded: Forwarded, request_id: str, keep_alive: bool
    ) -> None:
        """Write the upstream's response: whole, or streamed (chunked)."""
        upstream = forwarded.response
        status = upstream.status
        framing = bodiless_framing(req.method, status)
        if framing is None:
            framing = WHOLE if upstream.complete else CHUNKED
        body = await upstream.read() if framing == WHOLE else b""
        head = client_head(
            status,
            upstream.raw_headers,
            framing=framing,
            length=len(body),
            upstream_seconds=forwarded.upstream_seconds,
            received=req.received,
            instance_id=forwarded.instance.instance_id,
            request_id=request_id,
            keep_alive=keep_alive,
        )
        if framing != CHUNKED:
            self._write(head + body)
            return
        self._write(head)
        async for chunk in upstream.stream():
            if chunk:
                await self._can_write.wait()
                self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        self._write(b"0\r\n\r\n")

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client connection is closed")
        transport.write(data)
        self._fast_written = True
        self._time = current_time()
