"""Redis up but refusing under the gateway (out of memory, a read-only replica, a
failed save, a script running too long, the credentials): an RPC route and
`POST /heartbeat` answer 503 saying why, `/health` names the kind, and the log has one
warning line per request with the detail, never a traceback; all is well again once
Redis takes writes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from common import constants
from common.embedded_redis import EmbeddedRedis
from tests.helpers import issue_api_key, wait_for
from tests.support.redis_states import (  # noqa: F401 (the *_fixture ones)
    MESSAGES,
    STATES,
    private_redis_fixture,
)
from tests.webapi.conftest import gateway_process, running_gateway

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def refused_gateway(private_redis: EmbeddedRedis) -> Iterator[str]:
    # Keys stay cached: a refusal of the credentials is not a credential check's 503.
    with running_gateway(private_redis.url, API_KEY_CACHE_TTL="3600") as base:
        yield base


@pytest.mark.parametrize("kind", list(STATES))
def test_a_redis_refusing_is_a_503_saying_why(
    kind: str, private_redis: EmbeddedRedis, refused_gateway: str
) -> None:
    base = refused_gateway
    admin = redis.Redis(port=private_redis.port)
    service = f"refused_{uuid.uuid4().hex[:8]}"
    seconds, _ = admin.time()  # an instance live for an hour (no worker): calls get enqueued
    admin.zadd(constants.instances_key(service), {"fake": (seconds + 3600) * 1000})
    headers = {"Authorization": f"Bearer {issue_api_key(private_redis.url, ['*', 'registry'])}"}
    beat = {"service": f"{service}_http", "address": "127.0.0.1:9"}
    assert httpx.post(f"{base}/heartbeat", json=beat, headers=headers).status_code == 200
    log = gateway_process(base)
    warned = len(log.log_records("rpc error"))
    try:
        with STATES[kind](admin):
            call = httpx.post(f"{base}/rpc/{service}/m", json={}, headers=headers, timeout=10)
            assert (call.status_code, call.json()) == (503, {"error": {
                "code": "service_unavailable", "message": MESSAGES[kind]}})  # fmt: skip
            refused = httpx.post(f"{base}/heartbeat", json=beat, headers=headers, timeout=10)
            assert (refused.status_code, refused.json()) == (503, {"error": {
                "code": "redis_unavailable", "message": MESSAGES[kind]}})  # fmt: skip
            health = httpx.get(f"{base}/health", timeout=10)
            assert (health.status_code, health.json()) == (503, {
                "status": "degraded", "redis": {"ok": False, "error": kind}})  # fmt: skip
        wait_for(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200, timeout=15)
    finally:
        admin.close()
    lines = log.log_records("rpc error")[warned:]
    assert [(r["path"], r["status"]) for r in lines] == [
        (f"/rpc/{service}/m", 503), ("/heartbeat", 503)]  # fmt: skip
    assert all(r["error"] for r in lines)  # redis-py's text: for the operator only
    assert log.log_records("unhandled error") == []
    assert "Traceback" not in log.log_path.read_text()
