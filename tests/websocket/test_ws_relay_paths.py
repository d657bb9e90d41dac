"""The relay's upstream target (`/ws/proxy/<service>/<path>`): checked before the
upgrade as the gateway's `/svc/` checks its path (the same function,
`common.proxy_paths`), and passed to the upstream as the client sent it; and an
unknown service refused before the upgrade, as at the gateway.

A real websocket service and a real upstream (`tests.support.ws_backend`, whose
`whoami` answers the path its upgrade request named).
"""

from __future__ import annotations

import json
import uuid

import pytest
import websockets

from tests.support.raw_http import exchange
from tests.support.registry import dead_instances
from tests.support.ws_relay import service_fixture  # noqa: F401 (one upstream instance)
from tests.websocket.conftest import LogWatch, WsServer, recv_json, upgrade_head

pytestmark = pytest.mark.timeout(120)


def upgrade(server: WsServer, target: str) -> tuple[int, dict[str, object]]:
    """The status and JSON body of the answer to a raw upgrade request for `target`
    (bytes as written: no client library normalizes them)."""
    head = f"{upgrade_head(target)}Authorization: Bearer {server.token()}\r\n\r\n"
    answer = exchange(server.address, head.encode())
    body = json.loads(answer.body) if answer.status != 101 else {}
    return answer.status, body


# What the gateway's `/svc/` refuses (tests/webapi/test_proxy_malformed.py and others):
# dot segments, encoded or with parameters, encoded slashes, backslashes, NUL; and a
# fragment, no part of a request target.
TRAVERSALS = [
    "/../other/x",
    "/a/..",
    "/..;/x",
    "/a/.",
    "/%2e%2e/x",
    "/%2E%2e;x/y",
    "/..%3bx/y",
    "/..%2fx",
    "/a%2fb",
    "/a%5cb",
    "/a\\b",
    "/%00",
    "/x#/../../y",
    "/x?a=1#f",
]


@pytest.mark.parametrize("path", TRAVERSALS)
async def test_a_path_leaving_the_services_space_is_400_before_the_upgrade(
    ws_server: WsServer, service: str, path: str
) -> None:
    refused = LogWatch(ws_server, "request refused")
    status, body = upgrade(ws_server, f"/ws/proxy/{service}{path}")
    assert (status, body["error"]["code"]) == (400, "invalid_path")  # type: ignore[index]
    logged = await refused.wait(1)
    assert [(r["status"], r["code"]) for r in logged] == [(400, "invalid_path")]


async def test_the_upstream_gets_the_path_and_query_as_the_client_sent_them(
    ws_server: WsServer, service: str
) -> None:
    # (They were percent-encoded again: `room%20one` reached the upstream as `room%2520one`.)
    for target in ["/room%20one", "/caf%C3%A9", "/%7Euser", "/a+b;v=1/c", "/x?q=a%20b&r=%26",
                   "//double/slash", "/", "/?only=query"]:  # fmt: skip
        async with ws_server.connect(f"/ws/proxy/{service}{target}") as ws:
            await ws.send("whoami")
            assert (await recv_json(ws))["path"] == target
    async with ws_server.connect(f"/ws/proxy/{service}") as ws:  # no path at all: "/"
        await ws.send("whoami")
        assert (await recv_json(ws))["path"] == "/"


async def test_an_unknown_service_is_404_before_the_upgrade(ws_server: WsServer) -> None:
    name = f"never{uuid.uuid4().hex[:8]}"
    status, body = upgrade(ws_server, f"/ws/proxy/{name}/echo")
    assert (status, body["error"]["code"]) == (404, "unknown_service")  # type: ignore[index]
    assert name in body["error"]["message"]  # type: ignore[index]
    with pytest.raises(websockets.InvalidStatus) as info:
        async with ws_server.connect(f"/ws/proxy/{name}"):
            pass
    assert info.value.response.status_code == 404


async def test_a_known_service_with_no_live_instance_is_upgraded_then_closed_1014(
    ws_server: WsServer,
) -> None:
    # Registered, then gone (deregistered; not yet pruned): known, so a browser gets the
    # reason in a close frame, as before.
    name = f"gone{uuid.uuid4().hex[:6]}"
    async with dead_instances(ws_server.redis_url, name, 1, kind="ws"):
        pass
    async with ws_server.connect(f"/ws/proxy/{name}/echo") as ws:
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (
        1014,
        f"upstream unavailable: {name}: no live instance",
    )
