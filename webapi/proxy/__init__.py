"""The reverse proxy's upstream side: a keep-alive HTTP/1.1 client pool (`UpstreamPool`)."""

from common.forwarding import strip_hop_by_hop
from webapi.proxy.errors import (
    UpstreamBodyTooLarge,
    UpstreamConnectError,
    UpstreamError,
    UpstreamHeadTooLarge,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from webapi.proxy.response import UpstreamResponse
from webapi.proxy.upstream import IDEMPOTENT_METHODS, UpstreamPool

__all__ = [
    "IDEMPOTENT_METHODS",
    "UpstreamBodyTooLarge",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamHeadTooLarge",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "strip_hop_by_hop",
]
