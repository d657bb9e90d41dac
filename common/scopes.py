"""Scopes: what a credential may reach.

Every protected thing is a *resource* `(service, method)`; `method` is None for
a whole service (an HTTP service under `/svc/<service>/`, say). A credential
carries a set of scopes:

```
*               every service and method, but not the admin API nor the registry
svc  or svc.*   every method of svc, and svc's method-less resource
svc.method      that one method only (never the method-less resource)
admin           the admin API: the resource ("admin", <anything>); nothing else grants it
registry        registering backends (`POST /heartbeat`): ("registry", <anything>);
                `admin` grants it too
```

`admin` and `registry` are privileged: `*`, the scope every user signing up gets
by default, reaches neither. A backend's heartbeat decides where other users'
requests (and the bearer tokens they carry) go, so it needs a credential given for
that alone. `admin` reaches the registry as well because an admin could give
themselves the `registry` scope anyway; so an admin may also hand out `registry`
keys.

Names are `[a-z][a-z0-9_-]{0,62}`. `admin.<anything>` and `registry.<anything>`
are not scopes: only the bare name reaches the privileged resource, so a look-alike
is refused rather than silently granting nothing.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

__all__ = ["ADMIN", "ALL", "INTERNAL_SERVICES", "PRIVILEGED", "REGISTRY", "RESERVED_SERVICES",
           "allows", "channel_resource", "covers", "parse", "rpc_resource",
           "valid_scope"]  # fmt: skip

ADMIN = "admin"
ALL = "*"
REGISTRY = "registry"
# The scopes `*` does not include: each only by its bare name (and `registry` by `admin`).
PRIVILEGED = frozenset({ADMIN, REGISTRY})
# Services (auth) whose methods act for whichever user the call names: they are
# reached through their own routes, which name the caller; a generic RPC entry (the
# gateway's `/rpc/...`, JSON-RPC on `/ws`) opens them to the admin scope only, or
# anyone could name another user. A service's own method takes the caller from the
# call instead (`common.caller.Caller`, which every call through those entries carries).
INTERNAL_SERVICES = frozenset({"auth"})
# Service names that mean something to the gateway already (the admin API, the
# registry; the services the generic entries open to admins only): a new service
# taking one would be reachable by admins (or backends) only, or mixed with the
# existing one. The scaffold and an HTTP backend's heartbeat refuse them all;
# `Service` refuses the privileged ones.
RESERVED_SERVICES = PRIVILEGED | INTERNAL_SERVICES

_NAME = r"[a-z][a-z0-9_-]{0,62}"
_SERVICE = re.compile(_NAME)
_SCOPE = re.compile(rf"\*|{_NAME}(?:\.(?:\*|{_NAME}))?")


def valid_scope(text: str) -> bool:
    """Whether `text` is one well-formed scope (`*`, `admin`, `registry`, `svc`, `svc.*`,
    `svc.method`)."""
    if not _SCOPE.fullmatch(text):
        return False
    return text.partition(".")[0] not in PRIVILEGED or text in PRIVILEGED


def allows(scopes: Collection[str], service: str, method: str | None) -> bool:
    """Whether `scopes` reach the resource `(service, method)`.

    On the request path: a handful of set lookups, no parsing.
    """
    if service == ADMIN:
        return ADMIN in scopes
    if service == REGISTRY:
        return REGISTRY in scopes or ADMIN in scopes
    if ALL in scopes or service in scopes or f"{service}.*" in scopes:
        return True
    return method is not None and f"{service}.{method}" in scopes


def rpc_resource(service: str, method: str | None) -> tuple[str, str | None]:
    """The resource a generic RPC entry (the gateway's `/rpc/...`, JSON-RPC on `/ws`)
    checks for a call of `service.method`: the admin scope for an internal service
    (with the method it names, for the refusal's message), else the method itself."""
    if service in INTERNAL_SERVICES:  # (`/svc/auth/...` names no method: `admin.auth`)
        return ADMIN, service if method is None else f"{service}.{method}"
    return service, method


def channel_resource(channel: str) -> tuple[str, None]:
    """The resource a `/ws` push channel's subscriber needs: the method-less resource of
    the service its first segment names (`iptv:now:7`, or `iptv` with no colon: `iptv`),
    as for an HTTP route under `/svc/<service>/`; so `*`, `svc` and `svc.*` reach it,
    `svc.method` does not, `admin:...` needs `admin` (`registry:...`, `registry`), an
    internal service's channel (`auth:...`) needs `admin` too.

    A first segment that is not a service name (`IPTV`, `9x`, `a.b`, empty) belongs to
    no service: it is the resource `("*", None)`, which only the `*` scope reaches (a
    method scope `a.b` must not reach a channel `a.b:x`, as `allows(scopes, "a.b",
    None)` would let it).
    """
    service = channel.partition(":")[0]
    if not _SERVICE.fullmatch(service):
        return ALL, None
    if service in INTERNAL_SERVICES:
        return ADMIN, None
    return service, None


def covers(granted: Collection[str], scope: str) -> bool:
    """Whether `granted` reaches everything `scope` would (the subset rule for API keys).

    `scope` must be valid (see `valid_scope`).
    """
    if scope in PRIVILEGED:
        return allows(granted, scope, None)
    if scope == ALL:
        return ALL in granted
    service, _, method = scope.partition(".")
    if method in ("", "*"):
        return ALL in granted or service in granted or f"{service}.*" in granted
    return allows(granted, service, method)


def parse(text: str | Iterable[str]) -> frozenset[str]:
    """Scopes from a space-separated string (the JWT `scope` claim) or an iterable."""
    items = text.split() if isinstance(text, str) else text
    return frozenset(item for item in items if item)
