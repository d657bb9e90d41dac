"""Which requests the fast path answers itself (the package docstring's conditions on
the service, the credential, the rate limits and the body), and the upstream head of
one it answers. Everything else goes to Sanic, which answers (or refuses) it as the
`/svc/` route does. Hot path: these run on every request the fast path looks at."""

from __future__ import annotations

from common.request_ids import request_id_of
from common.scopes import INTERNAL_SERVICES
from webapi.access import credential_from
from webapi.context import GatewayContext
from webapi.errors import NotAuthenticated
from webapi.fastpath.head import upstream_head
from webapi.fastpath.request import Parsed


def may_qualify(ctx: GatewayContext, held: bytearray, space: int) -> bool:
    """A glance at the request line at the start of `held` (`space`: where its method
    ends), before any parse: `/svc/<service>/` of a service that no rate limit covers.
    Keeps a request bound for Sanic anyway (a rate-limited service, another route) from
    being parsed twice."""
    if held[space + 1 : space + 6] != b"/svc/":
        return False
    start = space + 6
    end = held.find(b"/", start, start + 64)
    if end <= start:
        return False
    service = held[start:end].decode("latin-1")
    return service not in INTERNAL_SERVICES and not ctx.gate.has_limits(service, None)


def allowed(ctx: GatewayContext, parsed: Parsed) -> bool:
    """Whether the request (its head) may be answered here: its credential is cached and
    reaches the service, its body is within the service's limit. Else Sanic answers it
    (authenticating, or refusing)."""
    if parsed.service in INTERNAL_SERVICES:
        return False
    if parsed.length and parsed.length > ctx.proxy.max_body(parsed.service):
        return False  # (Sanic's route answers 413)
    first = parsed.first
    try:
        credential = credential_from(first.get(b"authorization"), first.get(b"x-api-key"))
    except NotAuthenticated:
        return False
    if not credential:
        return False
    principal = ctx.gate.authenticator.authenticate_sync_cached(credential)
    return principal is not None and principal.allows(parsed.service, None)


def admit(ctx: GatewayContext, parsed: Parsed, client_ip: str, scheme: str) -> bytes | None:
    """The upstream request head when the credential is cached and allowed; None sends
    the request to Sanic. Only after `may_qualify` (no rate limit) in the same turn."""
    if not allowed(ctx, parsed):
        return None
    first = parsed.first
    request_id = request_id_of(first.get(b"x-request-id"))
    first[b"x-request-id"] = request_id
    return upstream_head(parsed, client_ip=client_ip, scheme=scheme, request_id=request_id)
