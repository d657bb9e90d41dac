"""Two real gateway processes sharing one Redis database, with an `auth` worker (whose
admin is `ADMIN_NAME`) and the calc worker: the `gateways` fixture of the access tests
(`test_access.py`, `test_access_tokens.py`, `test_access_policy.py`). Each module gets
its own, on a flushed database 6, so its policy and users touch no other module.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis

from tests.helpers import ServiceProcess, db_url, free_port, wait_for
from tests.support.calc_service import start_worker
from tests.support.policy import policy_version

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
        """PUT `document`, its sections left out said empty (a PUT must say it removes
        them: `common.policy.sections`); every gateway applies it before this returns."""
        whole = {"services": {}, "routes": [], "limits": [], **document}
        r = httpx.put(f"{self.url}/admin/policy", json=whole, headers=bearer(token), timeout=10)
        assert r.status_code == 200, r.text
        version = r.json()["version"]
        # Every gateway applies it (they report the version they apply).
        wait_for(lambda: all(policy_version(u) == version for u in self.urls), timeout=5)
        return dict(r.json())


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@pytest.fixture(scope="module", name="gateways")
def gateways_fixture(redis_url: str) -> Iterator[Gateways]:
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
        g.procs.append(start_worker(url, **common))

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
