"""A malformed instance record in Redis (written by hand, or by a faulty client) is
ignored with a warning: the service's other instances stay routable and the view's
resync goes on."""

from __future__ import annotations

import json
import logging
import uuid

import pytest
import redis.asyncio as aioredis

from common import constants
from common.balancing.policy import BalancingPolicy
from common.instance_record import _FIELD_TYPES, InstanceRecord, MalformedRecord
from common.policy import PolicyWatcher
from common.registry import Registry
from common.registry_view import RegistryView

_GOOD = {"service": "web", "instance_id": "web@1", "kind": "http", "address": "127.0.0.1:1"}

MALFORMED = {
    "not-json": b"not json",
    "not-utf8": b"\xff\xfe",
    "a-list": b"[1, 2]",
    "a-string": b'"a string"',
    "no-service": json.dumps({"instance_id": "web@1"}).encode(),
    "weight-str": json.dumps({**_GOOD, "weight": "3"}).encode(),
    "weight-bool": json.dumps({**_GOOD, "weight": True}).encode(),
    "weight-float": json.dumps({**_GOOD, "weight": 2.5}).encode(),
    "pid-str": json.dumps({**_GOOD, "pid": "12"}).encode(),
    "address-int": json.dumps({**_GOOD, "address": 8080}).encode(),
    "version-int": json.dumps({**_GOOD, "version": 2}).encode(),
    "zone-list": json.dumps({**_GOOD, "zone": ["a"]}).encode(),
    "metadata-list": json.dumps({**_GOOD, "metadata": []}).encode(),
    "started-str": json.dumps({**_GOOD, "started_at": "now"}).encode(),
    "health-bool": json.dumps({**_GOOD, "health_path": False}).encode(),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_record_is_refused_with_a_reason(raw: bytes) -> None:
    with pytest.raises(MalformedRecord) as refused:
        InstanceRecord.from_json(raw)
    assert str(refused.value)


def test_every_field_of_a_record_has_its_accepted_types() -> None:
    # A field added to `InstanceRecord` without its entry would never be read back.
    assert set(_FIELD_TYPES) == set(InstanceRecord.__dataclass_fields__)


def test_a_record_keeps_its_fields_and_ignores_unknown_ones() -> None:
    raw = json.dumps({**_GOOD, "weight": 3, "started_at": 17, "from_a_newer_version": 1})
    record = InstanceRecord.from_json(raw)
    assert (record.instance_id, record.weight, record.address) == ("web@1", 3, "127.0.0.1:1")
    assert record.started_at == 17.0 and isinstance(record.started_at, float)
    written = InstanceRecord("web", "web@2", kind="http", address="127.0.0.1:2", zone="z")
    assert InstanceRecord.from_json(written.to_json()) == written


async def test_a_malformed_record_leaves_its_service_routable(
    redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    service = f"web_{uuid.uuid4().hex[:6]}"
    registry = Registry(redis_client, ttl=30.0)
    records = [
        InstanceRecord(service, f"{service}@{n}", kind="http", address=f"127.0.0.1:{9000 + n}")
        for n in range(3)
    ]
    for record in records:
        await registry.heartbeat(record)
    good, typed_wrong, not_json = records
    key = constants.instance_record_key(service)
    wrong = json.loads(typed_wrong.to_json()) | {"weight": "heavy"}
    await redis_client.hset(key, typed_wrong.instance_id, json.dumps(wrong))
    await redis_client.hset(key, not_json.instance_id, b"{oops")

    with caplog.at_level(logging.WARNING, logger="switchboard.registry"):
        assert [r.instance_id for r in await registry.live_instances(service)] == [good.instance_id]
        view = RegistryView(redis_client, resync_interval=60)
        policy = BalancingPolicy(PolicyWatcher(redis_client))  # (the default policy)
        policy.follow(view)
        await view.start()
        try:
            await view.refresh()  # a whole resync, as the view runs every interval
            assert [r.instance_id for r in view.instances(service)] == [good.instance_id]
            endpoints = policy.endpoints(service, view.instances(service))
            assert policy.strategy(service).pick(endpoints).instance_id == good.instance_id
        finally:
            await view.close()
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert any(typed_wrong.instance_id not in m and "'weight' is str" in m for m in ignored)
    assert any("not JSON" in m for m in ignored)
