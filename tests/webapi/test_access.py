"""Access control at the gateway, through two real gateway processes sharing Redis.

Credentials (login, refresh, reuse, logout, API keys, key rotation), tampered
JWTs, the walk over the whole route table (401 without credentials, 403 with a
credential lacking scope), rate limits shared by both gateways, and the admin
policy API. Uses its own Redis database, so its policy and users touch no
other module.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
import redis

from common.tokens import AUDIENCE, ISSUER, SigningKey
from tests.helpers import ServiceProcess, db_url, free_port, issue_api_key, wait_for
from tests.support.raw_http import connect, read_answers
from tests.webapi.conftest import policy_version

pytestmark = pytest.mark.timeout(240)

ADMIN_NAME = "root"


@dataclass
class Gateways:
    urls: list[str]
    redis_url: str
    admin_password: str
    procs: list[ServiceProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.urls[0]

    def login(self, username: str, password: str) -> dict[str, Any]:
        r = httpx.post(f"{self.url}/api/v1/auth/login", json={"username": username,
                       "password": password}, timeout=10)  # fmt: skip
        assert r.status_code == 200, r.text
        return dict(r.json())

    def admin_token(self) -> str:
        return str(self.login(ADMIN_NAME, self.admin_password)["access_token"])

    def register(self) -> tuple[str, str]:
        name, password = f"u{uuid.uuid4().hex[:10]}", secrets.token_urlsafe(12)
        r = httpx.post(f"{self.url}/api/v1/auth/register",
                       json={"username": name, "password": password}, timeout=10)  # fmt: skip
        assert r.status_code == 201, r.text
        return name, password

    def put_policy(self, token: str, **document: Any) -> dict[str, Any]:
        r = httpx.put(f"{self.url}/admin/policy", json=document, headers=bearer(token), timeout=10)
        assert r.status_code == 200, r.text
        version = r.json()["version"]
        # Every gateway applies it (they report the version they apply).
        wait_for(lambda: all(policy_version(u) == version for u in self.urls), timeout=5)
        return dict(r.json())


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@pytest.fixture(scope="module")
def gateways(redis_url: str) -> Iterator[Gateways]:
    url = db_url(redis_url, 6)
    redis.Redis.from_url(url).flushdb()
    password = secrets.token_urlsafe(16)
    g = Gateways([], url, password)
    common = {"REDIS_URL": url, "RPC_TIMEOUT": "2"}
    try:
        for i in range(2):
            port = free_port()
            env = {**common, "WEBAPI_PORT": str(port)}
            g.procs.append(ServiceProcess(["python", "-m", "webapi"], env=env,
                                          name=f"gw{i}").start())  # fmt: skip
            g.urls.append(f"http://127.0.0.1:{port}")
        auth_env = {**common, "AUTH_ADMIN_USERNAME": ADMIN_NAME, "AUTH_ADMIN_PASSWORD": password}
        g.procs.append(ServiceProcess(["python", "-m", "microservices.auth"], env=auth_env,
                                      name="auth").start())  # fmt: skip
        g.procs.append(ServiceProcess(["python", "-m", "tests.support.calc_service"], env=common,
                                      name="calc").start())  # fmt: skip

        def ready() -> bool:
            services = httpx.get(f"{g.url}/health", timeout=2).json()["services"]
            return all(services.get(s, {}).get("live") for s in ("auth", "calc"))

        wait_for(ready, timeout=60)
        wait_for(lambda: all(httpx.get(f"{u}/health", timeout=2).status_code == 200
                             for u in g.urls), timeout=30)  # fmt: skip
        yield g
    except AssertionError:
        for proc in g.procs:
            print(f"--- {proc.name} ---\n{proc.log_tail()}")
        raise
    finally:
        for proc in g.procs:
            proc.stop()


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


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _signing_key(redis_url: str) -> SigningKey:
    client = redis.Redis.from_url(redis_url)
    from common.tokens import CURRENT_KID, SIGNING_KEYS

    kid = client.get(CURRENT_KID)
    assert kid is not None
    return SigningKey.from_json(kid, client.hget(SIGNING_KEYS, kid))  # type: ignore[arg-type]


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": "u1", "name": "mallory", "roles": ["admin"], "scope": "* admin",
              "sid": "s1", "iat": now, "exp": now + 600, "iss": ISSUER, "aud": AUDIENCE,
              "jti": uuid.uuid4().hex}  # fmt: skip
    return {**claims, **over}


def test_tampered_tokens_are_401(gateways: Gateways) -> None:
    key = _signing_key(gateways.redis_url)

    def signed(claims: dict[str, Any], secret: str = key.secret) -> str:
        return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": key.kid})

    good = signed(_claims())
    header, payload, signature = good.split(".")
    forged = {
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': key.kid})}.{payload}.",
        "wrong key": signed(_claims(), "x" * 48),
        "wrong audience": signed(_claims(aud="someone-else")),
        "wrong issuer": signed(_claims(iss="evil")),
        "expired": signed(_claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)),
        "malformed base64": f"{header}.{payload[:-3]}%%%.{signature}",
        "payload swapped": f"{header}.{_b64(_claims(sub='u2'))}.{signature}",
        "unknown kid": jwt.encode(
            _claims(), key.secret, algorithm="HS256", headers={"kid": "nosuchkid"}
        ),
        "garbage": "not-a-token",
    }
    # The genuine one passes (so the forgeries fail for their flaw, not for a typo here).
    assert httpx.get(f"{gateways.url}/admin/policy", headers=bearer(good)).status_code == 200
    for what, token in forged.items():
        r = httpx.get(f"{gateways.url}/admin/policy", headers=bearer(token))
        assert r.status_code == 401, (what, r.text)
        assert r.json()["error"]["code"] == "unauthorized", what
    assert httpx.get(f"{gateways.url}/admin/policy",
                     headers={"Authorization": "Basic abc"}).status_code == 401  # fmt: skip


# Credential header lines no token or API key is made of: bytes that are not UTF-8
# (Sanic reads them as surrogates), a UTF-8-encoded surrogate, a non-ASCII letter.
UNDECODABLE = [
    b"Authorization: Bearer \xff\xfe.abc.def",
    b"Authorization: Bearer eyJ\xed\xa0\x80",
    b"X-Api-Key: sbk_\xff",
    b"Authorization: Bearer sbk_\xc3\xa9",
    b"Authorization: Bearer eyJ\xc3\xa9",
]


def test_a_credential_of_undecodable_bytes_is_401(gateways: Gateways) -> None:
    # It was a 500 and an "unhandled error" traceback on every route for the surrogates:
    # PyJWT could not encode the token's text back to bytes.
    log = gateways.procs[0]
    errors = len(log.log_records("unhandled error"))
    paths = [("GET", "/health"), ("GET", "/admin/policy"), ("GET", "/svc/calc/x"),
             ("POST", "/rpc/calc/add"), ("POST", "/heartbeat"),
             ("GET", "/api/v1/categories")]  # fmt: skip
    for header, (method, path) in itertools.product(UNDECODABLE, paths):
        with connect(gateways.url) as sock:
            head = f"{method} {path} HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: 0\r\n"
            sock.sendall(head.encode() + header + b"\r\n\r\n")
            answer = read_answers(sock, 1)[0]
        error = json.loads(answer.body)["error"]
        assert (answer.status, error["code"]) == (401, "unauthorized"), (header, path)
    assert len(log.log_records("unhandled error")) == errors


def test_made_up_kids_do_not_hold_up_a_rotated_key(gateways: Gateways) -> None:
    # Forged tokens naming a kid each used to queue on the gateway's keyring reload, a
    # reload and a pause each: the N-th was answered after N seconds, and a genuine token
    # signed by a key rotated meanwhile after them. Now they share a reload.
    admin = gateways.admin_token()
    _, payload, signature = admin.split(".")

    def forged() -> dict[str, str]:
        head = _b64({"alg": "HS256", "typ": "JWT", "kid": uuid.uuid4().hex[:16]})
        return bearer(f"{head}.{payload}.{signature}")

    async def burst() -> tuple[list[httpx.Response], list[int]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=gateways.url, timeout=30, limits=limits) as c:
            made_up = [asyncio.create_task(c.get("/admin/policy", headers=forged()))
                       for _ in range(40)]  # fmt: skip
            rotated = await c.post("/admin/signing-keys/rotate", headers=bearer(admin))
            assert rotated.status_code == 200, rotated.text
            login = {"username": ADMIN_NAME, "password": gateways.admin_password}
            token = (await c.post("/api/v1/auth/login", json=login)).json()["access_token"]
            assert jwt.get_unverified_header(token)["kid"] == rotated.json()["kid"]
            genuine = [await c.get(f"{url}/admin/policy", headers=bearer(token))
                       for url in gateways.urls]  # fmt: skip
            return genuine, [r.status_code for r in await asyncio.gather(*made_up)]

    genuine, refused = asyncio.run(asyncio.wait_for(burst(), timeout=20))
    assert [r.status_code for r in genuine] == [200, 200], [r.text for r in genuine]
    assert refused == [401] * 40


def test_signing_key_rotation_logs_nobody_out(gateways: Gateways) -> None:
    admin = gateways.admin_token()
    name, password = gateways.register()
    before = gateways.login(name, password)["access_token"]
    rotated = httpx.post(f"{gateways.url}/admin/signing-keys/rotate", headers=bearer(admin))
    assert rotated.status_code == 200, rotated.text
    after = gateways.login(name, password)["access_token"]
    assert jwt.get_unverified_header(after)["kid"] == rotated.json()["kid"]
    assert jwt.get_unverified_header(before)["kid"] != rotated.json()["kid"]
    for url in gateways.urls:  # a new kid is fetched on first sight; the old one still verifies
        for token in (before, after):
            r = httpx.post(f"{url}/rpc/calc/add", json={"a": 2}, headers=bearer(token))
            assert r.status_code == 200, r.text


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


# -- the admin policy API --------------------------------------------------------


def test_policy_admin_api_validates_versions_and_audits(gateways: Gateways) -> None:
    admin = bearer(gateways.admin_token())
    url = f"{gateways.url}/admin/policy"
    current = httpx.get(url, headers=admin).json()
    bad = {"services": {"calc": {"strategy": "fastest", "version_weights": {"v1": -1}}},
           "surprise": 1}  # fmt: skip
    refused = httpx.put(url, json=bad, headers=admin)
    assert refused.status_code == 422
    details = refused.json()["error"]["details"]
    assert {d["loc"] for d in details} >= {"services.calc.strategy", "surprise"}
    assert httpx.get(url, headers=admin).json() == current  # nothing changed
    checked = httpx.post(f"{url}/validate", json=bad, headers=admin)
    assert checked.status_code == 422
    assert httpx.put(url, content=b"{nope", headers=admin).status_code == 400

    stale = {**current, "services": {"calc": {"strategy": "random"}}}
    changed = httpx.put(url, json=stale, headers={**admin, "If-Match": str(current["version"])})
    assert changed.status_code == 200 and changed.json()["version"] == current["version"] + 1
    conflict = httpx.put(url, json=stale, headers={**admin, "If-Match": str(current["version"])})
    assert conflict.status_code == 409
    history = httpx.get(f"{url}/history", headers=admin).json()["changes"]
    assert history[0]["version"] == current["version"] + 1
    assert ADMIN_NAME in history[0]["actor"]
    assert "services.calc" in " ".join(history[0]["changes"])
    old = httpx.get(f"{url}/versions/{current['version']}", headers=admin)
    assert old.status_code == 200 and old.json()["services"] == current["services"]


def test_policy_admin_api_reads_integers_strictly(gateways: Gateways) -> None:
    admin = bearer(gateways.admin_token())
    url = f"{gateways.url}/admin/policy"
    current = httpx.get(url, headers=admin).json()
    for limit in ("0", "1001", "-1"):
        refused = httpx.get(f"{url}/history", params={"limit": limit}, headers=admin)
        assert refused.status_code == 422, (limit, refused.text)
        assert refused.json()["error"]["message"] == "limit must be between 1 and 1000"
    version = str(current["version"])
    # "1_0" is 10 to int(), and Arabic-Indic or fullwidth digits are digits to it.
    for text in ("1_0", "\u0661", "\uff11", version.translate(str.maketrans("0123456789",
                 "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669"))):  # fmt: skip
        by_query = httpx.put(url, params={"expected_version": text}, json=current, headers=admin)
        by_header = httpx.put(url, json=current, headers={**admin, "If-Match": text.encode()})
        for refused, name in ((by_query, "expected_version"), (by_header, "If-Match")):
            assert refused.status_code == 422, (text, refused.text)
            error = refused.json()["error"]
            assert error["code"] == "invalid_params"
            assert error["message"].startswith(f"{name} must be an integer")
    assert httpx.get(url, headers=admin).json() == current  # nothing written
    quoted = httpx.put(url, json=current, headers={**admin, "If-Match": f'"{version}"'})
    assert quoted.status_code == 200, quoted.text


def test_an_api_key_lifetime_is_not_a_boolean(gateways: Gateways) -> None:
    name, password = gateways.register()
    session = bearer(gateways.login(name, password)["access_token"])
    keys = f"{gateways.url}/api/v1/auth/keys"
    refused = httpx.post(keys, json={"scopes": ["calc.add"], "expires_in": True}, headers=session)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "invalid_params"
    assert httpx.get(keys, headers=session).json()["keys"] == []


def test_a_limit_the_rate_limiter_cannot_keep_is_refused_and_never_applied(
    gateways: Gateways,
) -> None:
    """burst * period / rate past the limiter's window (~35 years): validate and put
    answer 422 naming the limit; the same document written straight into Redis (as
    before the rule existed) is refused by every gateway, which keeps serving."""
    admin = bearer(gateways.admin_token())
    url = f"{gateways.url}/admin/policy"
    rule = {"id": "daily", "service": "*", "rate": 1, "period": 86400, "burst": 1_000_000}
    for answer in (httpx.post(f"{url}/validate", json={"limits": [rule]}, headers=admin),
                   httpx.put(url, json={"limits": [rule]}, headers=admin)):  # fmt: skip
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["code"] == "policy_invalid"
        assert error["details"][0]["loc"] == "limits[0]"
        assert "limit 'daily': burst * period / rate" in error["details"][0]["msg"]

    good = gateways.put_policy(admin["Authorization"][7:], limits=[])
    raw = {**good, "version": good["version"] + 1,
           "limits": [{**rule, "method": "*", "key": "credential"}]}  # fmt: skip
    r = redis.Redis.from_url(gateways.redis_url)
    r.set("sb:{policy}:doc", json.dumps(raw))
    r.set("sb:{policy}:version", good["version"] + 1)
    r.publish("sb:{policy}:changed", good["version"] + 1)

    def refused(proc: ServiceProcess) -> bool:
        return '"msg": "stored policy is invalid' in proc.log_path.read_text(errors="replace")

    wait_for(lambda: all(refused(proc) for proc in gateways.procs[:2]), timeout=5)
    for gateway in gateways.urls:
        assert policy_version(gateway) == good["version"]  # the last good one
        added = httpx.post(f"{gateway}/rpc/calc/add", json={"a": 1, "b": 2}, headers=admin)
        assert added.status_code == 200, added.text
    gateways.put_policy(admin["Authorization"][7:], limits=[])  # the admin API still works


# -- live policy under load ----------------------------------------------------------


def test_weight_change_applies_on_both_gateways_under_load(gateways: Gateways) -> None:
    """v1 takes all traffic, then the admin moves it to v2: both gateways follow
    within a second, and no request fails meanwhile."""
    admin = gateways.admin_token()
    service = f"canary{uuid.uuid4().hex[:6]}"
    registrar = issue_api_key(gateways.redis_url, ["registry"], user_id="backends")
    backends = []
    for version in ("v1", "v2"):
        env = {"PORT": str(free_port()), "NAME": f"{service}-{version}", "SERVICE": service,
               "VERSION": version, "GATEWAY": gateways.url,
               "GATEWAY_API_KEY": registrar}  # fmt: skip
        backends.append(ServiceProcess(["python", "-m", "tests.support.http_backend"], env=env,
                                       name=env["NAME"]).start())  # fmt: skip
    try:
        gateways.put_policy(admin, services={service: {"version_weights": {"v1": 100, "v2": 0}}})

        def routable(url: str) -> bool:
            r = httpx.get(f"{url}/svc/{service}/echo", headers=bearer(admin), timeout=5)
            return r.status_code == 200

        wait_for(lambda: all(routable(u) for u in gateways.urls), timeout=30)
        seen = asyncio.run(_load_while_switching(gateways, service, admin))
    finally:
        for proc in backends:
            proc.stop()
    failed = [s for *_rest, s in seen if s != 200]
    assert failed == []
    for url in gateways.urls:
        mine = [(t, instance) for u, t, instance, _s in seen if u == url]
        assert mine[0][1] == f"{service}-v1"  # before the change
        last_v1 = max(t for t, instance in mine if instance == f"{service}-v1")
        after = [instance for t, instance in mine if t > last_v1]
        assert len(after) > 20 and set(after) == {f"{service}-v2"}
        print(f"{url}: last v1 answer {last_v1:.3f} s after the change was accepted")
        assert last_v1 < 1.0  # applied within a second of the admin API's answer


async def _load_while_switching(
    gateways: Gateways, service: str, admin: str
) -> list[tuple[str, float, str, int]]:
    """(gateway, seconds since the change, instance, status) of every request."""
    seen: list[tuple[str, float, str, int]] = []
    changed_at: list[float] = []
    stop = asyncio.Event()

    async def load(client: httpx.AsyncClient, url: str) -> None:
        while not stop.is_set():
            r = await client.get(f"{url}/svc/{service}/echo")
            since = time.monotonic() - changed_at[0] if changed_at else -1.0
            instance = r.json().get("instance", "?") if r.status_code == 200 else "?"
            seen.append((url, since, instance, r.status_code))

    async with httpx.AsyncClient(timeout=10, headers=bearer(admin)) as client:
        workers = [asyncio.create_task(load(client, url))
                   for url in gateways.urls for _ in range(4)]  # fmt: skip
        await asyncio.sleep(0.5)
        document = {"services": {service: {"version_weights": {"v1": 0, "v2": 100}}}}
        current = (await client.get(f"{gateways.url}/admin/policy")).json()
        r = await client.put(f"{gateways.url}/admin/policy", json={**current, **document})
        assert r.status_code == 200, r.text
        changed_at.append(time.monotonic())
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*workers)
    return seen
