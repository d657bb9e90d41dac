"""Access control at the gateway, through two real gateway processes sharing Redis
(`access_fixtures`): the walk over the whole route table (401 without credentials,
403 with a credential lacking scope), login, refresh, reuse and logout, API keys,
roles and scopes, and rate limits shared by both gateways. Tokens are in
`test_access_tokens.py`, the admin policy API in `test_access_policy.py`.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import httpx
import pytest
import redis

from tests.helpers import issue_api_key, wait_for
from tests.webapi.access_fixtures import (  # noqa: F401 (the `gateways` fixture)
    ADMIN_NAME,
    Gateways,
    bearer,
    gateways_fixture,
)

pytestmark = pytest.mark.timeout(240)


# -- the route-table walk ------------------------------------------------------

PATH_VALUES = {"service": "calc", "method": "add", "path": "walk/x", "channel_id": "1",
               "key_id": "abc", "user_id": "u1", "version": "1", "username": "walker"}  # fmt: skip
BODY = {"service_name": "calc", "server_name": "calc"}


def _routes() -> list[tuple[str, str, Any]]:
    """(method, concrete path, access) for every route of the gateway's route table."""
    from webapi.app import create_app

    app = create_app(name=f"walk{uuid.uuid4().hex[:6]}")
    app.router.finalize()
    found = []
    for route in app.router.routes:
        path = "/" + re.sub(r"<(\w+)(?::[^>]*)?>", lambda m: PATH_VALUES[m.group(1)], route.path)
        for method in sorted(route.methods):
            found.append((method, path, getattr(route.ctx, "access", None)))
    return found


def test_every_route_declares_its_access() -> None:
    routes = _routes()
    assert len(routes) > 30
    undeclared = [(m, p) for m, p, access in routes if access is None]
    assert undeclared == []
    public = sorted({p for _m, p, access in routes if access.public and not access.in_handler})
    assert public == ["/api/v1/auth/login", "/api/v1/auth/refresh", "/api/v1/auth/register",
                      "/health"]  # fmt: skip


def test_route_walk_401_without_credentials_403_without_scope(gateways: Gateways) -> None:
    token = gateways.admin_token()
    # The catch-all serves the policy's routes: give it one to walk through.
    gateways.put_policy(token, routes=[{"prefix": "/walk/", "service": "calc"}])
    scopeless = issue_api_key(gateways.redis_url, ["nothing"], user_id="walker")
    checked = 0
    with httpx.Client(timeout=10) as client:
        for method, path, access in _routes():
            url = gateways.url + path
            anonymous = client.request(method, url, json=BODY)
            keyed = client.request(method, url, json=BODY, headers=bearer(scopeless))
            where = f"{method} {path}"
            if access.public and not access.in_handler:
                assert anonymous.status_code not in (401, 403), where
                continue
            assert anonymous.status_code == 401, (where, anonymous.text)
            if access.own:  # the caller's own account: any credential, whatever its scopes
                assert keyed.status_code != 401, (where, keyed.text)
                assert "scopes do not include" not in keyed.text, where  # (a key may not log out)
                continue
            assert keyed.status_code == 403, (where, keyed.text)
            if method != "HEAD":
                assert anonymous.json()["error"]["code"] == "unauthorized", where
                assert keyed.json()["error"]["code"] == "forbidden", where
            assert anonymous.headers["www-authenticate"].startswith("Bearer"), where
            checked += 1
    assert checked > 30


# -- users, sessions, tokens ---------------------------------------------------


def test_login_refresh_reuse_and_logout(gateways: Gateways) -> None:
    name, password = gateways.register()
    first = gateways.login(name, password)
    assert set(first) >= {"access_token", "refresh_token", "expires_in", "token_type"}
    for url in gateways.urls:  # both gateways verify locally
        r = httpx.post(f"{url}/rpc/calc/add", json={"a": 1, "b": 2}, headers=bearer(
            first["access_token"]))  # fmt: skip
        assert r.json() == {"result": 3}
    me = httpx.get(f"{gateways.url}/api/v1/auth/me", headers=bearer(first["access_token"]))
    assert me.json()["username"] == name and me.json()["roles"] == ["user"]
    assert httpx.get(f"{gateways.url}/admin/policy",
                     headers=bearer(first["access_token"])).status_code == 403  # fmt: skip

    refresh = f"{gateways.url}/api/v1/auth/refresh"
    second = httpx.post(refresh, json={"refresh_token": first["refresh_token"]}).json()
    assert second["refresh_token"] != first["refresh_token"]
    # The first refresh token, used again: the whole session is revoked.
    reused = httpx.post(refresh, json={"refresh_token": first["refresh_token"]})
    assert reused.status_code == 401
    assert httpx.post(refresh, json={"refresh_token": second["refresh_token"]}).status_code == 401
    for url in gateways.urls:
        wait_for(lambda u=url: httpx.get(f"{u}/api/v1/auth/me", headers=bearer(
            second["access_token"])).status_code == 401, timeout=5)  # fmt: skip

    third = gateways.login(name, password)
    out = httpx.post(f"{gateways.url}/api/v1/auth/logout", headers=bearer(third["access_token"]))
    assert out.status_code == 200
    for url in gateways.urls:
        wait_for(lambda u=url: httpx.get(f"{u}/api/v1/auth/me", headers=bearer(
            third["access_token"])).status_code == 401, timeout=5)  # fmt: skip
    again = httpx.post(refresh, json={"refresh_token": third["refresh_token"]})
    assert again.status_code == 401


