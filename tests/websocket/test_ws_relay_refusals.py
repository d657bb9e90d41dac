"""An upstream that refuses a relayed upgrade (3xx, 4xx): the client gets its answer as
the gateway's proxy passes a backend's on (`websocket.refusals`): the status, the fields
less the hop-by-hop ones, byte for byte, and the body up to `MAX_RELAYED_BODY`, else
the platform's JSON error.

A real websocket service and a real upstream (`tests.support.ws_backend`, whose
`/refuse/<status>?<name>=<value>...` answers that status with those fields).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from urllib.parse import urlencode

import pytest
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

# One upstream instance shared by the module's tests: a refusal changes nothing there
# (the instance is neither ejected nor failed).
from tests.support.ws_relay import service_fixture  # noqa: F401
from tests.websocket.conftest import WsServer, whoami
from websocket.refusals import MAX_RELAYED_BODY

pytestmark = pytest.mark.timeout(120)


async def refused(
    server: WsServer, service: str, status: int, query: Sequence[tuple[str, str]] = ()
) -> Response:
    """The answer a client gets when the upstream refuses its upgrade with `status` and
    the fields (and `_body`, `_type`) of `query`."""
    target = f"/ws/proxy/{service}/refuse/{status}"
    if query:
        target += "?" + urlencode(query)
    with pytest.raises(InvalidStatus) as caught:
        await server.connect(target, additional_headers=server.bearer(), follow=False)
    response = caught.value.response
    assert response.status_code == status
    return response


def values(response: Response, name: str) -> list[str]:
    return response.headers.get_all(name)


async def test_a_401s_fields_reach_the_client_less_the_hop_by_hop_ones(
    ws_server: WsServer, service: str
) -> None:
    answer = await refused(ws_server, service, 401, [
        ("WWW-Authenticate", 'Bearer realm="api", error="invalid_token"'),
        ("Set-Cookie", "a=1; Path=/; HttpOnly"),
        ("Set-Cookie", "b=2"),
        ("Cache-Control", "no-store"),
        ("X-Name", "café"),  # written as ISO-8859-1 by the upstream: one byte, 0xE9
        # Hop-by-hop: named by Connection, by name, by the `Proxy-` prefix.
        ("Connection", "X-Hop"),
        ("X-Hop", "for this hop only"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "Basic"),
    ])  # fmt: skip
    assert values(answer, "www-authenticate") == ['Bearer realm="api", error="invalid_token"']
    assert values(answer, "set-cookie") == ["a=1; Path=/; HttpOnly", "b=2"]  # each line
    assert values(answer, "cache-control") == ["no-store"]
    assert values(answer, "x-name") == ["café"]  # byte for byte (read as ISO-8859-1 here)
    for hop in ("x-hop", "keep-alive", "proxy-authenticate"):
        assert not values(answer, hop), answer.headers
    assert [value.lower() for value in values(answer, "connection")] in (["close"], ["keep-alive"])
    # Its body, with its type, framed by the service.
    assert answer.body == b"refused\n"
    assert values(answer, "content-type") == ["text/plain; charset=utf-8"]
    assert values(answer, "content-length") == [str(len(b"refused\n"))]


@pytest.mark.parametrize(
    ("status", "name", "value"),
    [
        (429, "Retry-After", "7"),
        (302, "Location", "/login?next=%2Fchat"),  # never followed: the client gets it
        (307, "Location", "https://elsewhere.example/ws"),
        (426, "Sec-WebSocket-Version", "13"),
    ],
)
async def test_the_field_a_refusal_is_about_reaches_the_client(
    ws_server: WsServer, service: str, status: int, name: str, value: str
) -> None:
    answer = await refused(ws_server, service, status, [(name, value)])
    assert values(answer, name) == [value]
    assert answer.body == b"refused\n"


async def test_a_body_up_to_the_bound_passes_a_larger_one_is_the_json_error(
    ws_server: WsServer, service: str
) -> None:
    fields = [("WWW-Authenticate", "Bearer"), ("Content-Language", "fr"), ("_type", "text/html")]
    whole = await refused(ws_server, service, 401, [*fields, ("_body", str(MAX_RELAYED_BODY))])
    assert whole.body == b"x" * MAX_RELAYED_BODY
    assert values(whole, "content-type") == ["text/html"]
    assert values(whole, "content-language") == ["fr"]

    over = await refused(ws_server, service, 401, [*fields, ("_body", str(MAX_RELAYED_BODY + 1))])
    error = json.loads(over.body)["error"]
    assert error["code"] == "upstream_refused"
    assert f"{MAX_RELAYED_BODY + 1} bytes" in error["message"], error
    assert values(over, "www-authenticate") == ["Bearer"]  # its other fields pass still
    # Its Content-* fields describe the body not passed on: the JSON error's own instead.
    assert values(over, "content-type") == ["application/json"]
    assert not values(over, "content-language")
    assert values(over, "content-length") == [str(len(over.body))]


async def test_an_empty_body_is_the_json_error_and_an_untyped_one_gets_no_type(
    ws_server: WsServer, service: str
) -> None:
    empty = await refused(ws_server, service, 403, [("_body", "0"), ("X-Reason", "origin")])
    assert json.loads(empty.body)["error"]["code"] == "upstream_refused"
    assert values(empty, "x-reason") == ["origin"]

    untyped = await refused(ws_server, service, 404, [("_type", "")])
    assert untyped.body == b"refused\n"
    assert not values(untyped, "content-type")  # none added (not `None`), as the gateway


async def test_the_refusing_instance_still_serves(ws_server: WsServer, service: str) -> None:
    await refused(ws_server, service, 401, [("WWW-Authenticate", "Bearer")])
    assert await whoami(ws_server, service) == "a"
