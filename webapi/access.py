"""Who may call what, and how often: the gateway's one access check (design §6).

Every route declares its access with `ctx_access=` (an `Access`); a route
that declares nothing needs the admin scope, so forgetting the declaration
locks a route rather than opening it. For each request the `Gatekeeper`:

1. reads the credential: `Authorization: Bearer <JWT or API key>` or
   `X-Api-Key: <API key>`. A credential that is present is always checked,
   even on a public route (a bad one is a 401, never silently ignored);
2. refuses a non-public route without a credential (401) and a credential
   whose scopes do not reach the route's resource (403). The resource is
   `(service, method)`: fixed by the route, taken from the path
   (`/rpc/<service>/<method>`, `/svc/<service>/...`), named in the body
   (`/nlp`, `/ai_server/`: the handler calls `admit_resource` once it knows),
   or given by a route of the live policy (which may declare it public);
3. applies the live policy's rate limits that match the resource, keyed by
   the credential, the user or the client IP, in one Redis script call
   (`common.ratelimit`), and remembers the decision for the `RateLimit-*`
   response headers.

Verification is local (`common.credentials.Authenticator`): no RPC call and,
once a credential is cached, no Redis round trip either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from common.clientip import peer_ip, request_client_ip
from common.compiled import caused
from common.credentials import Authenticator, Principal
from common.errors import Unauthorized, shortened
from common.policy import LimitRule, PolicyWatcher
from common.ratelimit import Decision, Limit, RateLimiter
from common.scopes import rpc_resource
from webapi.context import GatewayRequest
from webapi.errors import InvalidQuery, NotAllowed, NotAuthenticated, RateLimited


@dataclass(frozen=True, slots=True)
class Access:
    """A route's access declaration (`ctx_access=`).

    `service`/`method` name the resource; `from_path` takes them from the path
    parameters `service` and `method` instead; `in_handler` leaves the scope
    check and rate limits to the handler (`Gatekeeper.admit_resource`), for
    routes whose resource is named in the body. `public` routes need no
    credential (but rate limits still apply, keyed by IP); `own` routes need a
    credential, whatever its scopes (a caller's own account: see `own`).
    """

    service: str | None = None
    method: str | None = None
    public: bool = False
    from_path: bool = False
    in_handler: bool = False
    own: bool = False


def public(service: str, method: str | None = None) -> Access:
    """A route anyone may call; `service`/`method` name it for rate limits."""
    return Access(service, method, public=True)


def own(service: str, method: str) -> Access:
    """A route acting on the caller's own account only (ending its session, reading its
    profile): any valid credential may, whatever its scopes. A user whose scopes an admin
    narrowed must still be able to log out."""
    return Access(service, method, own=True)


def requires(service: str, method: str | None = None) -> Access:
    """A route needing a credential whose scopes reach `service` (and `method`)."""
    return Access(service, method)


FROM_PATH = Access(from_path=True)
# The resource is named in the body; a credential is still required up front.
IN_HANDLER = Access(in_handler=True)
# Paths routed by the live policy, which may declare a route public: the handler decides.
POLICY_ROUTED = Access(in_handler=True, public=True)
ADMIN = requires("admin")
# What a route without a declaration gets: the most restrictive non-public access.
UNDECLARED = ADMIN


def caller(request: GatewayRequest) -> Principal:
    """The principal of a request that needed a credential (the access check set it)."""
    principal: Principal = request.ctx.principal
    return principal


async def call_rpc(
    request: GatewayRequest, target: str, kwargs: Mapping[str, Any] | None = None
) -> Any:
    """Call `target` ("service.method") over RPC for `request`: every RPC call a route
    makes goes through here, so the handler's `Caller` parameter gets the request's
    credential (`common.caller`); no caller for a public route called without one.
    Hot path (`/rpc`): a lookup, no I/O but the call's."""
    principal: Principal | None = getattr(request.ctx, "principal", None)
    who = None if principal is None else principal.as_caller()
    return await request.app.ctx.rpc.invoke(target, kwargs=kwargs, caller=who)


def presented_credential(request: GatewayRequest) -> str | None:
    """The bearer token or API key of the request, or None when there is none."""
    return credential_from(request.headers.get("authorization"), request.headers.get("x-api-key"))


