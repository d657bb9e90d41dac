"""Redis stopped and restarted under a gateway that checks credentials and rate limits.

Access control must not make Redis a single point of failure for the proxy:
a credential already verified keeps working (keys and revocations are held in
the gateway), rate limits fall back to each process's own limiter
(`RATE_LIMIT_ON_REDIS_DOWN=local`, the default), `/health` reports the outage,
and everything is back on Redis after it restarts, with nobody restarted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import pytest

from common.embedded_redis import EmbeddedRedis
from tests.helpers import ServiceProcess, free_port, issue_api_key, issue_user_token, wait_for
from tests.support.policy import update_document
from tests.webapi.conftest import http_instance

pytestmark = pytest.mark.timeout(180)


def test_proxy_keeps_serving_verified_callers_through_a_redis_restart(tmp_path: Path) -> None:
    server = EmbeddedRedis(appendonly=True, data_dir=tmp_path).start()
    port, url = server.port, server.url
    service = f"out{uuid.uuid4().hex[:6]}"
    limit = {"id": "outage", "service": service, "key": "credential", "rate": 1000,
             "period": 1, "burst": 1000}  # fmt: skip
    asyncio.run(update_document(url, limits=[limit]))
    token = issue_user_token(url, "u-outage", "ops")
    gw_port = free_port()
    gw_env = {"REDIS_URL": url, "WEBAPI_PORT": str(gw_port)}
    gateway = ServiceProcess(["python", "-m", "webapi"], env=gw_env, name="gateway").start()
    base = f"http://127.0.0.1:{gw_port}"
    registrar = issue_api_key(url, ["registry"])
    admin = {"Authorization": f"Bearer {issue_api_key(url, ['admin'])}"}
    backend = http_instance(base, registrar, service, f"{service}-a")
    echo = f"{base}/svc/{service}/echo"
    auth = {"Authorization": f"Bearer {token}"}
    try:
        first = wait_for(lambda: _ok(echo, auth), timeout=30)
        assert first.headers["ratelimit-limit"] == "1000"  # checked in Redis
        assert httpx.get(f"{base}/admin/policy", headers=admin, timeout=10).status_code == 200

        server.stop(keep_data=True)
        assert wait_for(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 503)
        # Public: the kind of failure, not redis-py's text naming Redis's address.
        redis_state = httpx.get(f"{base}/health", timeout=5).json()["redis"]
        assert redis_state == {"ok": False, "error": "unreachable"}
        during = [httpx.get(echo, headers=auth, timeout=10) for _ in range(20)]
        assert [r.status_code for r in during] == [200] * 20
        assert all("ratelimit-remaining" in r.headers for r in during)  # the local limiter
        assert httpx.get(echo, timeout=10).status_code == 401  # still no way in without one
        # The backend's heartbeats cannot be stored: a 503 it may retry, not a 500.
        beat = httpx.post(
            f"{base}/heartbeat",
            headers={"Authorization": f"Bearer {registrar}"},
            json={"service": service, "address": "127.0.0.1:9"},
            timeout=10,
        )
        assert (beat.status_code, beat.json()["error"]["code"]) == (503, "redis_unavailable")
        # No 503 names Redis's address (redis-py's text): the gateway's log line does.
        policy = httpx.get(f"{base}/admin/policy", headers=admin, timeout=10)
        rpc = httpx.post(f"{base}/rpc/{service}/ping", headers=auth, json={}, timeout=10)
        for answer in (beat, policy, rpc):
            assert answer.status_code == 503, answer.text
            assert str(port) not in answer.json()["error"]["message"], answer.text
        logged = gateway.log_records("rpc error")
        assert any(str(port) in str(record) for record in logged), logged
        # Past the instance's lease (HEARTBEAT_TTL, 3 s), which no heartbeat could renew:
        # the gateway still routes to the instances it last saw.
        time.sleep(4)
        later = [httpx.get(echo, headers=auth, timeout=10) for _ in range(10)]
        assert [r.status_code for r in later] == [200] * 10
        # The outage is logged once, not once per retry or per heartbeat.
        resync_failed = "registry resync failed: routing on the instances last seen"
        assert len(gateway.log_records(resync_failed)) == 1
        assert gateway.log_records("unhandled error") == []

        server = EmbeddedRedis(port=port, appendonly=True, data_dir=tmp_path).start()
        wait_for(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200, timeout=30)
        assert _ok(echo, auth) is not None
        assert gateway.alive() and backend.alive()
        wait_for(lambda: gateway.log_records("registry resynced"), timeout=10)
    finally:
        backend.stop()
        gateway.stop()
        server.stop()


def _ok(url: str, headers: dict[str, str]) -> httpx.Response | None:
    response = httpx.get(url, headers=headers, timeout=10)
    return response if response.status_code == 200 else None
