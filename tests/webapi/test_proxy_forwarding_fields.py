"""What the gateway forwards of a client's credential and forwarding fields, and where
it reads `Via` (`common.forwarding`), on each of its ways to an instance: the fast path
(`/svc/`, a credential in its cache), Sanic's `/svc/` route (a chunked body: never the
fast path's) and a policy route.

* a request with ambiguous credential fields (two `Authorization`, two `X-Api-Key`, a
  bearer and an `X-Api-Key` that differ) is a 400 `malformed_header` and reaches no
  instance: the gateway checked one and would have forwarded another;
* the client's forwarding fields (`Forwarded`, `X-Forwarded-*` but `-For`, `X-Real-IP`,
  `X-Client-IP`, `True-Client-IP`) never reach an instance;
* `Via` makes a 508 `proxy_loop` only on a request about to be forwarded, and only
  when the gateway's mark is the whole received-by of an entry.

The instance is a scripted upstream in this process (`upstream_servers.Upstream`), which
records every request it gets with its field lines (`Recorder`)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from common.forwarding import MAX_VIA_HOPS, VIA
from tests.helpers import (
    DROPPED_FORWARDING,
    SPOOFED_FORWARDING,
    forged_admin_jwt,
    issue_api_key,
    issue_user_token,
    wait_for,
)
from tests.support.policy import apply_routes
from tests.support.raw_http import Answer, exchange
from tests.support.registry import deregister, register
from tests.webapi.conftest import answered, as_admin
from tests.webapi.upstream_servers import Peer, Upstream, ok, upstream_in_thread

pytestmark = pytest.mark.timeout(60)

# The ways to an instance: the fast path, Sanic's `/svc/` route, a policy route.
WAYS = ["fast", "sanic", "route"]


async def _answer_ok(peer: Peer) -> None:
    """Answers 200 `ok` to anything (the `Upstream` records each request)."""
    async for _ in peer.requests():
        await peer.send(ok(b"ok"))


@dataclass
class Recorder:
    """The recording instance of `service`, also routed (non-public) from `/<service>-r/`."""

    gateway: str
    service: str
    server: Upstream

    def fields(self, marker: str) -> list[list[tuple[str, str]]]:
        """The field lines of each request the instance got whose path holds `marker`."""
        return [req.headers for req in list(self.server.requests) if marker in req.target]

    def path(self, way: str, marker: str) -> str:
        if way == "route":
            return f"/{self.service}-r/{marker}"
        return f"/svc/{self.service}/{marker}"


@pytest.fixture(scope="module")
def recorder(gateway: str, redis_url: str) -> Iterator[Recorder]:
    with upstream_in_thread(_answer_ok) as server:
        service = f"rec{uuid.uuid4().hex[:6]}"
        asyncio.run(register(redis_url, service, {f"{service}-1": server.address}))
        try:
            rec = Recorder(gateway, service, server)
            wait_for(lambda: as_admin.get(f"{gateway}/svc/{service}/up",
                                          timeout=5).status_code == 200, timeout=10)  # fmt: skip
            route = {"prefix": f"/{service}-r/", "service": service, "strip_prefix": True}
            apply_routes(gateway, redis_url, [route])
            yield rec
        finally:
            apply_routes(gateway, redis_url, [])
            asyncio.run(deregister(redis_url, service, f"{service}-1"))


def send(rec: Recorder, way: str, fields: list[tuple[str, str]], marker: str) -> Answer:
    """One request to the instance by `way` with the field lines `fields`; its answer."""
    lines = [f"{'POST' if way == 'sanic' else 'GET'} {rec.path(way, marker)} HTTP/1.1",
             "Host: gw.example", *(f"{name}: {value}" for name, value in fields)]  # fmt: skip
    body = b""
    if way == "sanic":  # a chunked body: never the fast path's
        lines.append("Transfer-Encoding: chunked")
        body = b"2\r\n{}\r\n0\r\n\r\n"
    return exchange(rec.gateway, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def values(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [value for field, value in fields if field.lower() == name]


@pytest.fixture(scope="module")
def credentials(recorder: Recorder, redis_url: str) -> dict[str, str]:
    """The credentials of the tests, the good ones in the fast path's cache already."""
    good = {
        "key": ("X-Api-Key", issue_api_key(redis_url, ["*"])),
        "other_key": ("X-Api-Key", issue_api_key(redis_url, ["*"])),
        "jwt": ("Authorization", "Bearer " + issue_user_token(redis_url, "u-fields", "fields")),
    }
    for field in good.values():
        assert send(recorder, "fast", [field], "warm").status == 200
    return {
        **{name: value.removeprefix("Bearer ") for name, (_, value) in good.items()},
        "forged": forged_admin_jwt(),
    }


