"""The reverse proxy's upstream side: a keep-alive HTTP/1.1 client pool (`UpstreamPool`)."""

from common.compiled import prefer_compiled

# Before any submodule is imported: the compiled build, when fresh (`common.compiled`).
prefer_compiled(__name__, __path__)

from common.forwarding import strip_hop_by_hop  # noqa: E402
from webapi.proxy.errors import (  # noqa: E402
    UpstreamBodyTooLarge,
    UpstreamConnectError,
    UpstreamError,
    UpstreamHeadTooLarge,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from webapi.proxy.response import UpstreamResponse  # noqa: E402
from webapi.proxy.upstream import IDEMPOTENT_METHODS, UpstreamPool  # noqa: E402

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
