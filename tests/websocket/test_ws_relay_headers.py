"""What an upstream's handshake carries on `/ws/proxy/` and `/ws/stream`: the client's
fields as the gateway's HTTP proxy forwards them (`websocket.handshake`): less the
hop-by-hop ones and the API key, the `bearer` subprotocol never (a JWT authenticated
in it passes as `Authorization`, as a header client's), with
`X-Forwarded-*`, `X-Request-Id` and `Via` set; the client's subprotocols offered to the
upstream and its choice answered; an upstream's 4xx refusal passed on, no failure of
the instance (what the client gets of it: `test_ws_relay_refusals`).

Real websocket services and upstreams (`tests.support.ws_backend`, whose `handshake`
command answers every field line of its upgrade request and the subprotocol chosen).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.helpers import issue_api_key, wait_for_async
from tests.support.ws_relay import hashed_pair, one_instance
from tests.websocket.conftest import Backends, WsServer, recv_json, wait_reachable, whoami

pytestmark = pytest.mark.timeout(120)

VIA = "1.1 switchboard"


async def handshake(
    server: WsServer,
    service: str,
    headers: Sequence[tuple[str, str]],
    *,
    subprotocols: Sequence[str] | None = None,
) -> tuple[dict[str, Any], str | None]:
    """What the upstream of a new relayed connection (the client sending `headers` and
    offering `subprotocols`) answers `handshake`, and the client's subprotocol."""
    async with server.connect(f"/ws/proxy/{service}/echo", additional_headers=list(headers),
                              subprotocols=subprotocols) as ws:  # fmt: skip
        await ws.send("handshake")
        return await recv_json(ws), ws.subprotocol


def values(seen: dict[str, Any], name: str) -> list[str]:
    """The values of the field lines named `name` the upstream received, in order."""
    return [value for field, value in seen["headers"] if field.lower() == name]


