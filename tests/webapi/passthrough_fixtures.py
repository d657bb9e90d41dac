"""What the pass-through tests share (`test_proxy_passthrough`,
`test_proxy_passthrough_instances`, `test_proxy_tunnel`): the splice counters, a plain GET."""

from __future__ import annotations

from tests.support.raw_http import raw_request
from tests.webapi.conftest import as_admin


def counters(gateway: str) -> dict[str, int]:
    """The gateway's pass-through counters (`GET /admin/proxy/stats`, `passthrough`)."""
    stats = as_admin.get(f"{gateway}/admin/proxy/stats", timeout=5).json()
    return dict(stats["passthrough"])


def get(path: str) -> bytes:
    """A GET of `path`, as raw bytes."""
    return raw_request("GET", path, {})
