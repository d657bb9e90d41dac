"""Tokens at the gateway, through two real gateway processes sharing Redis
(`access_fixtures`): tampered JWTs, credentials of undecodable bytes, made-up key
ids, and signing-key rotation.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest
import redis

from common.tokens import AUDIENCE, ISSUER, SigningKey
from tests.support.raw_http import exchange
from tests.webapi.access_fixtures import (  # noqa: F401 (the `gateways` fixture)
    ADMIN_NAME,
    Gateways,
    bearer,
    gateways_fixture,
)

pytestmark = pytest.mark.timeout(240)


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
        head = f"{method} {path} HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: 0\r\n"
        answer = exchange(gateways.url, head.encode() + header + b"\r\n\r\n")
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
