"""`/ws/stream`: the original dispatcher's envelope mode.

Each text message from the client is one request `{"service_name": "nlp", ...}`.
It is sent as it is to `ws://<addrip>/ws` of an instance registered under that
name (a name `service_tag`, as in the original heartbeat, picks the instances
of that tag when no service has the whole name), and the upstream's frames
`{"ret": 0, "flag": 0|1, "result": ...}` are relayed until `flag: 1`; a frame
with `ret != 0` is relayed and ends the stream. The connection then waits for
the client's next request. Errors are frames of the same shape, and never close
the connection:

    not JSON (or not an object)        {"ret": 1, "flag": 1, "result": "Invalid JSON format"}
    no instance under that name        {"ret": 1, "flag": 1, "result": "model not support"}
    the credential's scopes lack it    {"ret": 1, "flag": 1, "result": "model not allowed"}
    every instance failed to connect   {"ret": 1, "flag": 1, "result": "model unavailable"}
    the upstream died mid-stream       {"ret": 1, "flag": 1, "result": "upstream connection lost"}

Each request's upstream handshake carries the client's upgrade fields as the relay's
does (`websocket.handshake`: cookies, `Origin`, `X-Forwarded-*`, `X-Request-Id`,
`Via`...), built once for the connection (they are the upgrade's: every request of
a connection carries the same `X-Request-Id`), and the `hash` strategy hashes the
client's key under the service's `hash_on` (`common.balancing.sticky`:
`X-Balance-Key`, a header, a cookie or the client's address), as on `/ws/proxy/`. An
instance that refuses the upgrade with a 4xx is no failure of its own
(`websocket.upstreams`): "model unavailable".

A client that leaves mid-stream (a close frame, its socket closed, or Sanic
cancelling the handler) ends that stream: the upstream gets a close 1001 "client
went away", frames still coming are dropped until its close answers, and whatever
is not closed within `CLOSE_TIMEOUT` (the splice's, 2 s) is aborted.

A request holding a lone surrogate escape (`"\\ud800"`) is not JSON, as everywhere
(`common.codec.parse_json`); an upstream's frame is relayed whatever it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sanic.server.websockets.impl import WebsocketImplProtocol
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import CLOSED

from common.aio import held
from common.codec import parse_json
from websocket.connections import GOING_AWAY, NORMAL_CLOSURE
from websocket.errors import RefusalLog
from websocket.handshake import client_key, upstream_headers
from websocket.splice import CLOSE_TIMEOUT, GONE
from websocket.upstreams import KINDS, NoUpstream, UpstreamRefused, Upstreams

if TYPE_CHECKING:
    from websocket.app import WsRequest

INVALID_JSON = "Invalid JSON format"
NOT_SUPPORTED = "model not support"
NOT_ALLOWED = "model not allowed"
UNAVAILABLE = "model unavailable"
LOST = "upstream connection lost"


def failure(result: str) -> str:
    return json.dumps({"ret": 1, "flag": 1, "result": result})


async def stream_endpoint(request: WsRequest, ws: WebsocketImplProtocol) -> None:
    """Serve envelope requests, one after the other, until the client leaves."""
    upstreams = request.app.ctx.upstreams
    refusals = RefusalLog(request.path)
    headers = upstream_headers(request)  # the upgrade's: the same for every request
    try:
        while True:
            message = await ws.recv()
            if message is None:
                return
            text = message.decode(errors="replace") if isinstance(message, bytes) else message
            try:
                body = parse_json(text)
            except ValueError:
                body = None
            if not isinstance(body, dict):
                await _refuse(refusals, ws, INVALID_JSON)
                continue
            target = route(upstreams, body.get("service_name"))
            if target is None:
                await _refuse(refusals, ws, NOT_SUPPORTED)
            elif not request.ctx.principal.allows(target[0], None):
                await _refuse(refusals, ws, NOT_ALLOWED)
            else:
                await serve_one(request, ws, target, text, headers)
    finally:
        refusals.flush()


async def _refuse(refusals: RefusalLog, ws: WebsocketImplProtocol, result: str) -> None:
    """Answer a request this mode does not serve with its failure frame, logged once
    (within the connection's bound: `websocket.errors.RefusalLog`)."""
    refusals.refused(result.lower().replace(" ", "_"), result)
    await ws.send(failure(result))


def route(upstreams: Upstreams, name: Any) -> tuple[str, str | None] | None:
    """`(service, version)` for a requested name, or None if nothing is registered under it."""
    if not isinstance(name, str) or not name:
        return None
    return upstreams.view.resolve(name, KINDS)


async def serve_one(
    request: WsRequest,
    ws: WebsocketImplProtocol,
    target: tuple[str, str | None],
    text: str,
    headers: Sequence[tuple[str, str]],
) -> None:
    """Relay one request's stream from an instance of `target` (service, version) to the
    client; `headers` are the upstream handshake's fields (`upstream_headers`)."""
    upstreams = request.app.ctx.upstreams
    service, version = target
    try:
        upstream, endpoint, _ = await upstreams.connect(
            service,
            "/ws",
            version=version,
            key=client_key(request, service),
            headers=headers,
        )
    except (NoUpstream, UpstreamRefused):
        await ws.send(failure(UNAVAILABLE))
        return
    started, ok = time.monotonic(), False
    try:
        await upstream.send(text)
        async for frame in upstream:
            await ws.send(frame)
            if _last(frame):
                ok = True
                break
        else:
            await ws.send(failure(LOST))  # closed before the last frame
    except ConnectionClosed:
        await ws.send(failure(LOST))
    finally:
        upstreams.finished(service, endpoint, time.monotonic() - started, ok)
        if ok:
            await close_upstream(upstream, NORMAL_CLOSURE, "")
        else:  # the client left (or the upstream died: then there is nothing to close)
            await close_upstream(upstream, GOING_AWAY, GONE)


async def close_upstream(upstream: ClientConnection, code: int, reason: str) -> None:
    """Close `upstream` with `code`, aborting it if that takes over `CLOSE_TIMEOUT` or fails.

    The closing runs on when the caller is cancelled: Sanic cancels the handler as soon
    as its client's connection is lost, often while the close handshake is under way.
    """
    await asyncio.shield(held(_closing, _close(upstream, code, reason)))


_closing: set[asyncio.Task[None]] = set()  # closes under way (the loop keeps weak references)


async def _close(upstream: ClientConnection, code: int, reason: str) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            # Reading stays paused while unread frames fill the queue, and the upstream's
            # close comes after them: drop them, or the handshake cannot finish.
            await asyncio.gather(upstream.close(code, reason), _discard(upstream))
    except Exception:  # timed out or failed: aborted below
        pass
    finally:
        if upstream.state is not CLOSED:
            upstream.transport.abort()


async def _discard(upstream: ClientConnection) -> None:
    """Read and drop what `upstream` sends until its connection closes."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await upstream.recv(decode=False)


def _last(frame: str | bytes) -> bool:
    """Whether a frame ends the stream: `flag: 1`, `ret != 0`, or not an envelope at all."""
    try:
        body = parse_json(frame, lone_surrogates=True)  # an upstream's frame, relayed as is
    except ValueError:
        return True
    if not isinstance(body, dict):
        return True
    return body.get("flag") == 1 or body.get("ret", 0) != 0
