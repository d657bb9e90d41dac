"""`POST /heartbeat`: both forms register instances; bad bodies are a precise 4xx."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from common.registry import InstanceRecord, Registry
from tests.helpers import wait_for
from tests.webapi.conftest import as_admin


def _live(base: str, service: str) -> list[str]:
    body = as_admin.get(f"{base}/health", timeout=5).json()
    return list(body["services"].get(service, {}).get("instances", []))


def _records(redis_url: str, service: str) -> dict[str, InstanceRecord]:
    """The service's live records as stored in Redis, by instance id."""

    async def read() -> list[InstanceRecord]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await Registry(client).live_instances(service)
        finally:
            await client.aclose()

    return {r.instance_id: r for r in asyncio.run(read())}


def test_original_dispatcher_form(gateway: str, redis_url: str) -> None:
    name = f"nlp{uuid.uuid4().hex[:6]}"
    body = {"params": {"data": [
        {"servicename": f"{name}_v2", "addrip": "127.0.0.1:9001"},
        {"servicename": name, "addrip": "127.0.0.1:9002"},
        {"servicename": f"{name}_v1", "addrip": "127.0.0.1:9001"},  # two tags, one address
    ]}}  # fmt: skip
    response = as_admin.post(f"{gateway}/heartbeat", json=body)
    assert response.status_code == 200
    ids = [f"{name}_v2@127.0.0.1:9001", f"{name}@127.0.0.1:9002", f"{name}_v1@127.0.0.1:9001"]
    assert response.json()["registered"] == ids
    assert sorted(_live(gateway, name)) == sorted(ids)
    records = _records(redis_url, name)
    assert {i: (r.service, r.version, r.address) for i, r in records.items()} == {
        ids[0]: (name, "v2", "127.0.0.1:9001"),
        ids[1]: (name, "0", "127.0.0.1:9002"),
        ids[2]: (name, "v1", "127.0.0.1:9001"),
    }


def test_native_form_and_expiry_within_the_ttl(gateway: str, redis_url: str) -> None:
    name = f"svc{uuid.uuid4().hex[:6]}"
    body = {"service": name, "address": "127.0.0.1:9100", "version": "v3", "weight": 5,
            "kind": "ws", "zone": "eu-1", "health_path": "/healthz",
            "metadata": {"gpu": "a100"}}  # fmt: skip
    response = as_admin.post(f"{gateway}/heartbeat", json=body)
    assert response.status_code == 200
    assert _live(gateway, name) == [f"{name}@127.0.0.1:9100"]
    record = _records(redis_url, name)[f"{name}@127.0.0.1:9100"]
    stored = (record.kind, record.version, record.weight, record.zone, record.health_path,
              record.metadata)  # fmt: skip
    assert stored == ("ws", "v3", 5, "eu-1", "/healthz", {"gpu": "a100"})
    # No more heartbeats: gone once the 1.5 s lease ends.
    wait_for(lambda: _live(gateway, name) == [], timeout=5)


def test_leaving_deregisters_at_once(gateway: str) -> None:
    name = f"svc{uuid.uuid4().hex[:6]}"
    body = {"service": name, "address": "127.0.0.1:9200"}
    as_admin.post(f"{gateway}/heartbeat", json=body)
    assert _live(gateway, name) == [f"{name}@127.0.0.1:9200"]
    gone = as_admin.post(f"{gateway}/heartbeat", json={**body, "leaving": True})
    assert gone.json() == {"deregistered": [f"{name}@127.0.0.1:9200"]}
    assert _live(gateway, name) == []  # at once, not after the TTL


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{", 400),
        (b"[]", 400),
        (b"{}", 422),
        (b'{"params": {"data": []}}', 422),
        (b'{"params": {"data": [{"servicename": 5, "addrip": "h:1"}]}}', 422),
        (b'{"params": {"data": [{"servicename": "a", "addrip": "nohostport"}]}}', 422),
        (b'{"service": "x", "address": "127.0.0.1:99999"}', 422),
        (b'{"service": "x", "address": "bad host!:80"}', 422),
        (b'{"service": "X Y", "address": "127.0.0.1:80"}', 422),
        (b'{"service": "x", "address": "127.0.0.1:80", "weight": 0}', 422),
        (b'{"service": "x", "address": "127.0.0.1:80", "kind": "ftp"}', 422),
        (b'{"service": "x", "address": "127.0.0.1:80", "health_path": "../etc"}', 422),
    ],
)
def test_bad_heartbeats(gateway: str, body: bytes, status: int) -> None:
    response = as_admin.post(
        f"{gateway}/heartbeat", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    assert response.json()["error"]["code"]
