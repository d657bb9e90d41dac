"""The REST routes of the gateway, served by the real iptv and auth workers over RPC."""

from __future__ import annotations

import datetime as dt
import uuid

import httpx
import pytest

from tests.helpers import issue_api_key
from tests.webapi.conftest import Stack


async def test_channels_are_paginated(http: httpx.AsyncClient) -> None:
    first = (await http.get("/api/v1/channels", params={"page_size": 10})).json()
    second = (await http.get("/api/v1/channels", params={"page_size": 10, "page": 2})).json()
    assert first["total"] >= 200  # a few hundred seeded channels
    assert (first["page"], first["page_size"], len(first["items"])) == (1, 10, 10)
    assert {c["id"] for c in first["items"]}.isdisjoint({c["id"] for c in second["items"]})
    channel = first["items"][0]
    assert {"id", "name", "number", "category", "logo_url", "stream_url"} <= channel.keys()


async def test_channels_filter_by_category(http: httpx.AsyncClient) -> None:
    categories = (await http.get("/api/v1/categories")).json()
    assert categories
    name = categories[0]["name"] if isinstance(categories[0], dict) else categories[0]
    body = (await http.get("/api/v1/channels", params={"category": name, "page_size": 200})).json()
    assert body["total"] >= 1
    assert all(c["category"] == name for c in body["items"])


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"page": "abc"}, 422),
        ({"page_size": "many"}, 422),
        ({"page": 0}, 400),
        ({"page_size": 0}, 400),
        ({"page": "99999999999999999999999"}, 400),  # past int64: not a Redis error (502)
        ({"page": "9223372036854775807"}, 400),
    ],
)
async def test_channel_query_errors(
    http: httpx.AsyncClient, params: dict[str, object], status: int
) -> None:
    response = await http.get("/api/v1/channels", params=params)
    assert response.status_code == status
    assert response.json()["error"]["code"]


async def test_get_channel(http: httpx.AsyncClient) -> None:
    listed = (await http.get("/api/v1/channels", params={"page_size": 1})).json()["items"][0]
    response = await http.get(f"/api/v1/channels/{listed['id']}")
    assert response.status_code == 200
    assert response.json() == listed
    assert (await http.get("/api/v1/channels/99999999")).status_code == 404
    assert (await http.get("/api/v1/channels/abc")).status_code == 422


async def test_epg_by_time_range(http: httpx.AsyncClient) -> None:
    channel_id = (await http.get("/api/v1/channels", params={"page_size": 1})).json()["items"][0][
        "id"
    ]
    start = dt.datetime.now(dt.UTC).replace(microsecond=0)
    end = start + dt.timedelta(hours=6)
    response = await http.get(
        f"/api/v1/channels/{channel_id}/epg",
        params={"from": start.isoformat(), "to": end.isoformat()},
    )
    assert response.status_code == 200
    programmes = response.json()["programmes"]
    assert programmes
    for p in programmes:  # every programme overlaps the asked range
        assert dt.datetime.fromisoformat(p["start"]) < end
        assert dt.datetime.fromisoformat(p["end"]) > start
    starts = [p["start"] for p in programmes]
    assert starts == sorted(starts)


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"from": "yesterday-ish"}, 422),
        ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, 400),
        ({"from": "0001-01-01T00:00:00Z"}, 400),  # not an OverflowError (500)
    ],
)
async def test_epg_errors(http: httpx.AsyncClient, params: dict[str, str], status: int) -> None:
    channel_id = (await http.get("/api/v1/channels", params={"page_size": 1})).json()["items"][0][
        "id"
    ]
    response = await http.get(f"/api/v1/channels/{channel_id}/epg", params=params)
    assert response.status_code == status
    assert (await http.get("/api/v1/channels/99999999/epg")).status_code == 404


async def test_search_by_name(http: httpx.AsyncClient) -> None:
    some = (await http.get("/api/v1/channels", params={"page_size": 1})).json()["items"][0]
    fragment = some["name"].split()[0].lower()
    results = (await http.get("/api/v1/search", params={"q": fragment})).json()
    assert results
    assert all(fragment in c["name"].lower() for c in results)
    assert (await http.get("/api/v1/search")).status_code == 400


