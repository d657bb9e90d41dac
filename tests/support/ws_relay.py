"""A service of one upstream instance behind a websocket service, or of two the `hash`
strategy chooses between, for the relay's tests (`/ws/proxy/`, `/ws/stream`); the
upstreams are `tests.support.ws_backend`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers import wait_for_async
from tests.support.policy import update_service
from tests.websocket.conftest import Backends, WsServer, wait_reachable


async def one_instance(server: WsServer, backends: Backends) -> str:
    """Instance `a` of `backends`' service, started, once `server` relays connections to
    it; the service's name."""
    backends.start("a")
    await wait_reachable(server, backends.service, {"a"})
    return backends.service


async def hashed_pair(server: WsServer, backends: Backends, **policy: Any) -> str:
    """Instances `a` and `b` of `backends`' service, started, once `server` relays
    connections to both and has applied the live policy's `hash` strategy for the
    service (with `policy`'s other fields: `hash_on="client_ip"`); the service's name."""
    backends.start("a")
    backends.start("b")
    await wait_reachable(server, backends.service, {"a", "b"})
    doc = await update_service(backends.redis_url, backends.service, strategy="hash", **policy)
    await wait_for_async(lambda: server.health()["policy_version"] >= doc.version, timeout=10)
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
