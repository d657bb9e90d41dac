"""What the websocket service passes on to an instance of a client's credential and
forwarding fields, and where it reads `Via` (`common.forwarding`, as at the gateway:
`tests/webapi/test_proxy_forwarding_fields.py`), on `/ws/proxy/` and `/ws/stream`:

* ambiguous credential fields (two `Authorization`, two `X-Api-Key`, a bearer and an
  `X-Api-Key` that differ) refuse the upgrade with 400 `malformed_header`: the service
  authenticated one and would have passed another on;
* the client's forwarding fields (`Forwarded`, `X-Forwarded-*` but `-For`, `X-Real-IP`,
  `X-Client-IP`, `True-Client-IP`) never reach the instance;
* `Via` makes a 508 `proxy_loop` only on an upgrade to be relayed, and only when the
  gateway's mark is the whole received-by of an entry.

Real websocket service and upstream (`tests.support.ws_backend`, whose `handshake`
answers every field line of its upgrade request)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from common.forwarding import MAX_VIA_HOPS, VIA
from tests.helpers import DROPPED_FORWARDING, SPOOFED_FORWARDING, forged_admin_jwt, issue_api_key
from tests.support.ws_relay import service_fixture  # noqa: F401 (one upstream instance)
from tests.websocket.conftest import WsServer, recv_json

pytestmark = pytest.mark.timeout(60)

LOOP = ", ".join([VIA] * MAX_VIA_HOPS)


async def seen_by_upstream(
    server: WsServer, route: str, service: str, headers: list[tuple[str, str]]
) -> dict[str, Any]:
    """What the upstream of a connection on `route` (`proxy`: `/ws/proxy/`, `stream`:
    `/ws/stream`) answers `handshake`, the client sending `headers`."""
    if route == "proxy":
        async with server.connect(f"/ws/proxy/{service}/echo", additional_headers=headers) as ws:
            await ws.send("handshake")
            answer: dict[str, Any] = await recv_json(ws)
            return answer
    async with server.connect("/ws/stream", additional_headers=headers) as ws:
        await ws.send(json.dumps({"service_name": service, "handshake": True}))
        result: dict[str, Any] = (await recv_json(ws))["result"]
        return result


def values(seen: dict[str, Any], name: str) -> list[str]:
    return [value for field, value in seen["headers"] if field.lower() == name]


@pytest.mark.parametrize("route", ["proxy", "stream"])
@pytest.mark.parametrize(
    "case",
    ["key-then-forged-jwt", "jwt-then-garbage", "two-api-keys", "api-key-and-another-bearer"],
)
async def test_ambiguous_credential_fields_refuse_the_upgrade(
    ws_server: WsServer, redis_url: str, service: str, route: str, case: str
) -> None:
    key = issue_api_key(redis_url, ["*"])
    headers = {
        # The probe's: the key authenticated (and dropped), the forged JWT passed on alone.
        "key-then-forged-jwt": [("Authorization", f"Bearer {key}"),
                                ("Authorization", f"Bearer {forged_admin_jwt()}")],
        "jwt-then-garbage": [*ws_server.bearer().items(), ("Authorization", "Bearer garbage")],
        "two-api-keys": [("X-Api-Key", key), ("X-Api-Key", issue_api_key(redis_url, ["*"]))],
        "api-key-and-another-bearer": [("X-Api-Key", key),
                                       ("Authorization", f"Bearer {forged_admin_jwt()}")],
    }[case]  # fmt: skip
    seen = await seen_by_upstream(ws_server, route, service, headers[:1])  # one: good
    assert values(seen, "authorization") == [v for k, v in headers[:1] if "sbk_" not in v]
    with pytest.raises(InvalidStatus) as refused:
        await seen_by_upstream(ws_server, route, service, headers)
    assert refused.value.response.status_code == 400
    error = json.loads(refused.value.response.body)["error"]
    assert error["code"] == "malformed_header", error


@pytest.mark.parametrize("route", ["proxy", "stream"])
async def test_the_clients_forwarding_fields_never_reach_the_upstream(
    ws_server: WsServer, service: str, route: str
) -> None:
    headers = [*ws_server.bearer().items(), *SPOOFED_FORWARDING, ("X-Tenant", "acme")]
    seen = await seen_by_upstream(ws_server, route, service, headers)
    assert values(seen, "x-tenant") == ["acme"]
    assert values(seen, "x-forwarded-for") == ["6.6.6.6, 127.0.0.1"]
    assert values(seen, "x-forwarded-proto") == ["http"]
    assert values(seen, "x-forwarded-host") == [ws_server.address]
    names = {name.lower() for name, _ in seen["headers"]}
    assert not names & DROPPED_FORWARDING, seen


async def test_via_is_read_only_on_an_upgrade_to_be_relayed(
    ws_server: WsServer, service: str
) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        health = await client.get(f"http://{ws_server.address}/health", headers={"Via": LOOP})
    assert health.status_code == 200, health.text
    headers = [*ws_server.bearer().items(), ("Via", LOOP)]
    async with ws_server.connect("/ws", additional_headers=headers) as ws:
        await ws.ping()
    for route in ("proxy", "stream"):
        with pytest.raises(InvalidStatus) as refused:
            await seen_by_upstream(ws_server, route, service, headers)
        assert refused.value.response.status_code == 508


@pytest.mark.parametrize("route", ["proxy", "stream"])
@pytest.mark.parametrize(
    "via",
    [
        "1.1 switchboardX, 1.1 switchboardX, foo switchboard",  # one mark, whole
        "1.1 edge (switchboard, 1.1 switchboard, switchboard), 1.1 switchboard",  # comments
    ],
)
async def test_via_counts_whole_marks_of_the_gateway(
    ws_server: WsServer, service: str, route: str, via: str
) -> None:
    headers = [*ws_server.bearer().items(), ("Via", via)]
    seen = await seen_by_upstream(ws_server, route, service, headers)
    assert values(seen, "via") == [via, VIA]