def credential_from(authorization: str | None, api_key: str | None) -> str | None:
    """The credential of an `Authorization` and an `X-Api-Key` header value (None: no
    credential); raises `NotAuthenticated` for an Authorization that is not a bearer."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            raise NotAuthenticated("Authorization must be 'Bearer <token or API key>'")
        return value
    if api_key is not None:
        return api_key.strip() or None
    return None


@dataclass(frozen=True, slots=True)
class _Rule:
    id: str
    key: str
    limit: Limit


class Gatekeeper:
    """Authentication, scopes and rate limits for one gateway process."""

    def __init__(
        self,
        authenticator: Authenticator,
        limiter: RateLimiter,
        policy: PolicyWatcher,
        trusted_proxies: Sequence[IPv4Network | IPv6Network] = (),
    ) -> None:
        self.authenticator = authenticator
        self.limiter = limiter
        self.policy = policy
        self.trusted = tuple(trusted_proxies)
        self._rules_of: dict[tuple[str, str], tuple[_Rule, ...]] = {}
        self._rules_version: int | None = None
        self._rules_source: Sequence[LimitRule] = ()

    async def admit(self, request: GatewayRequest) -> None:
        """The request middleware: raises 401/403/429, else records who is calling.

        A request no route took (the router refused it: 405, 404) is not checked: Sanic
        runs request middleware before its error answer too, and no handler runs for it.
        Taking it for an undeclared route gave a wrong method 401 or 403 instead of its
        405 (and the 405 only to an admin)."""
        route = request.route
        if route is None:
            request.ctx.principal = None
            return
        access: Access = getattr(route.ctx, "access", UNDECLARED)
        credential = presented_credential(request)
        principal = None
        if credential:  # a cached credential needs no coroutine: the common case
            principal = self.authenticator.authenticate_sync_cached(credential)
            if principal is None:
                principal = await self._authenticate(credential)
        request.ctx.principal = principal
        if principal is None and not access.public:
            raise NotAuthenticated("credentials required: a bearer token or an API key")
        if access.in_handler:
            return
        service, method = self._resource(request, access)
        if not access.public and not access.own:
            self._authorize(principal, service, method)
        await self._limit(request, principal, service, method)

    async def admit_resource(
        self, request: GatewayRequest, service: str, method: str | None
    ) -> None:
        """For `IN_HANDLER` routes, once the handler knows the resource."""
        principal: Principal | None = getattr(request.ctx, "principal", None)
        if principal is None:
            raise NotAuthenticated("credentials required: a bearer token or an API key")
        self._authorize(principal, service, method)
        await self._limit(request, principal, service, method)

    async def admit_public(self, request: GatewayRequest, service: str) -> None:
        """For `IN_HANDLER` routes the policy declares public: rate limits only."""
        await self._limit(request, getattr(request.ctx, "principal", None), service, None)

    def client_ip(self, request: GatewayRequest) -> str:
        """The caller's address; `X-Forwarded-For` counts only from trusted proxies."""
        return self.address(peer_ip(request.conn_info), request.headers.get_all)

    def address(self, peer: str, values: Callable[[str], Sequence[str]]) -> str:
        """The client's address from the socket's `peer` and `values(name)`, the values of
        a request header's field lines in order (`common.clientip.request_client_ip`)."""
        return request_client_ip(peer, values, self.trusted)

    async def _authenticate(self, credential: str) -> Principal:
        try:
            return await self.authenticator.authenticate(credential)
        except Unauthorized as exc:
            raise caused(NotAuthenticated(exc.message, invalid=True), None)  # noqa: B904 (as `from`)

    @staticmethod
    def _resource(request: GatewayRequest, access: Access) -> tuple[str, str | None]:
        if not access.from_path:
            return access.service or "admin", access.method
        params: dict[str, Any] = request.match_info
        service, method = params.get("service"), params.get("method")
        if not isinstance(service, str):
            raise InvalidQuery("the path names no service")
        return rpc_resource(service, method if isinstance(method, str) else None)

    @staticmethod
    def _authorize(principal: Principal | None, service: str, method: str | None) -> None:
        if principal is not None and principal.allows(service, method):
            return
        what = f"{service}.{method}" if method else service
        raise NotAllowed(f"this credential's scopes do not include {shortened(what)}")

    async def _limit(
        self, request: GatewayRequest, principal: Principal | None, service: str, method: str | None
    ) -> None:
        rules = self._rules(service, method or "")
        if not rules:
            return
        checks = [(f"{rule.id}:{self._identity(request, principal, rule.key)}", rule.limit)
                  for rule in rules]  # fmt: skip
        decision = await self.limiter.check(checks)
        request.ctx.rate = decision
        if not decision.allowed:
            raise RateLimited(decision)

    def _identity(self, request: GatewayRequest, principal: Principal | None, key: str) -> str:
        if principal is not None:
            if key == "credential" and principal.key_id:
                return f"k:{principal.key_id}"
            if key in ("credential", "user"):
                return f"u:{principal.subject}"
        return f"ip:{self.client_ip(request)}"

    def has_limits(self, service: str, method: str | None) -> bool:
        """Whether a rate limit of the live policy applies to `(service, method)`.

        Hot path (the proxy's fast path asks it per request): a dict lookup.
        """
        return bool(self._rules(service, method or ""))

    def _rules(self, service: str, method: str) -> tuple[_Rule, ...]:
        """The limit rules matching a resource, indexed once per policy version."""
        document = self.policy.current
        if document.version != self._rules_version or document.limits is not self._rules_source:
            self._rules_of.clear()
            self._rules_version = document.version
            self._rules_source = document.limits
        found = self._rules_of.get((service, method))
        if found is None:
            found = tuple(
                _Rule(rule.id, rule.key, Limit(rule.rate, rule.period, rule.burst or rule.rate))
                for rule in document.limits
                if rule.service in ("*", service) and rule.method in ("*", method)
            )
            if len(self._rules_of) > 10_000:  # resources come from paths: keep it bounded
                self._rules_of.clear()
            self._rules_of[(service, method)] = found
        return found


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    """The `RateLimit-*` headers (IETF draft) of a decision."""
    return {
        "RateLimit-Limit": str(decision.limit),
        "RateLimit-Remaining": str(decision.remaining),
        "RateLimit-Reset": str(max(0, round(decision.reset + 0.4999))),
    }
