"""The reverse proxy routes: `/svc/<service>/<path>`, and the original dispatcher's
`POST /nlp` and `POST /ai_server/` compatibility endpoints.

`/svc/...` streams both ways: the request body is read from the client as it
arrives and written upstream chunk by chunk, and the response body the same
way back, so a 100 MB upload or download never sits in the gateway's memory.
Headers: `X-Service-Version` picks a version/tag, `X-Balance-Key` is the key of
the `hash` strategy (sticky sessions) unless the policy's `hash_on` names another
source (`common.balancing.sticky`); responses carry `X-Upstream-Latency` and
`X-Gateway-Latency` (milliseconds) and `X-Upstream-Instance`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any, cast

from sanic import Blueprint, HTTPResponse
from sanic.compat import Header
from sanic.helpers import has_message_body
from sanic.http import Http

from common.balancing.sticky import balance_key
from common.codec import parse_json
from common.forwarding import hop_headers_out, strip_hop_by_hop
from common.proxy_paths import upstream_target
from common.relayed import RelayedResponse
from webapi.access import FROM_PATH, IN_HANDLER, POLICY_ROUTED
from webapi.context import GatewayRequest
from webapi.errors import (
    BodyTooLarge,
    MalformedJson,
    NoHealthyInstance,
    NoRoute,
    UnknownService,
    UpstreamFailed,
    UpstreamTimedOut,
    client_of,
    error_response,
    log_cut,
)
from webapi.proxy.attempts import client_error
from webapi.proxy.errors import UpstreamError
from webapi.proxy.forward import Forwarded, latency_headers
from webapi.proxy.paths import match_route
from webapi.requests import json_object, refuse_loop
from webapi.responses import json_response

bp = Blueprint("proxy")

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _headers_out(request: GatewayRequest, upstream_hint: str) -> list[tuple[str, str]]:
    return hop_headers_out(
        request.headers.items(),
        client_ip=request.ip or "",
        scheme=request.scheme,
        host=request.host,
        request_id=request.ctx.request_id,
        upstream=upstream_hint,
    )


async def _body(request: GatewayRequest) -> AsyncIterator[bytes] | None:
    """The request body as it arrives, or None when it has none. Its first chunk is read
    before an instance is chosen, so a body malformed from its start (bad chunking) is
    refused with 400 and nothing is sent upstream, and a client slow to send its body
    holds no upstream connection meanwhile. A later malformed chunk cuts the upload."""
    if request.stream is None or not _has_body(request):
        return None
    stream = cast(Http, request.stream)  # (HTTP/1.1: Sanic's `Http` reads the body)
    first = await stream.read()

    async def chunks() -> AsyncIterator[bytes]:
        if first is None:
            return
        yield first
        while (chunk := await stream.read()) is not None:
            yield chunk

    return chunks()


def _has_body(request: GatewayRequest) -> bool:
    """A body follows: chunked, or a Content-Length other than 0."""
    headers = request.headers
    return "transfer-encoding" in headers or headers.get("content-length", "0") != "0"


@bp.route("/svc/<service:str>/<path:path>", methods=METHODS, stream=True, ctx_access=FROM_PATH)  # type: ignore[untyped-decorator]
async def svc(request: GatewayRequest, service: str, path: str) -> HTTPResponse | None:
    """Hot path: pick an instance, stream the request up and the response down."""
    received = time.perf_counter()
    target = upstream_target(request.raw_url, f"/svc/{service}")
    return await _stream(request, service, target, received)


@bp.route("/<path:path>", methods=METHODS, stream=True, ctx_access=POLICY_ROUTED)  # type: ignore[untyped-decorator]
async def routed(request: GatewayRequest, path: str) -> HTTPResponse | None:
    """A route of the live policy (`routes`: path prefix -> service), else 404."""
    received = time.perf_counter()
    rule = match_route(request.app.ctx.policy.current.routes, request.path)
    if rule is None:
        raise NoRoute(f"no route for {request.path}")
    gate = request.app.ctx.gate
    if rule.public:
        await gate.admit_public(request, rule.service)
    else:
        await gate.admit_resource(request, rule.service, None)
    prefix = rule.prefix.rstrip("/") if rule.strip_prefix else ""
    target = upstream_target(request.raw_url, prefix)
    return await _stream(request, rule.service, target, received)


def _balance_key(request: GatewayRequest, service: str) -> str | None:
    """The request's sticky key under the service's `hash_on` (`common.balancing.sticky`)."""
    gate = request.app.ctx.gate
    return balance_key(request.app.ctx.proxy.policy.hash_on(service), request.headers.get,
                       lambda: gate.client_ip(request))  # fmt: skip


def _limit_body(request: GatewayRequest, service: str, size: int | None = None) -> None:
    """Refuse a body larger than the service takes (`Proxy.max_body`) with 413: one read
    whole (`size`), or a streamed one's declared Content-Length, before an instance is
    chosen. A chunked body is refused when its bytes pass the limit (Sanic's 413; the
    connection is then closed, and the upstream's, which had the body's start, dropped)."""
    limit = request.app.ctx.proxy.max_body(service)
    if size is None:
        declared = request.headers.get("content-length")  # (Sanic checked it is digits)
        size = int(declared) if declared is not None else 0
        if request.stream is not None:
            request.stream.request_max_size = limit
    if size > limit:
        raise BodyTooLarge(f"the request body is larger than {service} takes ({limit} bytes)")


async def _stream(
    request: GatewayRequest, service: str, target: str, received: float
) -> HTTPResponse | None:
    refuse_loop(request)  # before its body is read or an instance chosen
    _limit_body(request, service)
    body = await _body(request)
    proxy = request.app.ctx.proxy
    forwarded = await proxy.forward(
        service,
        request.method,
        target,
        _headers_out(request, service),
        body,
        version=request.headers.get("x-service-version") or None,  # empty: none named
        key=_balance_key(request, service),
    )
    upstream = forwarded.response
    headers = strip_hop_by_hop(upstream.headers)
    if not has_message_body(upstream.status):  # type: ignore[no-untyped-call]
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
    headers += latency_headers(forwarded, received)
    # The instance's Content-Length is kept: the body is sent as it is framed, or
    # chunked when the instance chunked it (`common.strict_http`: close-delimited for
    # HTTP/1.0), and a HEAD answer says the GET's length.
    relayed = RelayedResponse(status=upstream.status, headers=Header(headers))
    response = await request.respond(relayed)
    try:
        if request.method == "HEAD":
            await response.send(b"", False)  # the head: Sanic sends no body for a HEAD
            # Ended by hand: Sanic's HEAD sender is synchronous, so its own end-of-
            # response call after the handler (`await`ing it) would raise.
            cast(Http, request.stream).head_response_ignored(b"", True)
        else:
            async for chunk in upstream.stream():
                await response.send(chunk)
            await response.eof()
    except UpstreamError as exc:
        # The head is out: only closing the connection can tell the client that the
        # body is cut (Sanic's error handling would end it as if it were whole).
        log_cut(request.app.ctx.error_logs, service, exc)
        if request.transport is not None:
            request.transport.close()
    finally:
        await upstream.aclose()
    return None


async def _json_exchange(
    request: GatewayRequest, target: tuple[str, str | None], path: str, payload: dict[str, Any]
) -> tuple[Forwarded, Any, bytes]:
    service, version = target
    refuse_loop(request)
    _limit_body(request, service, len(request.body))
    body = json.dumps(payload).encode()
    headers = [*_headers_out(request, service), ("Content-Type", "application/json")]
    proxy = request.app.ctx.proxy
    forwarded = await proxy.forward(service, "POST", path, headers, body, version=version,
                                    key=_balance_key(request, service))  # fmt: skip
    try:
        raw = await forwarded.response.read()
    except UpstreamError as exc:  # the body failed: a silence, a total timeout, a cut
        raise client_error(service, exc) from exc
    finally:
        await forwarded.response.aclose()
    try:
        # The instance's answer is relayed, not used: a lone surrogate in it stays (as
        # /nlp relays it), escaped by `json_response`.
        data = parse_json(raw, lone_surrogates=True) if raw else None
    except ValueError:
        data = raw.decode("utf-8", errors="replace")
    return forwarded, data, raw


def _named(body: dict[str, Any], field: str) -> str:
    name = body.get(field)
    if not isinstance(name, str) or not name:
        raise MalformedJson(f"{field} (a string) is required")
    return name


async def _admit_named(request: GatewayRequest, name: str) -> tuple[str, str | None]:
    """The `(service, version)` a compatibility request names (a service, or the original
    `service_tag` form: `RegistryView.resolve`), once the caller's scopes and limits allow
    that service. A name nothing answers to is forwarded as a service name: 404 or 503."""
    target = request.app.ctx.proxy.view.resolve(name, ("http",)) or (name, None)
    await request.app.ctx.gate.admit_resource(request, target[0], None)
    return target


@bp.post("/nlp", ctx_access=IN_HANDLER)
async def nlp(request: GatewayRequest) -> HTTPResponse:
    """The original dispatcher: `service_name` in the body picks the service (`nlp_v2`:
    service `nlp`, tag `v2`, when no service has the whole name); its `/nlp` answers."""
    received = time.perf_counter()
    body = json_object(request, empty_ok=False)
    target = await _admit_named(request, _named(body, "service_name"))
    forwarded, _data, raw = await _json_exchange(request, target, "/nlp", body)
    headers = dict(latency_headers(forwarded, received))
    content_type = dict((k.lower(), v) for k, v in forwarded.response.headers).get(
        "content-type", "application/json"
    )
    return HTTPResponse(
        raw, status=forwarded.response.status, headers=headers, content_type=content_type
    )


@bp.post("/ai_server/", ctx_access=IN_HANDLER, strict_slashes=True)
async def ai_server(request: GatewayRequest) -> HTTPResponse:
    """`{"server_name", "params", "data"}` in; out `{"server_name", "status", "msg", "data",
    "duration"}`.

    `server_name` picks the service as `/nlp`'s `service_name` does. The envelope is sent
    as is to the instance's `/ai_server/`; `status` is 0 when it answered 2xx (its HTTP
    status otherwise) and `data` is its JSON answer. When the gateway cannot get an
    answer (unknown service 404, no healthy instance 503, upstream failed 502, timed out
    504), the response has that HTTP status and the envelope too (`status` the same
    code, `msg` the reason, `data` null), beside the gateway's usual `error` object.
    Refused requests (bad JSON, credentials, rate limits) get the gateway's usual error.
    """
    received = time.perf_counter()
    body = json_object(request, empty_ok=False)
    name = _named(body, "server_name")
    target = await _admit_named(request, name)
    try:
        forwarded, data, _raw = await _json_exchange(request, target, "/ai_server/", body)
    except (UnknownService, NoHealthyInstance, UpstreamFailed, UpstreamTimedOut) as exc:
        envelope = {"server_name": name, "status": exc.status_code, "msg": str(exc),
                    "data": None, "duration": round(time.perf_counter() - received, 6)}  # fmt: skip
        return error_response(exc, request.method, request.path, request.ctx.request_id,
                              request.app.ctx.error_logs, client=partial(client_of, request),
                              envelope=envelope)  # fmt: skip
    status = forwarded.response.status
    envelope = {
        "server_name": name,
        "status": 0 if 200 <= status < 300 else status,
        "msg": "ok" if 200 <= status < 300 else f"upstream answered {status}",
        "data": data,
        "duration": round(time.perf_counter() - received, 6),
    }
    return json_response(envelope, headers=dict(latency_headers(forwarded, received)))
