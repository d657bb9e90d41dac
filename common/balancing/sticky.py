"""The key of a sticky request: what the `hash` strategy hashes, and what draws a
request's version when the policy splits traffic between versions. Shared by the
gateway's proxy and the websocket relay.

By default it is the `X-Balance-Key` header. A service's live policy may name
another source (`services.<name>.hash_on`), as nginx's `hash $http_...` and
`ip_hash`, Envoy's hash policies and Kong's `hash_on` do:

    header:<name>   that request header (`header:X-User-Id`)
    cookie:<name>   that cookie (`cookie:session`): a browser stays on one instance
    client_ip       the client's address (`X-Forwarded-For` only from trusted proxies)

A request without the value, or with an empty one (`X-Balance-Key:`), has no key:
the `hash` strategy then falls back to round-robin, as it does without
`X-Balance-Key`, rather than sending every such request to the one instance
that owns "".
"""

from __future__ import annotations

from collections.abc import Callable

DEFAULT_HEADER = "x-balance-key"


def balance_key(
    hash_on: str | None, header: Callable[[str], str | None], client_ip: Callable[[], str]
) -> str | None:
    """The request's key under `hash_on` (the policy's, None for the default), None
    when the value is missing or empty; `header(name)` gives a request header's first
    value (`name` in lower case)."""
    if hash_on is None:
        return header(DEFAULT_HEADER) or None
    source, _, name = hash_on.partition(":")
    if source == "header":
        return header(name.lower()) or None
    if source == "cookie":
        return cookie_value(header("cookie"), name)
    return client_ip() or None


def cookie_value(cookies: str | None, name: str) -> str | None:
    """The value of cookie `name` in a `Cookie` header (`a=1; b=2`), None if absent."""
    if not cookies:
        return None
    for pair in cookies.split(";"):
        key, sep, value = pair.strip().partition("=")
        if sep and key == name:
            return value.strip('"') or None
    return None