def forwarded(rec: Recorder, way: str, fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The field lines the instance got of a request sent by `way` with `fields`, which
    the gateway answered 200 (by its fast path when `way` is `fast`)."""
    marker = f"m-{uuid.uuid4().hex}"
    before = answered(rec.gateway)
    answer = send(rec, way, fields, marker)
    assert answer.status == 200, answer
    assert (answered(rec.gateway) > before) == (way == "fast")
    (seen,) = rec.fields(marker)
    return seen


AMBIGUOUS = {
    # The probe's: the key authenticated (and dropped), the forged JWT forwarded alone.
    "key-then-forged-jwt": [
        ("Authorization", "Bearer {key}"),
        ("Authorization", "Bearer {forged}"),
    ],
    "jwt-then-garbage": [("Authorization", "Bearer {jwt}"), ("Authorization", "Bearer garbage")],
    "two-api-keys": [("X-Api-Key", "{key}"), ("X-Api-Key", "{other_key}")],
    "api-key-and-another-bearer": [("X-Api-Key", "{key}"), ("Authorization", "Bearer {forged}")],
}


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("case", list(AMBIGUOUS))
def test_ambiguous_credential_fields_are_a_400_and_reach_no_instance(
    recorder: Recorder, credentials: dict[str, str], way: str, case: str
) -> None:
    fields = [(name, value.format(**credentials)) for name, value in AMBIGUOUS[case]]
    first = fields[0]
    # The first credential alone is good (and, for the fast path, now in its cache).
    alone = send(recorder, way, [first], f"warm-{uuid.uuid4().hex}")
    assert alone.status == 200, alone
    marker = f"two-{uuid.uuid4().hex}"
    answer = send(recorder, way, fields, marker)
    assert answer.status == 400, answer
    assert json.loads(answer.body)["error"]["code"] == "malformed_header"
    assert recorder.fields(marker) == []


@pytest.mark.parametrize("way", WAYS)
def test_the_same_key_in_both_fields_passes_and_is_not_forwarded(
    recorder: Recorder, credentials: dict[str, str], way: str
) -> None:
    key = credentials["key"]
    fields = forwarded(recorder, way, [("Authorization", f"Bearer {key}"), ("X-Api-Key", key)])
    assert not values(fields, "authorization") and not values(fields, "x-api-key"), fields


@pytest.mark.parametrize("way", WAYS)
def test_the_checked_jwt_is_the_one_forwarded(
    recorder: Recorder, credentials: dict[str, str], way: str
) -> None:
    jwt = credentials["jwt"]
    fields = forwarded(recorder, way, [("Authorization", f"Bearer {jwt}")])
    assert values(fields, "authorization") == [f"Bearer {jwt}"]


def test_two_authorization_fields_are_a_400_on_any_route(recorder: Recorder) -> None:
    """Ambiguous credential fields are refused on every route, not only the proxy's."""
    answer = exchange(recorder.gateway, b"GET /health HTTP/1.1\r\nHost: gw\r\n"
                      b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n")  # fmt: skip
    assert answer.status == 400, answer


@pytest.mark.parametrize("way", WAYS)
def test_the_clients_forwarding_fields_never_reach_the_instance(
    recorder: Recorder, credentials: dict[str, str], way: str
) -> None:
    auth = ("X-Api-Key", credentials["key"])
    fields = forwarded(recorder, way, [auth, *SPOOFED_FORWARDING, ("X-Tenant", "acme")])
    assert values(fields, "x-tenant") == ["acme"]  # the client's other fields pass
    # The gateway's own: the client's X-Forwarded-For on the left of its peer.
    assert values(fields, "x-forwarded-for") == ["6.6.6.6, 127.0.0.1"]
    assert values(fields, "x-forwarded-proto") == ["http"]
    assert values(fields, "x-forwarded-host") == ["gw.example"]
    names = {name.lower() for name, _ in fields}
    assert not names & DROPPED_FORWARDING, fields


LOOP = ", ".join([VIA] * MAX_VIA_HOPS)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/health"), ("POST", "/api/v1/auth/login"), ("GET", "/no/such/route")],
)
def test_via_is_read_only_on_a_request_to_be_forwarded(
    recorder: Recorder, method: str, path: str
) -> None:
    """A route that forwards nothing to an instance answers as it would without `Via`."""
    body = {"json": {"username": "nobody", "password": "x"}} if method == "POST" else {}
    url = f"{recorder.gateway}{path}"
    without = httpx.request(method, url, timeout=10, **body)  # type: ignore[arg-type]
    answer = httpx.request(method, url, headers={"Via": LOOP}, timeout=10, **body)  # type: ignore[arg-type]
    assert answer.status_code == without.status_code != 508, answer.text


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(
    "via",
    [
        "1.1 switchboardX, 1.1 switchboardX, foo switchboard",  # one mark, whole
        "1.1 edge (switchboard, 1.1 switchboard, switchboard), 1.1 switchboard",  # comments
        "1.1 xswitchboard, HTTP/1.1 switchboard.example, 1.1 switchboard",
    ],
)
def test_via_counts_whole_marks_of_the_gateway(
    recorder: Recorder, credentials: dict[str, str], way: str, via: str
) -> None:
    fields = forwarded(recorder, way, [("X-Api-Key", credentials["key"]), ("Via", via)])
    assert values(fields, "via") == [via, VIA]


@pytest.mark.parametrize("way", WAYS)
def test_as_many_whole_marks_as_max_via_hops_are_a_loop(
    recorder: Recorder, credentials: dict[str, str], way: str
) -> None:
    marker = f"loop-{uuid.uuid4().hex}"
    via = [
        ("Via", "1.0 edge, 1.1 switchboard (x, y)"),
        ("Via", "HTTP/1.1 switchboard, 1.1 switchboard"),
    ]
    answer = send(recorder, way, [("X-Api-Key", credentials["key"]), *via], marker)
    assert answer.status == 508, answer
    assert json.loads(answer.body)["error"]["code"] == "proxy_loop"
    assert recorder.fields(marker) == []