async def test_the_clients_fields_reach_the_upstream_less_the_hop_by_hop_ones(
    ws_server: WsServer, backends: Backends
) -> None:
    service = await one_instance(ws_server, backends)
    utf8_and_raw = "café".encode().decode("latin-1") + " \xff"  # the bytes, as sent
    seen, _ = await handshake(ws_server, service, [
        *ws_server.bearer().items(),
        ("Cookie", "session=s3cr3t; theme=dark"),
        ("Origin", "https://app.example"),
        ("User-Agent", "Mozilla/5.0 (test)"),
        ("Accept-Language", "fr-CH, fr;q=0.9"),
        ("X-Tenant", "acme"),
        ("X-Name", utf8_and_raw),
        ("Via", "1.0 edge"),
        ("X-Request-Id", "trace-1:abc.DEF_2"),
        # Hop-by-hop: named by Connection, by name, by the `Proxy-` prefix.
        ("Connection", "X-Hop"),
        ("X-Hop", "for the next hop only"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Proxy-Authorization", "Basic eDp5"),
        # The client library's own: the upstream gets the relay's.
        ("Sec-WebSocket-Extensions", "permessage-deflate"),
    ])  # fmt: skip
    assert values(seen, "cookie") == ["session=s3cr3t; theme=dark"]
    assert values(seen, "origin") == ["https://app.example"]
    assert values(seen, "user-agent") == ["Mozilla/5.0 (test)"]  # the client's, alone
    assert values(seen, "accept-language") == ["fr-CH, fr;q=0.9"]
    assert values(seen, "x-tenant") == ["acme"]
    assert values(seen, "x-name") == [utf8_and_raw]  # byte for byte
    assert values(seen, "x-request-id") == ["trace-1:abc.DEF_2"]  # well formed: kept
    assert values(seen, "via") == ["1.0 edge", VIA]
    assert values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert values(seen, "x-forwarded-proto") == ["http"]
    assert values(seen, "x-forwarded-host") == [ws_server.address]
    names = [field.lower() for field, _ in seen["headers"]]
    for hop in ("x-hop", "keep-alive", "te", "proxy-authorization", "sec-websocket-extensions"):
        assert hop not in names, seen
    assert values(seen, "connection") == ["Upgrade"]  # the relay's own handshake's
    for own in ("host", "upgrade", "sec-websocket-key", "sec-websocket-version"):
        assert names.count(own) == 1, seen
    assert values(seen, "host") != [ws_server.address]  # the instance's, not the client's


async def test_a_bearer_jwt_passes_as_to_the_gateways_backends(
    ws_server: WsServer, backends: Backends
) -> None:
    service = await one_instance(ws_server, backends)
    bearer = ws_server.bearer()
    seen, _ = await handshake(ws_server, service, list(bearer.items()))
    assert values(seen, "authorization") == [bearer["Authorization"]]


@pytest.mark.parametrize("way", ["authorization", "x-api-key", "subprotocol"])
async def test_an_api_key_however_presented_is_not_passed_on(
    ws_server: WsServer, backends: Backends, way: str
) -> None:
    """No API key reaches the upstream, nor the `bearer` subprotocol; the client's other
    fields do."""
    service = await one_instance(ws_server, backends)
    key = issue_api_key(backends.redis_url, ["*"])
    headers: list[tuple[str, str]] = [("Cookie", "session=1")]
    subprotocols = None
    if way == "authorization":
        headers.append(("Authorization", f"Bearer {key}"))
    elif way == "x-api-key":
        headers.append(("X-Api-Key", key))
    else:
        subprotocols = ["bearer", key]
    seen, chosen = await handshake(ws_server, service, headers, subprotocols=subprotocols)
    assert values(seen, "cookie") == ["session=1"]
    assert not [line for line in seen["headers"] if key in line[1]], seen
    names = {field.lower() for field, _ in seen["headers"]}
    assert not names & {"authorization", "x-api-key", "sec-websocket-protocol"}, seen
    assert chosen == ("bearer" if subprotocols else None)


async def test_a_browsers_jwt_reaches_the_upstream_as_a_header_clients_does(
    ws_server: WsServer, backends: Backends
) -> None:
    """A JWT in the `bearer` subprotocol (a browser's: it cannot set `Authorization`)
    is never offered to the upstream as a subprotocol (a backend may log those), and
    reaches it as a JWT in `Authorization` does: `Authorization: Bearer <jwt>`."""
    service = await one_instance(ws_server, backends)
    jwt = ws_server.token()
    offered = ["bearer", jwt, "chat.v2"]
    seen, chosen = await handshake(ws_server, service, [("Cookie", "s=1")], subprotocols=offered)
    assert values(seen, "authorization") == [f"Bearer {jwt}"]
    assert values(seen, "sec-websocket-protocol") == ["chat.v2"]
    assert [name for name, value in seen["headers"] if jwt in value] == ["Authorization"], seen
    assert (chosen, seen["subprotocol"]) == ("chat.v2", "chat.v2")


@pytest.mark.parametrize("other", ["x-api-key", "authorization-jwt", "authorization-basic"])
async def test_a_subprotocol_jwt_beside_another_credential_is_not_passed_on(
    ws_server: WsServer, backends: Backends, other: str
) -> None:
    """The service authenticates the header's credential first: a subprotocol token it
    did not check never reaches the upstream, and a client's own `Authorization` field
    is the one the upstream gets, alone."""
    service = await one_instance(ws_server, backends)
    unchecked = ws_server.token(sub="someone-else")
    headers = {
        "x-api-key": [("X-Api-Key", issue_api_key(backends.redis_url, ["*"]))],
        "authorization-jwt": list(ws_server.bearer().items()),
        "authorization-basic": [("Authorization", "Basic dXNlcjpwdw==")],
    }[other]
    seen, _ = await handshake(ws_server, service, headers, subprotocols=["bearer", unchecked])
    assert not [line for line in seen["headers"] if unchecked in line[1]], seen
    expected = [value for name, value in headers if name == "Authorization"]
    assert values(seen, "authorization") == expected


async def test_envelope_requests_carry_a_subprotocol_jwt_as_authorization(
    ws_server: WsServer, backends: Backends
) -> None:
    await one_instance(ws_server, backends)
    jwt = ws_server.token()
    async with ws_server.connect("/ws/stream", additional_headers=[],
                                 subprotocols=["bearer", jwt]) as ws:  # fmt: skip
        await ws.send(json.dumps({"service_name": backends.service, "handshake": True}))
        seen = (await recv_json(ws))["result"]
    assert values(seen, "authorization") == [f"Bearer {jwt}"]
    assert not values(seen, "sec-websocket-protocol")


async def test_a_request_id_is_the_clients_when_well_formed_else_a_new_one(
    ws_server: WsServer, backends: Backends
) -> None:
    service = await one_instance(ws_server, backends)
    bearer = list(ws_server.bearer().items())
    ids = []
    for sent in ([], [("X-Request-Id", "not a valid id!")], [("X-Request-Id", "x" * 129)]):
        seen, _ = await handshake(ws_server, service, [*bearer, *sent])
        assert len(values(seen, "x-request-id")) == 1, seen
        ids.append(values(seen, "x-request-id")[0])
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in ids), ids
    assert len(set(ids)) == 3