# -- API keys ------------------------------------------------------------------


def test_api_keys_are_scoped_shown_once_and_revocable(gateways: Gateways) -> None:
    name, password = gateways.register()
    session = bearer(gateways.login(name, password)["access_token"])
    keys = f"{gateways.url}/api/v1/auth/keys"
    created = httpx.post(keys, json={"name": "adder", "scopes": ["calc.add"]}, headers=session)
    assert created.status_code == 201, created.text
    api_key, key_id = created.json()["api_key"], created.json()["key_id"]
    listed = httpx.get(keys, headers=session).json()["keys"]
    assert [k["key_id"] for k in listed] == [key_id]
    assert "api_key" not in listed[0] and api_key not in json.dumps(listed)
    stored = redis.Redis.from_url(gateways.redis_url).hgetall(f"sb:{{auth}}:apikey:{key_id}")
    assert api_key.encode() not in b"".join(stored.values())  # only a hash is kept

    add = f"{gateways.url}/rpc/calc/add"
    assert httpx.post(add, json={"a": 1}, headers={"X-Api-Key": api_key}).json() == {"result": 2}
    assert httpx.post(add, json={"a": 1}, headers=bearer(api_key)).status_code == 200
    other = httpx.post(f"{gateways.url}/rpc/calc/echo", json={}, headers=bearer(api_key))
    assert other.status_code == 403
    # Keys cannot mint keys, and a user cannot give a key more than they have.
    assert httpx.post(keys, json={"name": "x", "scopes": ["calc.add"]},
                      headers=bearer(api_key)).status_code == 403  # fmt: skip
    assert httpx.post(keys, json={"name": "x", "scopes": ["admin"]},
                      headers=session).status_code == 403  # fmt: skip
    bad = httpx.post(keys, json={"name": "x", "scopes": ["no spaces allowed"]}, headers=session)
    assert bad.status_code in (400, 422) and bad.json()["error"]["code"]

    deleted = httpx.delete(f"{keys}/{key_id}", headers=session)
    assert deleted.status_code == 200
    for url in gateways.urls:  # pushed to every gateway's cache at once
        wait_for(lambda u=url: httpx.post(f"{u}/rpc/calc/add", json={"a": 1},
                 headers=bearer(api_key)).status_code == 401, timeout=5)  # fmt: skip


def test_internal_auth_methods_are_admin_only_over_rpc(gateways: Gateways) -> None:
    name, password = gateways.register()
    user = gateways.login(name, password)
    me = httpx.get(f"{gateways.url}/api/v1/auth/me", headers=bearer(user["access_token"])).json()
    escalate = httpx.post(f"{gateways.url}/rpc/auth/set_roles",
                          json={"user_id": me["user_id"], "roles": ["admin"]},
                          headers=bearer(user["access_token"]))  # fmt: skip
    assert escalate.status_code == 403


def test_the_last_admin_cannot_demote_itself(gateways: Gateways) -> None:
    admin = bearer(gateways.admin_token())
    me = httpx.get(f"{gateways.url}/api/v1/auth/me", headers=admin).json()
    users = f"{gateways.url}/admin/users"
    assert [u["username"] for u in httpx.get(users, headers=admin).json()["users"]
            if "admin" in u["roles"]] == [ADMIN_NAME]  # fmt: skip
    refused = httpx.put(f"{users}/{me['user_id']}/roles", json={"roles": ["user"]},
                        headers=admin)  # fmt: skip
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "conflict"
    assert "last admin" in refused.json()["error"]["message"]
    assert httpx.get(users, headers=admin).status_code == 200  # still an admin, still in

    name, _ = gateways.register()
    other = next(u for u in httpx.get(users, headers=admin).json()["users"]
                 if u["username"] == name)  # fmt: skip
    roles = f"{users}/{other['user_id']}/roles"
    assert httpx.put(roles, json={"roles": ["user", "admin"]}, headers=admin).status_code == 200
    demoted = httpx.put(roles, json={"roles": ["user"]}, headers=admin)  # not the last one
    assert demoted.status_code == 200 and demoted.json()["roles"] == ["user"]


