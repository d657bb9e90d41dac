"""A service of one upstream instance behind a websocket service, for the relay's tests
(`/ws/proxy/`, `/ws/stream`); the upstream is `tests.support.ws_backend`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.websocket.conftest import Backends, WsServer, wait_reachable


async def one_instance(server: WsServer, backends: Backends) -> str:
    """Instance `a` of `backends`' service, started, once `server` relays connections to
    it; the service's name."""
    backends.start("a")
    await wait_reachable(server, backends.service, {"a"})
    return backends.service


@pytest.fixture(name="service", scope="module")
async def service_fixture(redis_url: str, ws_server: WsServer) -> AsyncIterator[str]:
    """A service of one upstream instance (`one_instance`) reachable through `ws_server`,
    shared by the module's tests; stopped after them."""
    backends = Backends(redis_url)
    try:
        yield await one_instance(ws_server, backends)
    finally:
        backends.stop()