async def test_a_request_through_the_gateway_too_often_is_a_loop_508(
    ws_server: WsServer, backends: Backends
) -> None:
    service = await one_instance(ws_server, backends)
    bearer = list(ws_server.bearer().items())
    two = [("Via", f"{VIA}, 1.1 other"), ("Via", VIA)]
    seen, _ = await handshake(ws_server, service, [*bearer, *two])
    assert values(seen, "via") == [f"{VIA}, 1.1 other", VIA, VIA]
    with pytest.raises(InvalidStatus) as refused:
        await handshake(ws_server, service, [*bearer, *two, ("Via", f"1.0 edge, {VIA}")])
    assert refused.value.response.status_code == 508
    assert json.loads(refused.value.response.body)["error"]["code"] == "proxy_loop"


@pytest.mark.parametrize(
    ("offered", "header", "client_gets", "upstream_offered"),
    [
        (["bearer", "TOKEN", "chat.v2"], False, "chat.v2", ["chat.v2"]),  # a browser
        (["bearer", "TOKEN", "other", "mqtt"], False, "mqtt", ["other, mqtt"]),
        (["bearer", "TOKEN", "other"], False, "bearer", ["other"]),  # the upstream chose none
        (["mqtt"], True, "mqtt", ["mqtt"]),  # a client with the Authorization header
        (["other"], True, None, ["other"]),
    ],
)
async def test_the_client_gets_the_subprotocol_its_upstream_chose(
    ws_server: WsServer,
    backends: Backends,
    offered: list[str],
    header: bool,
    client_gets: str | None,
    upstream_offered: list[str],
) -> None:
    service = await one_instance(ws_server, backends)
    token = ws_server.token()
    offered = [token if p == "TOKEN" else p for p in offered]
    headers = list(ws_server.bearer().items()) if header else []
    seen, chosen = await handshake(ws_server, service, headers, subprotocols=offered)
    assert chosen == client_gets
    assert seen["subprotocol"] == (client_gets if client_gets != "bearer" else None)
    assert values(seen, "sec-websocket-protocol") == upstream_offered


async def test_an_upstreams_4xx_refuses_the_client_and_ejects_no_instance(
    ws_server: WsServer, backends: Backends
) -> None:
    """A backend refusing the client (its CSRF origin check, a path it does not serve)
    or redirecting it answers that client; the instance, alone in its service, serves the
    next one."""
    service = await one_instance(ws_server, backends)
    bearer = list(ws_server.bearer().items())
    for path, headers, status, body in (
        ("/echo", [("Origin", "https://refused.example")], 403, b"origin refused\n"),
        ("/refuse/404", [], 404, b"refused\n"),
        ("/redirect", [], 302, b"moved\n"),  # passed on, not followed (with the client's fields)
    ):
        for _ in range(3):
            with pytest.raises(InvalidStatus) as refused:
                await ws_server.connect(f"/ws/proxy/{service}{path}", follow=False,
                                        additional_headers=[*bearer, *headers])  # fmt: skip
            answer = refused.value.response
            assert answer.status_code == status
            assert answer.body == body  # the upstream's answer (`test_ws_relay_refusals`)
        assert await whoami(ws_server, service) == "a"  # not ejected, not failed over
    assert answer.headers.get_all("location") == ["/echo"]  # the redirect's, as it was


