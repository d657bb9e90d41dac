"""Who may send `POST /heartbeat`, and what it may touch: only a `registry` (or
`admin`) credential, never the `*` every user signing up gets; and never an RPC
worker's registration or a service RPC workers serve (409 `conflict`, nothing changed)."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
import redis.asyncio as aioredis

from common import constants
from common.instance_record import InstanceRecord
from common.registry import Registry, new_instance_id
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


async def _worker(redis_url: str, service: str) -> InstanceRecord:
    """An RPC worker's registration as `Service` writes it, and its direct-call stream."""
    record = InstanceRecord(service, new_instance_id(service))
    client = aioredis.Redis.from_url(redis_url)
    try:
        await Registry(client).heartbeat(record)
        await client.xadd(constants.direct_stream(service, record.instance_id), {"c": "1"})
    finally:
        await client.aclose()
    return record


async def _stored(redis_url: str, record: InstanceRecord) -> tuple[bytes | None, int, bool]:
    """The worker's stored record, whether its direct stream exists, whether it is live."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        raw = await client.hget(constants.instance_record_key(record.service), record.instance_id)
        stream = await client.exists(constants.direct_stream(record.service, record.instance_id))
        live = record.instance_id in await Registry(client).live_ids(record.service)
    finally:
        await client.aclose()
    return raw, stream, live


def test_a_heartbeat_cannot_replace_or_remove_an_rpc_workers_registration(
    gateway: str, redis_url: str
) -> None:
    service = f"svc{uuid.uuid4().hex[:6]}"
    worker = asyncio.run(_worker(redis_url, service))
    before = asyncio.run(_stored(redis_url, worker))
    assert before[1:] == (1, True)
    registrar = {"X-Api-Key": issue_api_key(redis_url, ["registry"], name="backends")}
    beat = {"service": service, "address": "192.0.2.1:9", "instance_id": worker.instance_id}
    for body in (beat, {**beat, "leaving": True}):
        refused = _beat(gateway, registrar, **body)
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "conflict"
        assert error["message"] == (
            f"instance {worker.instance_id!r} of {service!r} is an RPC worker's:"
            " a heartbeat cannot replace or remove it"
        )
        assert asyncio.run(_stored(redis_url, worker)) == before  # kind rpc, stream, lease
    # Another id in the same (uncataloged) service is an HTTP backend's to register.
    other = _beat(gateway, registrar, service=service, address="192.0.2.1:9")
    assert other.status_code == 200, other.text


def test_an_http_backend_cannot_join_an_rpc_service(gateway: str, redis_url: str) -> None:
    service = f"svc{uuid.uuid4().hex[:6]}"

    async def publish() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            await Registry(client).publish_catalog(service, {"run": {}})
        finally:
            await client.aclose()

    asyncio.run(publish())
    registrar = {"X-Api-Key": issue_api_key(redis_url, ["registry"], name="backends")}
    for body in ({"service": service, "address": "192.0.2.1:9"},
                 {"params": {"data": [{"servicename": f"{service}_v2",
                                       "addrip": "192.0.2.1:9"}]}}):  # fmt: skip
        refused = _beat(gateway, registrar, **body)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == {
            "code": "conflict",
            "message": f"service {service!r} is an RPC service: an HTTP backend cannot join it",
        }
    assert _registered(redis_url, service) == []
