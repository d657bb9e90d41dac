"""Which requests a pass-through route relays (`webapi.passthrough` has the routes and
the splice): the route of a request, from a glance at its request line, before the
fast path parses it, and the check of each request on a spliced connection.

Apart from the splice so that it can be compiled (`common.compiled`): the fast path
asks `passthrough_request` of every request it sees.
"""

from __future__ import annotations

from typing import Protocol

from common.policy import PolicyDocument, RouteRule
from common.proxy_paths import InvalidProxyPath, upstream_target
from webapi.proxy.paths import match_route

# HEAD is not relayed: its response has no body, which a response parser cannot know.
PASSTHROUGH_METHODS = frozenset({b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})


def passthrough_rule(policy: PolicyDocument, url: bytes) -> RouteRule | None:
    """The pass-through route `url` belongs to under `policy`, else None. Hot path."""
    if not policy.passthrough_prefixes:
        return None
    path = url.partition(b"?")[0]
    try:
        text = path.decode("ascii")
    except UnicodeDecodeError:
        return None
    rule = match_route(policy.routes, text)
    if rule is None or not rule.passthrough:
        return None
    try:  # dot segments, encoded slashes, a fragment: refused as the normal routes do
        upstream_target(url, "")
    except InvalidProxyPath:
        return None
    return rule


class Gate(Protocol):
    def has_limits(self, service: str, method: str | None) -> bool: ...


def passthrough_request(
    held: bytes | bytearray, space: int, policy: PolicyDocument, gate: Gate
) -> tuple[RouteRule, str, bytes] | None:
    """The pass-through route of the request at the start of `held` (and its method and
    URL), from a glance at its request line (`space`: where its method ends); None when
    it is not one, or a rate limit applies to its service (then the normal path counts
    it). Hot path: the fast path asks it of every request it sees."""
    prefixes = policy.passthrough_prefixes
    if not prefixes or not held.startswith(prefixes, space + 1):
        return None
    end = held.find(b" ", space + 1, space + 8193)
    if end < 0:
        return None
    method = bytes(held[:space])
    if method not in PASSTHROUGH_METHODS:
        return None
    url = bytes(held[space + 1 : end])
    rule = passthrough_rule(policy, url)
    if rule is None or gate.has_limits(rule.service, None):
        return None
    return rule, method.decode("latin-1"), url


__all__ = ["PASSTHROUGH_METHODS", "Gate", "passthrough_request", "passthrough_rule"]
