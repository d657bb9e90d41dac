"""`SplicingProtocol`: the part of `FastPathProtocol` that owns a pass-through splice
(`webapi.passthrough`, `webapi.tunnel`: the `webapi.splice.Owner` they call back) and
answers the refusals the fast path makes before it has a parsed request.

A splice takes the connection once the fast path has connected it to an instance
(`FastPathProtocol._start_passthrough`, then `_splice`); from then on its timeouts,
flow control and end are this class's, and the client's reads go to it
(`FastPathProtocol.data_received`). A fast request and a splice never run on the
connection together: `_fast` is cleared before `_passthrough` is set, so each
callback here may leave what it does not handle to the other class.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from time import monotonic as current_time
from typing import Any, cast

from sanic.exceptions import RequestTimeout

from common.clientip import peer_ip
from common.lingering import LingeringHttpProtocol
from common.policy import RouteRule
from common.request_ids import request_id_of
from common.strict_http import HEAD_STALLED, head_timeout, oversized_head
from webapi.context import GatewayApp
from webapi.fastpath.request import Parsed, parse_head
from webapi.fastpath.response import error_bytes
from webapi.passthrough import PassThrough
from webapi.proxy.attempts import Attempts
from webapi.splice import UpstreamLeg
from webapi.tunnel import Tunnel


class SplicingProtocol(LingeringHttpProtocol):
    """Sanic's HTTP/1.1 protocol as the owner of a splice, and the fast path's refusals
    (module docstring). `FastPathProtocol` builds on it."""

    __slots__ = ("_passthrough", "_peer", "_scheme")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Spliced to an upstream (`webapi.passthrough`, `webapi.tunnel`).
        self._passthrough: PassThrough | Tunnel | None = None
        # The connection's: its socket's peer address (for a request whose head has not
        # come whole, no `X-Forwarded-For` to read) and scheme, read once per connection
        # (`connection_made`) rather than from `conn_info` per request.
        self._peer = ""
        self._scheme = "http"

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[no-untyped-call]
        conn_info = self.conn_info
        self._peer = peer_ip(conn_info)
        self._scheme = "https" if conn_info and conn_info.ssl else "http"

    def connection_lost(self, exc: Exception | None) -> None:
        splice, self._passthrough = self._passthrough, None
        if splice is not None:
            splice.close()
        super().connection_lost(exc)  # type: ignore[no-untyped-call]

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[no-untyped-call]
        if self._passthrough is not None:
            self._passthrough.pause_upstream()

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[no-untyped-call]
        if self._passthrough is not None:
            self._passthrough.resume_upstream()

    # Sanic's connection bookkeeping

    def check_timeouts(self) -> None:
        """A splice gets the response timeout while a request is outstanding, the
        keep-alive timeout otherwise, and a head it holds (a tunnel: its first
        request's), the head's deadline (`common.strict_http`); without a splice,
        Sanic's timeouts."""
        splice = self._passthrough
        if splice is None:
            super().check_timeouts()  # type: ignore[no-untyped-call]
            return
        now = current_time()
        if splice.head_overdue(now, head_timeout(self)):
            self._head_timed_out(splice)
            if self._passthrough is None:
                return
        limit = self.response_timeout if splice.outstanding else self.keep_alive_timeout
        if now - self._time > limit:
            splice.close()
            self._passthrough = None
            self.close()
            return
        if self._task:
            self._pace_checks()

    def _pace_checks(self) -> None:
        """Set the next `check_timeouts` at this protocol's pace: half the least of the
        timeouts, the head deadline's too (a splice's head deadline is checked only there)."""
        interval = min(self.keep_alive_timeout, self.request_timeout, self.response_timeout,
                       head_timeout(self))  # fmt: skip
        self._callback_check_timeouts = self.loop.call_later(
            max(0.1, interval / 2), self.check_timeouts
        )

    def close_if_idle(self) -> bool:
        splice = self._passthrough
        if splice is None:
            result: bool = super().close_if_idle()
            return result
        if splice.outstanding:  # closed once the upstream has answered
            splice.end_after_answers()
            return False
        splice.close()
        self._passthrough = None
        self.close()
        return True

    # What a splice calls (`webapi.splice.Owner`)

    def touch(self) -> None:
        self._time = current_time()

    def passthrough_ended(self, leftover: bytes, close: bool) -> None:
        """The splice has ended: close, or go on as a fresh keep-alive connection."""
        self._passthrough = None
        self._time = current_time()
        if close or self.signal.stopped:
            self.close()
        elif leftover:
            # Straight to Sanic: the splice refused this request, so it must not
            # be offered to a splice again (a malformed one would go round forever).
            self.app.ctx.fast_path.handed_over += 1
            super().data_received(leftover)

    def passthrough_head_too_large(self, held: bytes, limit: int) -> None:
        """The checked splice has ended on the request head it held, `held`, over its
        bound `limit` (`PassThrough`): the 431 (414) Sanic's path answers a head over its
        own, and the connection closes (lingering)."""
        self._passthrough = None
        self._refuse_held(held, oversized_head(held, limit))

    def _splice(
        self,
        transport: asyncio.Transport,
        rule: RouteRule,
        leg: UpstreamLeg,
        attempts: Attempts,
        held: bytes,
    ) -> None:
        """Splice the connection (its `transport`) to `leg`, connected to an instance of
        `rule`'s service by `attempts`; `held`: the client's bytes read meanwhile."""
        app: GatewayApp = self.app
        splice: PassThrough | Tunnel
        if rule.tunnel:
            splice = Tunnel(self, leg, attempts, app.ctx.passthrough, self.loop)
        else:
            splice = PassThrough(self, leg, rule, app.ctx.policy, attempts, app.ctx.passthrough)
        self._passthrough = splice
        # The next check may be at Sanic's pace (set while the connection was Sanic's:
        # half the least of its timeouts, 30 s by default), which would leave the
        # splice's head deadline unseen that long.
        # (read untyped: Sanic's class leaves it typed None, which compiled code checks)
        pending: asyncio.TimerHandle | None = cast(Any, self)._callback_check_timeouts
        if pending is not None:
            pending.cancel()
        self._pace_checks()
        transport.resume_reading()
        if not leg.early_end:  # (an instance that closed meanwhile takes nothing)
            splice.from_client(held)
        leg.started()  # what the instance sent meanwhile: after the request it answers

    def _head_timed_out(self, splice: PassThrough | Tunnel) -> None:
        """A splice's request head (a `PassThrough`'s held one, a `Tunnel`'s first) has
        not come whole in time: a 408, as Sanic's path answers a head that late, and the
        connection closes (lingering); or, when the splice cannot answer it now (see its
        `head_timed_out`), it ends as it must."""
        held = splice.head_timed_out()
        if held is None:
            return
        self._passthrough = None
        # Logged as a held body's 408 is (`_held_client`): under the client of the request
        # it answers, the one at the start of `held`, when its head is whole (a request
        # pipelined before the stalled head is held with it), else under the socket's
        # peer (a head not whole is not read, whatever `X-Forwarded-For` line it holds).
        self._refuse_held(held, RequestTimeout(HEAD_STALLED))

    # Refusals

    def _refuse_held(self, held: bytes, exc: Exception) -> None:
        """Answer the request at the start of `held` with `exc`'s error (a 408, a 431), and
        close; the refusal is logged under `_held_client` (the peer while the head is not
        whole)."""
        end = held.find(b"\r\n")
        method, _, rest = (held if end < 0 else held[:end]).partition(b" ")
        url = rest.rpartition(b" ")[0]
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(self._error(exc, method.decode("latin-1"), url, request_id_of(None),
                                        False, partial(self._held_client, held)))  # fmt: skip
        self.close()

    def _error(self, exc: Exception, method: str, url: bytes, request_id: str,
               keep_alive: bool, client: Callable[[], str]) -> bytes:  # fmt: skip
        """`exc`'s JSON error response (`response.error_bytes`), logged within the app's
        budgets (`ctx.error_logs`): a refusal under `client()`, read for a refusal only
        (a 5xx's budget is its service's, not the client's)."""
        app: GatewayApp = self.app
        return error_bytes(exc, method, url, request_id, keep_alive, client, app.ctx.error_logs)

    def _client_address(self, req: Parsed) -> str:
        """The client's address as the routes read it (`Gatekeeper.client_ip`)."""
        app: GatewayApp = self.app
        return app.ctx.gate.address(self._peer, req.header_values)

    def _held_client(self, held: bytes | bytearray) -> str:
        """`_client_address` of the request at the start of `held`, for a refusal the fast
        path makes before it has a `Parsed` (a held body's or head's 408, a pass-through
        route's connect failure); the peer's while its head is not whole."""
        head = parse_head(held)
        return self._peer if head is None else self._client_address(head)
