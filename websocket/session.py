"""One authenticated client on `/ws`: subscriptions, JSON-RPC calls, pings.

Messages from the client (text frames, JSON unless noted):

    ping                                            -> pong (plain text)
    {"type": "ping", "id": 1}                       -> {"type": "pong", "id": 1}
    {"type": "auth", "token": "..."}                -> {"type": "authenticated", "sub", "exp"}
    {"type": "subscribe", "channel": "iptv:now:7"}  -> {"type": "subscribed", "channel"}
    {"type": "unsubscribe", "channel": "..."}       -> {"type": "unsubscribed", "channel"}
    {"jsonrpc": "2.0", "id": 1, "method": "svc.m", "params": {...}}  (see `jsonrpc`)

then `{"type": "message", "channel", "data"}` for every message published on a
subscribed channel. An `auth` message on an open session replaces its token
(a client renews before `exp`). Mistakes are answered with
`{"type": "error", "error": {"code", "message"}}` and never close the session (each
is logged, at most 10 a minute a connection: `websocket.errors.RefusalLog`), as
is a message that cannot be served while Redis is down (code `service_unavailable`,
a warning, as bounded:
a `subscribe`, an `auth` with an API key not cached here; a first `auth` that cannot
be checked closes the connection with 1013, try again later);
anything that is not JSON (a lone surrogate escape such as `"\\ud800"` included:
`common.codec.parse_json`) gets a JSON-RPC parse error (-32700); a call whose
result JSON cannot carry (NaN, bytes that are not UTF-8) gets -32000 with `data.code`
`invalid_result`, as the gateway's 502, logged as an `rpc error` warning; one whose
answer cannot be had for another reason than an RPC error (a bug) gets -32603,
internal error, logged with its traceback as `call failed`. A JSON-RPC
call needs a scope reaching its method (`common.scopes`; the `auth` service's
methods need `admin`), else it is answered with -32005; it carries the session's
credential's caller (`common.caller`), which a handler's `Caller` parameter gets.
A subscribe needs a scope reaching the service its channel's first segment names
(`iptv:now:7`: `iptv`, as `/svc/iptv/` would; `common.scopes.channel_resource`),
else it is answered with code `forbidden` and nothing is subscribed; one Redis
refuses for another reason than an outage (an ACL's NOPERM) with code
`subscribe_refused`, logged as a warning (`subscribe refused by redis`, within the
connection's bound), and the session goes on. Should Redis refuse a subscribed
channel later, as the hub subscribes it again on reconnecting (its ACL changed
meanwhile: `websocket.hub`), the session leaves it and is told by
`{"type": "error", "channel", "error": {"code": "subscribe_refused", "message"}}`
(no `id`: it answers no message); a subscribe asks Redis again. Unsubscribing needs
no scope. An `auth` that renews with a credential not reaching a subscribed channel
leaves it, with `{"type": "unsubscribed", "channel", "reason": "forbidden"}` sent
before the `authenticated` answer.
Messages are handled in the order they come. Most are answered at once, from
the connection's `data_received` (`websocket.client`); one that must wait
(`auth`, `subscribe`, `unsubscribe`) is handled by a task, and the messages
behind it wait for it (past BACKLOG_LIMIT of them the socket is not read). A
JSON-RPC call runs in a task of its own, at most WS_MAX_CALLS_IN_FLIGHT at once.
An idle session has no task.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from common.aio import held
from common.codec import parse_json
from common.connection import REDIS_DOWN_OR_REFUSING
from common.credentials import Principal
from common.errors import RpcError, ServiceUnavailable, Unauthorized, shortened
from common.log import get_logger
from common.redis_failures import redis_failure, redis_failure_message
from websocket import jsonrpc
from websocket.auth import authenticate, may_call, may_subscribe
from websocket.client import BACKLOG_FULL
from websocket.connections import INTERNAL_ERROR, POLICY_VIOLATION, TRY_AGAIN_LATER
from websocket.errors import RefusalLog, log_failed_call
from websocket.hub import CHANNEL

if TYPE_CHECKING:
    from websocket.app import WsContext
    from websocket.client import ClientProtocol

log = get_logger("websocket.session")

BACKLOG_LIMIT = 32  # messages waiting behind a slow one past which the socket is not read
Work = Coroutine[Any, Any, None]


class Session:
    """The state of one `/ws` connection."""

    __slots__ = ("backlog", "calls", "channels", "conn", "ctx", "expiry", "principal", "refusals",
                 "worker")  # fmt: skip

    def __init__(self, ctx: WsContext, conn: ClientProtocol) -> None:
        self.ctx = ctx
        self.conn = conn
        self.channels: set[str] | None = None
        self.calls: set[asyncio.Task[None]] | None = None
        self.expiry: asyncio.TimerHandle | None = None  # the credential's end (or the auth wait)
        self.principal: Principal | None = None
        self.backlog: list[str | bytes] | None = None  # messages waiting for `worker`
        self.worker: asyncio.Task[None] | None = None  # handling a message that must wait
        self.refusals: RefusalLog | None = None  # made at the first refusal (most have none)

    # -- authentication ---------------------------------------------------------

    def wait_for_auth(self) -> None:
        """No credential came with the upgrade: the first message must be `auth`."""
        delay = self.ctx.settings.ws_auth_timeout
        self.expiry = asyncio.get_running_loop().call_later(delay, self._auth_timed_out)

    def _auth_timed_out(self) -> None:
        self.expiry = None
        self.conn.fail(POLICY_VIOLATION, "authentication timed out")

    def _first(self, text: str) -> Work | None:
        try:
            message = parse_json(text)
        except ValueError:
            message = None
        if not isinstance(message, dict) or message.get("type") != "auth":
            self.conn.fail(POLICY_VIOLATION, "authentication required")
            return None
        return self._authenticate_first(message)

    async def _authenticate_first(self, message: dict[str, Any]) -> None:
        try:
            principal = await authenticate(self.ctx.authenticator, message.get("token"))
        except Unauthorized as exc:
            self.conn.fail(POLICY_VIOLATION, exc.message)
            return
        except ServiceUnavailable as exc:  # an API key not cached here, Redis down
            self.conn.fail(TRY_AGAIN_LATER, exc.message)
            return
        self.authenticated(principal, message.get("id"))

    def authenticated(self, principal: Principal, id_: Any = None, *, reply: bool = True) -> None:
        """Start (or renew) the session as `principal`; it is closed when the credential expires."""
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        self.principal = principal
        self.ctx.connections.authenticated(self.conn, principal)  # closed if it is revoked
        exp = principal.expires_at
        if exp is not None:  # an API key may never expire
            delay = max(exp - time.time(), 0.0)
            self.expiry = asyncio.get_running_loop().call_later(delay, self._expired)
        if reply:
            expires = None if exp is None else int(exp)
            answer = {"type": "authenticated", "sub": principal.subject, "exp": expires}
            self.send(_with_id(answer, id_))

    def _expired(self) -> None:
        self.expiry = None
        self.conn.fail(POLICY_VIOLATION, "token expired")

    # -- messages -------------------------------------------------------------

    def received(self, raw: str | bytes) -> None:
        """A message from the client: handled now, or after the one being handled. Hot path."""
        if self.backlog is not None:
            self.backlog.append(raw)
            if len(self.backlog) == BACKLOG_LIMIT:
                self.conn.hold(BACKLOG_FULL, True)
            return
        work = self.handle(raw)
        if work is not None:
            self.backlog = []
            self.worker = asyncio.create_task(self._in_order(work))

    async def _in_order(self, work: Work) -> None:
        """Finish `work`, then handle what came meanwhile, in order."""
        try:
            await work
            while self.backlog:
                if len(self.backlog) == BACKLOG_LIMIT:
                    self.conn.hold(BACKLOG_FULL, False)
                next_work = self.handle(self.backlog.pop(0))
                if next_work is not None:
                    await next_work
        except Exception:  # a bug: say so and end the session rather than go deaf
            log.exception("message handling failed", extra={"fields": {"path": "/ws"}})
            self.conn.fail(INTERNAL_ERROR, "internal error")
        finally:
            if self.backlog is not None and len(self.backlog) >= BACKLOG_LIMIT:
                self.conn.hold(BACKLOG_FULL, False)
            self.backlog = None
            self.worker = None

    def handle(self, raw: str | bytes) -> Work | None:
        """Answer `raw`, or return the work that answers it when that must wait."""
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        if self.principal is None:
            return self._first(text)
        if text.strip() == "ping":
            self.send("pong")
            return None
        try:
            message = parse_json(text)
        except ValueError:
            self._refuse_call(None, jsonrpc.PARSE_ERROR, "parse error: not JSON")
            return None
        if jsonrpc.is_request(message):
            self.call(message)
            return None
        kind = message.get("type") if isinstance(message, dict) else None
        id_ = message.get("id") if isinstance(message, dict) else None
        if kind == "ping":
            self.send(_with_id({"type": "pong"}, id_))
        elif kind == "auth":
            return self._reauthenticate(message, id_)
        elif kind in ("subscribe", "unsubscribe"):
            return self._subscription(kind, message.get("channel"), id_)
        else:
            self._refuse("unknown_type", "expected ping, auth, subscribe, unsubscribe "
                         "or a JSON-RPC 2.0 request", id_)  # fmt: skip
        return None

    async def _reauthenticate(self, message: dict[str, Any], id_: Any) -> None:
        try:
            principal = await authenticate(self.ctx.authenticator, message.get("token"))
        except Unauthorized as exc:
            self._refuse("unauthorized", exc.message, id_)
            return
        except ServiceUnavailable as exc:  # the session goes on with its credential
            self._unavailable(exc.message, id_)
            return
        self._leave_unreachable(principal)
        self.authenticated(principal, id_)

    def _leave_unreachable(self, principal: Principal) -> None:
        """Leave the channels `principal` (a renewal's credential) does not reach, each
        told with an `unsubscribed` frame giving the reason: before the renewal is
        answered, so nothing from them follows the `authenticated` answer."""
        channels = self.channels or set()
        for channel in sorted(c for c in channels if not may_subscribe(principal, c)):
            self.ctx.hub.unsubscribe(channel, self.conn.send)
            channels.discard(channel)
            answer = {"type": "unsubscribed", "channel": channel, "reason": "forbidden"}
            self.send(_with_id(answer, None))

    async def _subscription(self, kind: str, channel: Any, id_: Any) -> None:
        if not isinstance(channel, str) or not CHANNEL.fullmatch(channel):
            self._refuse("bad_channel", f"channel must match {CHANNEL.pattern}", id_)
            return
        channels = self.channels
        if kind == "subscribe":
            if not may_subscribe(self.principal, channel):
                what = f"this credential's scopes do not reach the channel {channel}"
                self._refuse("forbidden", what, id_)
                return
            if channels is None:
                channels = self.channels = set()
            if channel not in channels:
                limit = self.ctx.settings.ws_max_subscriptions
                if len(channels) >= limit:
                    self._refuse("too_many_subscriptions", f"at most {limit}", id_)
                    return
                channels.add(channel)  # first: `close` leaves it if it closes meanwhile
                try:
                    await self.ctx.hub.subscribe(channel, self.conn.send, self._refused_later)
                except REDIS_DOWN_OR_REFUSING as exc:
                    channels.discard(channel)  # not subscribed: a retry must subscribe
                    self._subscribe_failed(channel, exc, id_)
                    return
                if self.channels is not channels:
                    # Closed while subscribing, its cancellation swallowed on the way
                    # (`common.aio`): `close` dropped the channels before this one was
                    # the hub's, so it leaves it here.
                    self.ctx.hub.drop([channel], self.conn.send)
                    return
            self.send(_with_id({"type": "subscribed", "channel": channel}, id_))
        else:
            if channels is not None and channel in channels:
                channels.discard(channel)
                self.ctx.hub.unsubscribe(channel, self.conn.send)
            self.send(_with_id({"type": "unsubscribed", "channel": channel}, id_))

    def _subscribe_failed(self, channel: str, exc: Exception, id_: Any) -> None:
        """Answer a subscribe Redis did not take: `service_unavailable` when Redis is down
        or refusing for now (a retry may work), `subscribe_refused` for any other error
        reply (an ACL's NOPERM: not this session's to mend). Never redis-py's text,
        which names Redis's address: that goes to the log."""
        kind = redis_failure(exc)
        if kind is not None:
            self._unavailable(f"push channels unavailable: {redis_failure_message(exc, kind)}",
                              id_)  # fmt: skip
            return
        self._refusal_log().failed("subscribe refused by redis",
                                   {"channel": channel, "error": str(exc)})  # fmt: skip
        message = f"redis refused to subscribe the channel {channel}"
        self._send_error("subscribe_refused", message, id_)

    def _refused_later(self, channel: str) -> None:
        """Redis refused `channel` when the hub subscribed it again (a reconnect, the ACL
        changed meanwhile): the hub left it (and logged it, once for all its sessions).
        Forgotten here too, so that a subscribe asks Redis again; the client is told by
        an error frame naming the channel."""
        if self.channels is None or channel not in self.channels:
            return
        self.channels.discard(channel)
        message = f"redis refused the channel {channel} on reconnecting: no longer subscribed"
        self._send_error("subscribe_refused", message, None, channel=channel)

    def call(self, message: object) -> None:
        """Start a JSON-RPC call; its answer is sent when it completes (calls run concurrently)."""
        try:
            id_, method, args, kwargs, notification = jsonrpc.parse(message)
        except jsonrpc.InvalidRequest as exc:
            self._refuse_call(exc.id, jsonrpc.INVALID_REQUEST, f"invalid request: {exc}")
            return
        if not may_call(self.principal, method):
            what = f"this credential's scopes do not include {shortened(method)}"
            self._refuse_call(id_, jsonrpc.FORBIDDEN, what, answer=not notification)
            return
        if self.calls is None:
            self.calls = set()
        if len(self.calls) >= self.ctx.settings.ws_max_calls_in_flight:
            what = "too many calls in flight"
            self._refuse_call(id_, jsonrpc.TOO_MANY_CALLS, what, answer=not notification)
            return
        held(self.calls, self._call(id_, method, args, kwargs, notification))

    async def _call(
        self, id_: jsonrpc.Id, method: str, args: list[Any], kwargs: dict[str, Any], quiet: bool
    ) -> None:
        try:
            caller = None if self.principal is None else self.principal.as_caller()
            value = await self.ctx.rpc.invoke(method, args, kwargs, caller=caller)
            answer = jsonrpc.result(id_, value)
        except RpcError as exc:
            log_failed_call(self._refusal_log(), method, exc)
            answer = jsonrpc.error_for(id_, exc)
        except Exception:
            # A bug: answered and logged here, or the call would go unanswered with only
            # asyncio's "never retrieved" traceback. (A result JSON cannot carry is an
            # `InvalidResult`, above: `jsonrpc.result`.)
            log.exception("call failed", extra={"fields": {"path": "/ws", "method": method}})
            answer = jsonrpc.error(id_, jsonrpc.INTERNAL_ERROR, "internal error")
        if not quiet:
            self.send(answer)

    # -- output and end -------------------------------------------------------

    def send(self, frame: str) -> None:
        self.conn.send(frame)

    def _refusal_log(self) -> RefusalLog:
        """This connection's refusal log (`websocket.errors.RefusalLog`: bounded)."""
        if self.refusals is None:
            self.refusals = RefusalLog("/ws")
        return self.refusals

    def _refuse(self, code: str, message: str, id_: Any) -> None:
        """Answer a message this session does not serve with an error, logged once
        (within the connection's bound: `RefusalLog`)."""
        self._refusal_log().refused(code, message)
        self._send_error(code, message, id_)

    def _unavailable(self, message: str, id_: Any) -> None:
        """Answer a message the service cannot serve now (Redis is down) with an error,
        logged (within the connection's bound: `RefusalLog`)."""
        self._refusal_log().failed("message failed", {"message": message})
        self._send_error("service_unavailable", message, id_)

    def _send_error(self, code: str, message: str, id_: Any, channel: str | None = None) -> None:
        """Answer a message with `{"type": "error", "error": {"code", "message"}}`; with
        `channel` (`_refused_later`: no message answered), the error names that channel
        (`{"type": "error", "channel", "error"}`)."""
        answer: dict[str, Any] = {"type": "error"}
        if channel is not None:
            answer["channel"] = channel
        answer["error"] = {"code": code, "message": message}
        self.send(_with_id(answer, id_))

    def _refuse_call(
        self, id_: jsonrpc.Id, code: int, message: str, *, answer: bool = True
    ) -> None:
        """Refuse a JSON-RPC request with its error (none for a notification), logged once
        (within the connection's bound)."""
        self._refusal_log().refused(code, message)
        if answer:
            self.send(jsonrpc.error(id_, code, message))

    def close(self) -> None:
        """The connection is closing or gone: stop counting it, stop its timer and tasks,
        leave its channels."""
        self.ctx.connections.discard(self.conn)
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        current = asyncio.current_task()
        for task in [self.worker, *(self.calls or ())]:
            if task is not None and task is not current:
                task.cancel()
        self.backlog = None
        if self.refusals is not None:
            self.refusals.flush()
        if self.channels:  # left here now; in Redis by the hub, after
            self.ctx.hub.drop(self.channels, self.conn.send)
        self.channels = None


def _with_id(answer: dict[str, Any], id_: Any) -> str:
    if id_ is not None:
        answer["id"] = id_
    return json.dumps(answer)
