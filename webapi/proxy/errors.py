"""Errors of the upstream HTTP client, all under `common.errors.SwitchboardError`.

```
UpstreamError                 the upstream exchange failed (base)
├── UpstreamConnectError      no connection: refused, unreachable or connect timeout;
│                             nothing was sent, so another instance may be tried
├── UpstreamTimeout           read gap over `read_timeout`, or no head before the total
│                             deadline (also a TimeoutError)
└── UpstreamProtocolError     malformed response, connection closed before the head or
    │                         before the end of a framed body
    ├── UpstreamHeadTooLarge  the response head is over `MAX_RESPONSE_HEAD` (64 KiB)
    └── UpstreamBodyTooLarge  the response body is over the pool's `max_body`
```

Socket and parser errors are translated into these once, where they happen,
with `raise ... from exc`.
"""

from __future__ import annotations

from common.errors import SwitchboardError


class UpstreamError(SwitchboardError):
    """The exchange with an upstream HTTP server failed."""

    code = "upstream_error"


class UpstreamConnectError(UpstreamError):
    """No connection could be made; no request byte was sent."""

    code = "upstream_connect_error"


class UpstreamTimeout(UpstreamError, TimeoutError):
    """No progress for `read_timeout`, no response head by its deadline, or the whole
    exchange not over by its total timeout."""

    code = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    """The response is malformed, or the connection closed before it was complete."""

    code = "upstream_protocol_error"


class UpstreamHeadTooLarge(UpstreamProtocolError):
    """The response head (interim heads included) is larger than the connection allows."""

    code = "upstream_head_too_large"


class UpstreamBodyTooLarge(UpstreamProtocolError):
    """The response body is larger than the pool's `max_body`."""

    code = "upstream_body_too_large"


__all__ = [
    "UpstreamBodyTooLarge",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamHeadTooLarge",
    "UpstreamProtocolError",
    "UpstreamTimeout",
]
