"""Which policy route a path takes. The upstream target and its path-traversal check are
`common.proxy_paths` (shared with the websocket service's relay)."""

from __future__ import annotations

from collections.abc import Sequence

from common.policy import RouteRule


def match_route(routes: Sequence[RouteRule], path: str) -> RouteRule | None:
    """The policy route with the longest prefix of `path` (prefixes end with `/`)."""
    best: RouteRule | None = None
    for rule in routes:
        if (path.startswith(rule.prefix) or path == rule.prefix[:-1]) and (
            best is None or len(rule.prefix) > len(best.prefix)
        ):
            best = rule
    return best
