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
`{"type": "error", "error": {"code", "message"}}` and never close the session;
anything that is not JSON gets a JSON-RPC parse error (-32700). A JSON-RPC
call needs a scope reaching its method (`common.scopes`; the `auth` service's
methods need `admin`), else it is answered with -32005.
Every frame to the client goes through the connection's bounded `Outbox`.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from sanic.server.websockets.impl import WebsocketImplProtocol

from common.credentials import Principal
from common.errors import RpcError, Unauthorized
from websocket import jsonrpc
from websocket.auth import authenticate, may_call
from websocket.connections import POLICY_VIOLATION, Outbox
from websocket.hub import CHANNEL

if TYPE_CHECKING:
    from websocket.app import WsContext


class Session:
    """The state of one `/ws` connection."""

    def __init__(self, ctx: WsContext, ws: WebsocketImplProtocol) -> None:
        self.ctx = ctx
        self.ws = ws
        self.outbox = Outbox(ws, ctx.settings.ws_send_queue, self._abandon)
        self.channels: set[str] = set()
        self.calls: set[asyncio.Task[None]] = set()
        self._expiry: asyncio.TimerHandle | None = None
        self.principal: Principal | None = None
        self._task = asyncio.current_task()

    # -- authentication ---------------------------------------------------------

    async def authenticate_first(self) -> bool:
        """Wait for the `auth` message; close with 1008 and return False without one."""
        try:
            raw = await self.ws.recv(timeout=self.ctx.settings.ws_auth_timeout)
            message = json.loads(raw) if isinstance(raw, str) else None
        except ValueError:
            message = None
        if not isinstance(message, dict) or message.get("type") != "auth":
            reason = "authentication required" if raw is not None else "authentication timed out"
            await self.ws.close(POLICY_VIOLATION, reason)
            return False
        try:
            principal = await authenticate(self.ctx.authenticator, message.get("token"))
        except Unauthorized as exc:
            await self.ws.close(POLICY_VIOLATION, exc.message[:120])
            return False
        self.authenticated(principal, message.get("id"))
        return True

    def authenticated(self, principal: Principal, id_: Any = None, *, reply: bool = True) -> None:
        """Start (or renew) the session as `principal`; it is closed when the credential expires."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.principal = principal
        exp = principal.expires_at
        if exp is not None:  # an API key may never expire
            delay = max(exp - time.time(), 0.0)
            self._expiry = asyncio.get_running_loop().call_later(delay, self._expired)
        if reply:
            expires = None if exp is None else int(exp)
            answer = {"type": "authenticated", "sub": principal.subject, "exp": expires}
            self.send(_with_id(answer, id_))

    def _expired(self) -> None:
        self.ws.fail_connection(POLICY_VIOLATION, "token expired")
        self._abandon()

    # -- messages -------------------------------------------------------------

    async def serve(self) -> None:
        """Handle the client's messages until it goes away."""
        while True:
            raw = await self.ws.recv()
            if raw is None:
                return
            await self.handle(raw)

    async def handle(self, raw: str | bytes) -> None:
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        if text.strip() == "ping":
            self.send("pong")
            return
        try:
            message = json.loads(text)
        except ValueError:
            self.send(jsonrpc.error(None, jsonrpc.PARSE_ERROR, "parse error: not JSON"))
            return
        if jsonrpc.is_request(message):
            self.call(message)
            return
        kind = message.get("type") if isinstance(message, dict) else None
        id_ = message.get("id") if isinstance(message, dict) else None
        if kind == "ping":
            self.send(_with_id({"type": "pong"}, id_))
        elif kind == "auth":
            await self._reauthenticate(message, id_)
        elif kind in ("subscribe", "unsubscribe"):
            await self._subscription(kind, message.get("channel"), id_)
        else:
            self.send(_error("unknown_type", "expected ping, auth, subscribe, unsubscribe "
                             "or a JSON-RPC 2.0 request", id_))  # fmt: skip

    async def _reauthenticate(self, message: dict[str, Any], id_: Any) -> None:
        try:
            principal = await authenticate(self.ctx.authenticator, message.get("token"))
        except Unauthorized as exc:
            self.send(_error("unauthorized", exc.message, id_))
            return
        self.authenticated(principal, id_)

    async def _subscription(self, kind: str, channel: Any, id_: Any) -> None:
        if not isinstance(channel, str) or not CHANNEL.match(channel):
            self.send(_error("bad_channel", f"channel must match {CHANNEL.pattern}", id_))
            return
        if kind == "subscribe":
            if channel not in self.channels:
                if len(self.channels) >= self.ctx.settings.ws_max_subscriptions:
                    limit = self.ctx.settings.ws_max_subscriptions
                    self.send(_error("too_many_subscriptions", f"at most {limit}", id_))
                    return
                self.channels.add(channel)
                await self.ctx.hub.subscribe(channel, self.outbox.put)
            self.send(_with_id({"type": "subscribed", "channel": channel}, id_))
        else:
            if channel in self.channels:
                self.channels.discard(channel)
                await self.ctx.hub.unsubscribe(channel, self.outbox.put)
            self.send(_with_id({"type": "unsubscribed", "channel": channel}, id_))

    def call(self, message: object) -> None:
        """Start a JSON-RPC call; its answer is sent when it completes (calls run concurrently)."""
        try:
            id_, method, args, kwargs, notification = jsonrpc.parse(message)
        except jsonrpc.InvalidRequest as exc:
            self.send(jsonrpc.error(exc.id, jsonrpc.INVALID_REQUEST, f"invalid request: {exc}"))
            return
        if not may_call(self.principal, method):
            if not notification:
                what = f"this credential's scopes do not include {method}"
                self.send(jsonrpc.error(id_, jsonrpc.FORBIDDEN, what))
            return
        if len(self.calls) >= self.ctx.settings.ws_max_calls_in_flight:
            if not notification:
                self.send(jsonrpc.error(id_, jsonrpc.TOO_MANY_CALLS, "too many calls in flight"))
            return
        task = asyncio.create_task(self._call(id_, method, args, kwargs, notification))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)

    async def _call(
        self, id_: jsonrpc.Id, method: str, args: list[Any], kwargs: dict[str, Any], quiet: bool
    ) -> None:
        try:
            value = await self.ctx.rpc.invoke(method, args, kwargs)
        except RpcError as exc:
            answer = jsonrpc.error_for(id_, exc)
        else:
            answer = jsonrpc.result(id_, value)
        if not quiet:
            self.send(answer)

    # -- output and end -------------------------------------------------------

    def send(self, frame: str) -> None:
        self.outbox.put(frame)

    def _abandon(self) -> None:
        """The connection is being failed (slow consumer, expired token): stop serving it."""
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def close(self) -> None:
        """Leave every channel and stop every call (the connection is gone or going)."""
        if self._expiry is not None:
            self._expiry.cancel()
        for task in list(self.calls):
            task.cancel()
        for channel in list(self.channels):
            await self.ctx.hub.unsubscribe(channel, self.outbox.put)
        self.channels.clear()
        await self.outbox.close()


def _with_id(answer: dict[str, Any], id_: Any) -> str:
    if id_ is not None:
        answer["id"] = id_
    return json.dumps(answer)


def _error(code: str, message: str, id_: Any = None) -> str:
    return _with_id({"type": "error", "error": {"code": code, "message": message}}, id_)