def test_a_user_whose_scopes_were_narrowed_can_still_read_itself_and_log_out(
    gateways: Gateways,
) -> None:
    name, password = gateways.register()
    user = gateways.login(name, password)
    me = httpx.get(f"{gateways.url}/api/v1/auth/me", headers=bearer(user["access_token"])).json()
    admin = bearer(gateways.admin_token())
    narrowed = httpx.put(f"{gateways.url}/admin/users/{me['user_id']}/scopes",
                         json={"scopes": ["calc"]}, headers=admin)  # fmt: skip
    assert narrowed.status_code == 200
    session = wait_for(lambda: gateways.login(name, password), timeout=10)
    headers = bearer(session["access_token"])
    assert httpx.get(f"{gateways.url}/api/v1/channels", headers=headers).status_code == 403
    mine = httpx.get(f"{gateways.url}/api/v1/auth/me", headers=headers)
    assert mine.status_code == 200 and mine.json()["credential"]["scopes"] == ["calc"]
    assert httpx.post(f"{gateways.url}/api/v1/auth/logout", headers=headers).status_code == 200
    refreshed = httpx.post(f"{gateways.url}/api/v1/auth/refresh",
                           json={"refresh_token": session["refresh_token"]})  # fmt: skip
    assert refreshed.status_code == 401  # the session it ended is over


# -- rate limits ---------------------------------------------------------------


def test_rate_limit_is_exact_across_two_gateways(gateways: Gateways) -> None:
    admin = gateways.admin_token()
    limits = [{"id": "adds", "service": "calc", "method": "add", "key": "credential",
               "rate": 1, "period": 60, "burst": 5},
              {"id": "who-ip", "service": "calc", "method": "whoami", "key": "ip",
               "rate": 1, "period": 60, "burst": 3}]  # fmt: skip
    gateways.put_policy(admin, limits=limits)
    key = issue_api_key(gateways.redis_url, ["calc"], user_id=f"rl{uuid.uuid4().hex[:6]}")
    answers = []
    for i in range(8):  # alternate between the two gateways
        url = gateways.urls[i % 2]
        answers.append(httpx.post(f"{url}/rpc/calc/add", json={"a": i}, headers=bearer(key)))
    statuses = [r.status_code for r in answers]
    assert statuses == [200] * 5 + [429] * 3
    assert [int(r.headers["ratelimit-remaining"]) for r in answers[:5]] == [4, 3, 2, 1, 0]
    assert all(r.headers["ratelimit-limit"] == "5" for r in answers)
    refused = answers[5]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 50 <= int(refused.headers["retry-after"]) <= 60  # one more request per 60 s
    # Another credential has its own allowance.
    other = issue_api_key(gateways.redis_url, ["calc"], user_id=f"rl{uuid.uuid4().hex[:6]}")
    assert httpx.post(f"{gateways.url}/rpc/calc/add", json={"a": 1},
                      headers=bearer(other)).status_code == 200  # fmt: skip

    # Keyed by IP: a spoofed X-Forwarded-For (no trusted proxy configured) changes nothing.
    by_ip = []
    for i in range(5):
        spoof = {**bearer(key), "X-Forwarded-For": f"203.0.113.{i}"}
        r = httpx.post(f"{gateways.urls[i % 2]}/rpc/calc/whoami", json={}, headers=spoof)
        by_ip.append(r.status_code)
    assert by_ip == [200] * 3 + [429] * 2


def test_login_is_rate_limited_per_ip_by_default(gateways: Gateways) -> None:
    admin = gateways.admin_token()
    rule = {"id": "login", "service": "auth", "method": "login", "key": "ip",
            "rate": 1, "period": 60, "burst": 2}  # fmt: skip
    gateways.put_policy(admin, limits=[rule])
    attempts = [httpx.post(f"{gateways.url}/api/v1/auth/login",
                           json={"username": "nobody", "password": "wrong-password"})
                for _ in range(3)]  # fmt: skip
    assert [r.status_code for r in attempts] == [401, 401, 429]
    gateways.put_policy(admin, limits=[])


def test_an_api_key_lifetime_is_not_a_boolean(gateways: Gateways) -> None:
    name, password = gateways.register()
    session = bearer(gateways.login(name, password)["access_token"])
    keys = f"{gateways.url}/api/v1/auth/keys"
    refused = httpx.post(keys, json={"scopes": ["calc.add"], "expires_in": True}, headers=session)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "invalid_params"
    assert httpx.get(keys, headers=session).json()["keys"] == []