async def test_register_and_login(http: httpx.AsyncClient) -> None:
    username = f"user_{uuid.uuid4().hex[:8]}"
    credentials = {"username": username, "password": "correct horse battery"}
    created = await http.post("/api/v1/auth/register", json=credentials)
    assert created.status_code == 201
    assert created.json()["username"] == username
    assert "password" not in created.text
    again = await http.post("/api/v1/auth/register", json=credentials)
    assert again.status_code == 409
    login = await http.post("/api/v1/auth/login", json=credentials)
    assert login.status_code == 200
    token = login.json()["access_token"]
    assert token.count(".") == 2
    wrong = await http.post(
        "/api/v1/auth/login", json={**credentials, "password": "wrong password"}
    )
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{", 400),
        (b"[]", 400),
        (b"", 400),
        (b'{"username": "abc"}', 422),
        (b'{"username": "a", "password": "longenough"}', 400),
    ],
)
async def test_register_bad_input(http: httpx.AsyncClient, body: bytes, status: int) -> None:
    response = await http.post(
        "/api/v1/auth/register", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    assert response.json()["error"]["code"]


async def test_favourites_are_the_callers_own(http: httpx.AsyncClient, stack: Stack) -> None:
    # The REST routes take the user from the credential; over the generic RPC entry iptv
    # takes the caller the gateway attaches, and refuses one naming another user (but an
    # admin's), or anyone could name another.
    alice, bob = f"alice{uuid.uuid4().hex[:6]}", f"bob{uuid.uuid4().hex[:6]}"
    as_alice = {"X-Api-Key": issue_api_key(stack.redis_url, ["iptv"], user_id=alice)}
    as_bob = {"X-Api-Key": issue_api_key(stack.redis_url, ["iptv"], user_id=bob)}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as plain:
        await _favourites_of_their_own(plain, as_alice, as_bob, alice)
    # An admin (the `http` client's key) still reaches them over RPC.
    over_rpc = await http.post("/rpc/iptv/list_favourites", json={"user_id": alice})
    assert over_rpc.status_code == 200 and over_rpc.json() == {"result": []}


async def _favourites_of_their_own(
    http: httpx.AsyncClient, as_alice: dict[str, str], as_bob: dict[str, str], alice: str
) -> None:
    added = await http.put("/api/v1/favourites/3", headers=as_alice)
    assert added.status_code == 200 and added.json()["user_id"] == alice
    listed = await http.get("/api/v1/favourites", headers=as_alice)
    assert [c["id"] for c in listed.json()] == [3]
    assert (await http.get("/api/v1/favourites", headers=as_bob)).json() == []
    for method, kwargs in [("list_favourites", {"user_id": alice}),
                           ("remove_favourite", {"user_id": alice, "channel_id": 3})]:  # fmt: skip
        refused = await http.post(f"/rpc/iptv/{method}", json=kwargs, headers=as_bob)
        assert refused.status_code == 403
    over_rpc = await http.post("/rpc/iptv/list_favourites", json={"user_id": alice},
                               headers=as_alice)  # fmt: skip
    assert over_rpc.status_code == 200 and [c["id"] for c in over_rpc.json()["result"]] == [3]
    assert (await http.delete("/api/v1/favourites/3", headers=as_alice)).status_code == 200
    assert (await http.get("/api/v1/favourites", headers=as_alice)).json() == []


async def test_a_lone_surrogate_escape_is_malformed_json_a_pair_is_text(
    http: httpx.AsyncClient,
) -> None:
    json_body = {"content-type": "application/json"}
    # A pair ("\ud83d\ude00") is one character: registered and logged in with it.
    username = f"user_{uuid.uuid4().hex[:8]}"
    pair = rf'{{"username": "{username}", "password": "\ud83d\ude00 correct horse"}}'
    created = await http.post("/api/v1/auth/register", content=pair, headers=json_body)
    assert created.status_code == 201, created.text
    login = await http.post(
        "/api/v1/auth/login", json={"username": username, "password": "\U0001f600 correct horse"}
    )
    assert login.status_code == 200, login.text
    as_user = {"authorization": f"Bearer {login.json()['access_token']}"}
    # "\ud800" alone is no text (UTF-8 and msgpack cannot carry it): a 400 on every route
    # that reads a JSON body, public or not, before anything is called.
    register = r'{"username": "someone_new", "password": "\ud800xxxxxxxxx"}'
    routes = [
        ("POST", "/api/v1/auth/register", register, {}),
        ("POST", "/api/v1/auth/login", r'{"username": "alice", "password": "\uDFFFxxxxxxx"}', {}),
        ("POST", "/api/v1/auth/refresh", r'{"refresh_token": "\ud800"}', {}),
        ("POST", "/api/v1/auth/keys", r'{"name": "\ud800", "scopes": ["iptv"]}', as_user),
        ("POST", "/rpc/iptv/search", r'{"q": "\ud800"}', {}),
        ("PUT", f"/admin/users/{uuid.uuid4()}/scopes", r'{"scopes": ["\ud800"]}', {}),
        ("PUT", f"/admin/users/{uuid.uuid4()}/roles", r'{"roles": ["\ud800"]}', {}),
        ("POST", "/admin/revoke", r'{"kind": "session", "id": "\ud800"}', {}),
    ]
    for method, path, body, headers in routes:
        response = await http.request(method, path, content=body, headers={**json_body, **headers})
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == "malformed_json" and "lone surrogate" in error["message"]
