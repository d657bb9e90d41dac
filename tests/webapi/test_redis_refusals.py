"""Redis up but refusing under the gateway (out of memory, a read-only replica, a
failed save, a script running too long, the credentials): an RPC route and
`POST /heartbeat` answer 503 saying why, `/health` names the kind, and the log has one
warning line per request with the detail, never a traceback; all is well again once
Redis takes writes. A gateway started while Redis refuses comes up all the same."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from common import constants
from common.embedded_redis import EmbeddedRedis
from tests.helpers import issue_api_key, issue_user_token, wait_for
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


def test_the_gateway_starts_on_a_fresh_redis_that_is_a_read_only_replica() -> None:
    """The first signing key cannot be written (a failover to a replica, say): the
    gateway comes up all the same (it stopped at start-up), `/health` saying why and the
    keys' loop logging it once; once Redis takes writes the loop creates the key and a
    token signed with it is accepted."""
    server = EmbeddedRedis().start()
    admin = redis.Redis(port=server.port)
    try:
        with contextlib.ExitStack() as refusing:
            refusing.enter_context(STATES["read_only"](admin))
            with running_gateway(server.url, status=503) as base:
                health = httpx.get(f"{base}/health", timeout=10).json()
                assert health["redis"] == {"ok": False, "error": "read_only"}
                refusing.close()  # Redis takes writes again
                log = gateway_process(base)
                wait_for(lambda: log.log_records("signing keys resynced"), timeout=10)
                token = issue_user_token(server.url, "u1", "alice")  # with the gateway's key
                answer = httpx.get(f"{base}/svc/nothere/x", timeout=10,
                                   headers={"Authorization": f"Bearer {token}"})  # fmt: skip
                assert answer.json()["error"]["code"] == "unknown_service"  # past the check
                failed = log.log_records("signing keys resync failed")
                assert [(r["kind"], r["at"]) for r in failed] == [("read_only", "start")]
                assert "Traceback" not in log.log_path.read_text()
    finally:
        admin.close()
        server.stop()