async def test_envelope_requests_carry_the_clients_fields_and_hash_on_its_key(
    ws_server: WsServer, backends: Backends
) -> None:
    service = await hashed_pair(ws_server, backends)
    key = issue_api_key(backends.redis_url, ["*"])
    headers = [("X-Api-Key", key), ("Cookie", "session=1"), ("X-Balance-Key", "client-7")]
    async with ws_server.connect("/ws/stream", additional_headers=headers) as ws:
        owners = set()
        for _ in range(6):
            await ws.send(json.dumps({"service_name": service, "frames": 1}))
            owners.add((await recv_json(ws))["result"].split(":")[0])
            assert (await recv_json(ws))["flag"] == 1
        assert len(owners) == 1, owners  # one key, one instance
        await ws.send(json.dumps({"service_name": service, "handshake": True}))
        seen = (await recv_json(ws))["result"]
    assert values(seen, "cookie") == ["session=1"]
    assert values(seen, "x-balance-key") == ["client-7"]
    assert values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert values(seen, "x-forwarded-host") == [ws_server.address]
    assert values(seen, "via") == [VIA]
    assert len(values(seen, "x-request-id")) == 1
    assert not [line for line in seen["headers"] if key in line[1]], seen


async def test_an_envelope_connections_requests_carry_its_upgrades_fields(
    ws_server: WsServer, backends: Backends
) -> None:
    # Built once for the connection: they were built again for every request, so a
    # client that sent no `X-Request-Id` got a new one on each.
    backends.start("a")
    await wait_reachable(ws_server, backends.service, {"a"})
    async with ws_server.connect("/ws/stream") as ws:
        ids = []
        for _ in range(2):
            await ws.send(json.dumps({"service_name": backends.service, "handshake": True}))
            ids.append(values((await recv_json(ws))["result"], "x-request-id"))
    assert len(ids[0]) == 1 and ids[0] == ids[1], ids


async def test_a_client_gone_during_the_upstreams_handshake_leaves_no_upstream_open(
    ws_server: WsServer, backends: Backends
) -> None:
    """The upstream is connected before the client's upgrade is answered: a client that
    leaves meanwhile takes its upstream connection with it."""
    service = await one_instance(ws_server, backends)
    slow = asyncio.ensure_future(ws_server.connect(f"/ws/proxy/{service}/slow").__aenter__())
    await asyncio.sleep(0.3)  # (not a timing assertion: the client leaves at some point)
    slow.cancel()
    with pytest.raises((asyncio.CancelledError, websockets.ConnectionClosed, OSError)):
        await slow

    async def upstream_state() -> Any:
        async with ws_server.connect(f"/ws/proxy/{service}/echo") as ws:
            await ws.send("open")
            return await recv_json(ws)

    async def answered() -> bool:
        return bool((await upstream_state())["slow_done"] >= 1)

    await wait_for_async(answered, timeout=10)  # the upstream answered the slow handshake
    # Then (one more round trip later) only the asking connection is open there.
    assert (await upstream_state())["open"] == 1


@pytest.mark.parametrize("path", ["/ws", "/ws/stream"])
async def test_a_field_value_that_is_not_utf8_is_no_500(ws_server: WsServer, path: str) -> None:
    """HTTP allows any byte from 0x80 in a value: the upgrade is answered, not a 500."""
    headers = [*ws_server.bearer().items(), ("X-Name", "\xff\xfe")]
    async with ws_server.connect(path, additional_headers=headers) as ws:
        await ws.ping()
