"""`POST /heartbeat`: both forms register instances; bad bodies are a precise 4xx."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import redis.asyncio as aioredis

from common.instance_record import InstanceRecord
from common.registry import Registry
from tests.helpers import wait_for
from tests.webapi.conftest import as_admin
from webapi.heartbeats import MAX_METADATA_BYTES, MAX_METADATA_DEPTH


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


def _long(over: int) -> bytes:
    """A JSON object `over` bytes longer than the metadata's bound, compactly encoded."""
    return b'{"a":"' + b"x" * (MAX_METADATA_BYTES - 8 + over) + b'"}'


def _nested(depth: int) -> bytes:
    """A JSON object nested `depth` levels deep."""
    return b'{"a": ' * (depth - 1) + b'{"a": 1}' + b"}" * (depth - 1)


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
        (b'{"service": "admin", "address": "127.0.0.1:80"}', 422),  # reserved
        (b'{"params": {"data": [{"servicename": "auth_v2", "addrip": "127.0.0.1:80"}]}}', 422),
        (b'{"service": "x", "address": "127.0.0.1:80", "weight": 0}', 422),
        (b'{"service": "x", "address": "127.0.0.1:80", "kind": "ftp"}', 422),
        (b'{"service": "x", "address": "127.0.0.1:80", "health_path": "../etc"}', 422),
        ('{"service": "x", "address": "127.0.0.1:\u00b2"}'.encode(), 422),  # not int()'s
        (  # int() reads "\u0668\u0660" as 80
            '{"service": "x", "address": "127.0.0.1:\u0668\u0660", "instance_id": "x1"}'.encode(),
            422,
        ),
        (b'{"service": "x", "address": "127.0.0.1:80", "metadata": ' + _nested(9) + b"}", 422),
        (b'{"service": "x", "address": "127.0.0.1:80", "metadata": ' + _nested(900) + b"}", 422),
        (b'{"service": "x", "address": "127.0.0.1:80", "metadata": ' + _long(1) + b"}", 422),
        # A health path the checker's URL cannot hold, or past its bound; a zone past its.
        (b'{"service": "x", "address": "127.0.0.1:9", "health_path": "/h\\r\\nX: 1"}', 422),
        (b'{"service": "x", "address": "127.0.0.1:9", "health_path": "/a b"}', 422),
        (
            b'{"service": "x", "address": "127.0.0.1:9", "health_path": "/' + b"h" * 2048 + b'"}',
            422,
        ),
        (b'{"service": "x", "address": "127.0.0.1:9", "zone": "' + b"z" * 65 + b'"}', 422),
        (b'{"service": "x", "address": "127.0.0.1:9", "zone": "eu 1"}', 422),
        # Wrong types are refused, not taken as something else.
        (b'{"service": "x", "address": "127.0.0.1:80", "version": true}', 422),
        (b'{"service": "x", "address": "127.0.0.1:80", "metadata": 0}', 422),
        (b'{"service": "x", "address": "127.0.0.1:80", "leaving": "yes"}', 422),
        # Hosts that are neither an IP address nor a DNS name.
        (b'{"service": "x", "address": "..:80"}', 422),
        (b'{"service": "x", "address": "-:80"}', 422),
        (b'{"service": "x", "address": "[fe80::1%eth0]:8080"}', 422),
    ],
)
def test_bad_heartbeats(gateway: str, body: bytes, status: int) -> None:
    response = as_admin.post(
        f"{gateway}/heartbeat", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    assert response.json()["error"]["code"]


def test_a_refused_heartbeat_says_why(gateway: str) -> None:
    body = {"service": "x", "address": "127.0.0.1:\u00b2"}
    refused = as_admin.post(f"{gateway}/heartbeat", json=body).json()["error"]
    assert refused["code"] == "invalid_heartbeat"
    assert refused["message"] == "address must be host:port with a port from 1 to 65535"
    body = {"service": "x", "address": "127.0.0.1:80", "metadata": json.loads(_nested(9))}
    refused = as_admin.post(f"{gateway}/heartbeat", json=body).json()["error"]
    assert refused["message"] == "metadata may nest at most 8 levels deep"
    body["metadata"] = json.loads(_long(1))
    refused = as_admin.post(f"{gateway}/heartbeat", json=body).json()["error"]
    assert refused["message"] == "metadata may be at most 4096 bytes as JSON"


def test_metadata_up_to_its_bounds_is_stored_past_them_refused(
    gateway: str, redis_url: str
) -> None:
    name = f"svc{uuid.uuid4().hex[:6]}"
    body: dict[str, object] = {"service": name, "address": "127.0.0.1:9300"}
    for at_bound, past in ((_nested(MAX_METADATA_DEPTH), _nested(MAX_METADATA_DEPTH + 1)),
                           (_long(0), _long(1))):  # fmt: skip
        stored = as_admin.post(
            f"{gateway}/heartbeat", json={**body, "metadata": json.loads(at_bound)}
        )
        assert stored.status_code == 200, stored.text
        assert _records(redis_url, name)[f"{name}@127.0.0.1:9300"].metadata == json.loads(at_bound)
        refused = as_admin.post(f"{gateway}/heartbeat", json={**body, "metadata": json.loads(past)})
        assert refused.status_code == 422, refused.text


def test_bounds_and_spellings_of_an_address_and_a_health_path(gateway: str, redis_url: str) -> None:
    name = f"svc{uuid.uuid4().hex[:6]}"
    at_bound = {"service": name, "address": "127.0.0.1:00080", "zone": "z" * 64,
                "health_path": "/" + "h" * 2000 + "?a=1&b=%20"}  # fmt: skip
    stored = as_admin.post(f"{gateway}/heartbeat", json=at_bound)
    assert stored.json()["registered"] == [f"{name}@127.0.0.1:80"]  # one spelling of a port
    record = _records(redis_url, name)[f"{name}@127.0.0.1:80"]
    assert (record.address, record.zone) == ("127.0.0.1:80", "z" * 64)
    for field, value, message in (
        ("zone", "z" * 900_000, "zone must be a string matching"),
        ("health_path", "/" + "h" * 900_000, "health_path must be an absolute path"),
        ("address", "[fe80::1%eth0]:8080", "address: an IPv6 host with a %scope is not supported"),
    ):
        refused = as_admin.post(f"{gateway}/heartbeat", json={**at_bound, field: value})
        assert refused.status_code == 422
        assert refused.json()["error"]["message"].startswith(message)


def test_the_gateways_own_address_is_refused(gateway: str) -> None:
    port = gateway.rpartition(":")[2]
    for host in ("127.0.0.1", "localhost", "[::1]", "0.0.0.0", "app.localhost",
                 "[::ffff:127.0.0.1]", "[::ffff:7f00:2]", "[::ffff:0.0.0.0]"):  # fmt: skip
        body = {"service": "loop", "address": f"{host}:{port}"}
        refused = as_admin.post(f"{gateway}/heartbeat", json=body)
        assert refused.status_code == 422, refused.text
        assert "the gateway's own" in refused.json()["error"]["message"]


def test_an_ipv4_host_is_a_dotted_quad_only(gateway: str) -> None:
    # libc connects to 127.0.0.1 for each of these: a check reading them as DNS names
    # let the gateway register itself. Refused at any port: they are no DNS name either.
    port = gateway.rpartition(":")[2]
    for host in ("127.1", "2130706433", "0x7f000001", "0X7F000001", "127.000.000.001",
                 "0177.0.0.1", "0x7f.0.0.1", "0", "1.2.3.4.", "example.1"):  # fmt: skip
        for at in (port, "8080"):
            body = {"service": "loop", "address": f"{host}:{at}", "instance_id": "loop-1"}
            refused = as_admin.post(f"{gateway}/heartbeat", json=body)
            assert refused.status_code == 422, (host, refused.text)
            assert refused.json()["error"] == {
                "code": "invalid_heartbeat",
                "message": "address: an IPv4 host must be four decimal numbers without leading"
                " zeros",
            }
    name = f"svc{uuid.uuid4().hex[:6]}"
    for host in ("10.0.0.5", "255.255.255.255", "1.2.3.example", "a.0x1", "0x7f.example"):
        body = {"service": name, "address": f"{host}:8080"}
        stored = as_admin.post(f"{gateway}/heartbeat", json=body)
        assert stored.status_code == 200, (host, stored.text)
