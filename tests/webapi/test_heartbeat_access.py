"""Who may send `POST /heartbeat`: only a `registry` (or `admin`) credential, never the
`*` every user signing up gets."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
import redis.asyncio as aioredis

from common import constants
from tests.helpers import issue_api_key, issue_user_token

pytestmark = pytest.mark.timeout(30)


def _registered(redis_url: str, service: str) -> list[str]:
    """The ids holding a lease of `service`, live or not (a lease outlives its end until
    pruned, 30 s later; only a removal ends it at once)."""

    async def read() -> list[str]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return [i.decode() for i in await client.zrange(constants.leases_key(service), 0, -1)]
        finally:
            await client.aclose()

    return sorted(asyncio.run(read()))


def _beat(base: str, headers: dict[str, str], **body: object) -> httpx.Response:
    return httpx.post(f"{base}/heartbeat", json=body, headers=headers, timeout=5)


def test_a_users_star_scope_cannot_register_or_remove_backends(
    gateway: str, redis_url: str
) -> None:
    # `*` is what AUTH_DEFAULT_SCOPES gives anyone signing up on the public register route.
    service = f"svc{uuid.uuid4().hex[:6]}"
    legit = {"service": service, "address": "10.0.0.5:8080"}
    registrar = {"X-Api-Key": issue_api_key(redis_url, ["registry"], name="backends")}
    assert _beat(gateway, registrar, **legit).status_code == 200
    token = issue_user_token(redis_url, uuid.uuid4().hex, "mallory")
    for headers in ({"Authorization": f"Bearer {token}"},
                    {"X-Api-Key": issue_api_key(redis_url, ["*"], name="star")}):  # fmt: skip
        removed = _beat(gateway, headers, **legit, leaving=True)
        added = _beat(gateway, headers, service=service, address="10.6.6.6:80", weight=1000)
        for refused in (removed, added):
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"]["code"] == "forbidden"
    assert _registered(redis_url, service) == [f"{service}@10.0.0.5:8080"]
    # Nor does `*` reach anything else named `registry` (the generic RPC entry).
    star = {"X-Api-Key": issue_api_key(redis_url, ["*"], name="star")}
    refused = httpx.post(f"{gateway}/rpc/registry/heartbeat", json={}, headers=star, timeout=5)
    assert refused.status_code == 403, refused.text


def test_the_registry_scope_or_admin_may_send_heartbeats(gateway: str, redis_url: str) -> None:
    service = f"svc{uuid.uuid4().hex[:6]}"
    for scopes in (["registry"], ["admin"], ["iptv", "registry"]):
        headers = {"X-Api-Key": issue_api_key(redis_url, scopes)}
        beat = _beat(gateway, headers, service=service, address="10.0.0.7:80")
        assert beat.status_code == 200, (scopes, beat.text)
