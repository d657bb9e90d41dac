"""The client's address on `/ws/proxy/`, as at the gateway: the upstream's handshake
carries `X-Forwarded-For` (the lines received, then the peer), `X-Forwarded-Proto` and
`X-Forwarded-Host`, and `hash_on: client_ip` hashes the peer, or behind `TRUSTED_PROXIES`
the right-most untrusted hop of every `X-Forwarded-For` line (`common.clientip`).

Real websocket services and upstreams (`tests.support.ws_backend`, whose `forwarded`
command answers what its handshake carried); the test, on 127.0.0.1, is the client, or
the trusted proxy in front of the clients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from tests.support.ws_relay import hashed_pair
from tests.websocket.conftest import Backends, WsServer, recv_json

pytestmark = pytest.mark.timeout(120)


async def forwarded(server: WsServer, service: str, extra: Sequence[tuple[str, str]]) -> Any:
    """What the upstream of a new relayed connection, sent `extra` fields, answers
    `forwarded` (its instance and the `X-Forwarded-*` lines it received)."""
    headers = [*server.bearer().items(), *extra]
    async with server.connect(f"/ws/proxy/{service}/echo", additional_headers=headers) as ws:
        await ws.send("forwarded")
        return await recv_json(ws)


def lines(*values: str) -> list[tuple[str, str]]:
    """One `X-Forwarded-For` field line per value."""
    return [("X-Forwarded-For", value) for value in values]


# Sanic's own proxy settings (read from SANIC_* variables) make `request.remote_addr`
# any peer's X-Real-IP or X-Forwarded-For: they must change nothing here.
SANIC_PROXY_SETTINGS = {"SANIC_REAL_IP_HEADER": "x-real-ip", "SANIC_PROXIES_COUNT": "1"}


@pytest.mark.parametrize("sanic_env", [{}, SANIC_PROXY_SETTINGS], ids=["default", "sanic-proxies"])
async def test_an_untrusted_peers_forwarded_for_is_passed_on_never_believed(
    make_ws_server: Callable[..., WsServer], backends: Backends, sanic_env: dict[str, str]
) -> None:
    server = make_ws_server(**sanic_env)
    await hashed_pair(server, backends, hash_on="client_ip")
    # One client (no trusted proxy: the peer, 127.0.0.1) writing another address each time.
    seen = [await forwarded(server, backends.service,
                            [*lines(f"198.51.100.{i}"), ("X-Real-IP", f"203.0.113.{i}")])
            for i in range(12)]  # fmt: skip
    assert len({answer["instance"] for answer in seen}) == 1, seen  # one client, one instance
    assert seen[0] == {
        "instance": seen[0]["instance"],
        "x-forwarded-for": ["198.51.100.0, 127.0.0.1"],  # the gateway's: passed on, then the peer
        "x-forwarded-proto": ["http"],
        "x-forwarded-host": [server.address],
    }


async def test_behind_a_trusted_proxy_the_client_is_the_right_most_untrusted_hop(
    make_ws_server: Callable[..., WsServer], backends: Backends
) -> None:
    server = make_ws_server(TRUSTED_PROXIES="127.0.0.1")
    await hashed_pair(server, backends, hash_on="client_ip")

    async def owners(client: str) -> set[str]:
        # The client writes a new address in its own line each time; the proxy (the test)
        # adds its line after it, as HAProxy's `option forwardfor` does.
        seen = [await forwarded(server, backends.service, lines(f"198.51.100.{i}", client))
                for i in range(3)]  # fmt: skip
        assert seen[-1]["x-forwarded-for"] == [f"198.51.100.2, {client}, 127.0.0.1"]
        return {answer["instance"] for answer in seen}

    spread = [await owners(f"203.0.113.{k}") for k in range(12)]
    assert all(len(owner) == 1 for owner in spread), spread  # each client sticks to one
    assert set().union(*spread) == {"a", "b"}  # and clients are spread, not all on the proxy's
