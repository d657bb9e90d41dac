"""The reverse proxy through a real gateway and three real backends registered by heartbeat."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import psutil
import pytest

from tests.helpers import (
    ServiceProcess,
    free_port,
    issue_api_key,
    peak_rss_growth,
    pid_listening_on,
    wait_for,
    wait_for_async,
)
from tests.support.policy import set_service, wait_applied
from tests.support.registry import dead_instances
from tests.webapi.conftest import as_admin, gateway_process, http_instance

pytestmark = pytest.mark.timeout(180)


@dataclass
class Backends:
    gateway: str
    redis_url: str
    service: str
    api_key: str
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def start(
        self, name: str, *, version: str = "0", weight: int = 1, instance_id: str | None = None
    ) -> None:
        port = self.ports.get(name) or free_port()
        self.ports[name] = port
        self.procs[name] = http_instance(self.gateway, self.api_key, self.service, name,
                                         PORT=str(port), VERSION=version, WEIGHT=str(weight),
                                         INSTANCE_ID=instance_id or name)  # fmt: skip

    def live(self) -> set[str]:
        body = as_admin.get(f"{self.gateway}/health", timeout=5).json()
        return set(body["services"].get(self.service, {}).get("instances", []))


@pytest.fixture
def backends(gateway: str, redis_url: str) -> Iterator[Backends]:
    api_key = issue_api_key(redis_url, ["registry"], name="backends")
    b = Backends(gateway, redis_url, f"web{uuid.uuid4().hex[:6]}", api_key)
    for name in ("a", "b", "c"):
        b.start(f"{b.service}-{name}")
    try:
        wait_for(lambda: len(b.live()) == 3, timeout=30)
        # the gateway's view has them too (it routes from its local view)
        wait_for(lambda: _ok(b, "/echo"), timeout=10)
        yield b
    finally:
        for proc in b.procs.values():
            proc.stop()


def _ok(b: Backends, path: str) -> bool:
    return as_admin.get(f"{b.gateway}/svc/{b.service}{path}", timeout=5).status_code == 200


def _spread(b: Backends, n: int, path: str = "/echo", **kw) -> Counter[str]:
    with httpx.Client(base_url=b.gateway, timeout=10, headers=as_admin.headers) as client:
        return Counter(
            client.get(f"/svc/{b.service}{path}", **kw).json()["instance"] for _ in range(n)
        )


def _set_strategy(redis_url: str, service: str, name: str) -> None:
    set_service(redis_url, service, strategy=name)


def test_round_robin_spreads_exactly_evenly(backends: Backends) -> None:
    assert sorted(_spread(backends, 300).values()) == [100, 100, 100]


def test_weights_are_honoured(backends: Backends) -> None:
    name = f"{backends.service}-heavy"
    backends.start(name, weight=3)
    wait_for(lambda: len(backends.live()) == 4, timeout=20)
    _set_strategy(backends.redis_url, backends.service, "weighted")
    wait_for(lambda: _spread(backends, 60)[name] == 30, timeout=10)  # 3 of 6 per cycle


def test_headers_and_request_id(backends: Backends) -> None:
    response = as_admin.get(
        f"{backends.gateway}/svc/{backends.service}/echo?x=1",
        headers={
            "x-request-id": "rid-42",
            "connection": "keep-alive, x-secret",
            "x-secret": "1",
            "x-forwarded-for": "10.9.9.9",
        },
    )
    body = response.json()
    assert body["query"] == "x=1"
    seen = body["headers"]
    assert seen["x-request-id"] == "rid-42"
    assert seen["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert "x-secret" not in seen  # named in Connection: hop-by-hop
    assert float(response.headers["x-upstream-latency"]) >= 0
    assert float(response.headers["x-gateway-latency"]) >= 0
    assert response.headers["x-request-id"] == "rid-42"


@pytest.mark.parametrize("path", ["/../../etc/passwd", "/a/%2e%2e/b", "/a%2fb", "/a/%5c/b"])
def test_path_traversal_is_refused(backends: Backends, path: str) -> None:
    response = as_admin.get(f"{backends.gateway}/svc/{backends.service}{path}")
    assert response.status_code in (400, 404)
    assert response.json()["error"]["code"]


def test_error_statuses(backends: Backends, gateway: str) -> None:
    assert as_admin.get(f"{gateway}/svc/nosuchservice/x").status_code == 404
    slow = as_admin.get(f"{gateway}/svc/{backends.service}/slow?ms=3000", timeout=30)
    assert slow.status_code == 504  # the test gateway's PROXY_TIMEOUT is 1 s
    assert slow.json()["error"]["code"] == "upstream_timeout"
    assert _ok(backends, "/echo")  # a slow answer did not eject anyone
    upstream_500 = as_admin.get(f"{gateway}/svc/{backends.service}/status/500")
    assert upstream_500.status_code == 500  # an upstream's own answer passes through


def test_streaming_upload_and_download(backends: Backends) -> None:
    size = 100 * 1024 * 1024
    chunk = bytes(range(256)) * 256

    def body() -> Iterator[bytes]:
        for _ in range(size // len(chunk)):
            yield chunk

    expected = hashlib.sha256(chunk * (size // len(chunk))).hexdigest()
    gateway = psutil.Process(pid_listening_on(int(backends.gateway.rpartition(":")[2])))
    with peak_rss_growth(gateway) as growth:
        up = as_admin.post(
            f"{backends.gateway}/svc/{backends.service}/upload", content=body(), timeout=120
        )
        assert up.status_code == 200
        assert up.json()["bytes"] == size and up.json()["sha256"] == expected
        received = 0
        with httpx.stream("GET", f"{backends.gateway}/svc/{backends.service}/download?mb=100",
                          timeout=120, headers=as_admin.headers) as down:  # fmt: skip
            assert down.status_code == 200
            for part in down.iter_bytes():
                received += len(part)
        assert received == size
    # Neither body was held: the gateway's memory grew by far less than 100 MB.
    assert growth[0] < 32 * 1024 * 1024, f"{growth[0] / 2**20:.1f} MiB"


def test_nlp_and_ai_server_compatibility(backends: Backends) -> None:
    nlp = as_admin.post(
        f"{backends.gateway}/nlp", json={"service_name": backends.service, "text": "hi"}
    )
    assert nlp.status_code == 200
    assert nlp.json()["echo"] == {"service_name": backends.service, "text": "hi"}
    envelope = {"server_name": backends.service, "params": {"k": 1}, "data": [1, 2]}
    ai = as_admin.post(f"{backends.gateway}/ai_server/", json=envelope)
    body = ai.json()
    assert ai.status_code == 200, body
    assert set(body) == {"server_name", "status", "msg", "data", "duration"}
    assert body["status"] == 0 and body["server_name"] == backends.service
    assert body["data"]["got"] == envelope
    bad = as_admin.post(f"{backends.gateway}/nlp", json={"text": "no service"})
    assert bad.status_code == 400
    unknown = as_admin.post(f"{backends.gateway}/nlp", json={"service_name": "nobody_here"})
    assert unknown.status_code == 404


def test_least_time_prefers_the_fast_instance_and_recovers(backends: Backends) -> None:
    _set_strategy(backends.redis_url, backends.service, "least_time")
    slow_name = f"{backends.service}-a"
    as_admin.post(f"http://127.0.0.1:{backends.ports[slow_name]}/admin/delay?ms=80")
    wait_for(lambda: _spread(backends, 60)[slow_name] < 10, timeout=20)
    as_admin.post(f"http://127.0.0.1:{backends.ports[slow_name]}/admin/delay?ms=0")
    wait_for(lambda: _spread(backends, 90)[slow_name] >= 10, timeout=60, interval=0.5)


def test_sigkill_under_load_fails_no_idempotent_request(backends: Backends) -> None:
    # The victim is the only instance of its version, so a request for that version can
    # go nowhere else: its answer says whether the gateway still tries the victim (502)
    # or has ejected it (503). The load, naming no version, goes to all four.
    victim, alone = f"{backends.service}-d", {"x-service-version": "victim"}
    backends.start(victim, version="victim")
    wait_for(lambda: _spread(backends, 2, headers=alone) == Counter({victim: 2}), timeout=30)
    results: list[int] = []

    async def load(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(
            base_url=backends.gateway, timeout=10, headers=as_admin.headers
        ) as client:
            while not stop.is_set():
                r = await client.get(f"/svc/{backends.service}/echo")
                results.append(r.status_code)

    def ejected() -> bool:
        reply = as_admin.get(f"{backends.gateway}/svc/{backends.service}/echo", headers=alone)
        return reply.status_code == 503 and victim in backends.live()  # still registered

    async def scenario() -> None:
        stop = asyncio.Event()
        workers = [asyncio.create_task(load(stop)) for _ in range(8)]
        await asyncio.sleep(0.5)
        backends.procs[victim].stop(signal.SIGKILL)
        # Ejected within a second: before its lease (HEARTBEAT_TTL, 1.5 s) could end.
        await wait_for_async(lambda: asyncio.to_thread(ejected), timeout=1.0)
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*workers)

    asyncio.run(scenario())
    assert results and all(code == 200 for code in results)
    wait_for(lambda: victim not in backends.live(), timeout=5)  # gone within the TTL
    backends.start(victim, version="victim")  # same port, same id: it takes traffic again
    wait_for(lambda: _spread(backends, 30)[victim] > 0, timeout=30)


def test_version_selection(backends: Backends) -> None:
    name = f"{backends.service}-v2"
    backends.start(name, version="v2")
    wait_for(lambda: len(backends.live()) == 4, timeout=20)
    picked = _spread(backends, 12, headers={"x-service-version": "v2"})
    assert picked == Counter({name: 12})
    missing = as_admin.get(
        f"{backends.gateway}/svc/{backends.service}/echo", headers={"x-service-version": "v9"}
    )
    assert missing.status_code == 503
    # An empty one names no version (Sanic's route, then the fast path's): not a 503.
    unnamed = _spread(backends, 4, headers={"x-service-version": ""})
    assert sum(unnamed.values()) == 4


def test_live_policy_version_weights_and_timeout(backends: Backends) -> None:
    name = f"{backends.service}-v2"
    backends.start(name, version="v2")
    wait_for(lambda: len(backends.live()) == 4, timeout=20)
    set_service(backends.redis_url, backends.service, version_weights={"v2": 100, "0": 0})
    wait_for(lambda: _spread(backends, 12) == Counter({name: 12}), timeout=10)
    named = _spread(backends, 6, headers={"x-service-version": "0"})  # a named version wins
    assert sum(named.values()) == 6 and name not in named
    # The test gateway's PROXY_TIMEOUT is 1 s; the service's own timeout replaces it.
    slow = f"{backends.gateway}/svc/{backends.service}/slow?ms=600"
    assert as_admin.get(slow, timeout=10).status_code == 200
    set_service(backends.redis_url, backends.service, version_weights={}, timeout=0.3)
    wait_for(lambda: as_admin.get(slow, timeout=10).status_code == 504, timeout=10, interval=0.2)
    # Longer than PROXY_TIMEOUT too: a slow model gets the time its policy gives it.
    slower = f"{backends.gateway}/svc/{backends.service}/slow?ms=1800"
    assert as_admin.get(slower, timeout=10).status_code == 504  # PROXY_TIMEOUT: 1 s
    set_service(backends.redis_url, backends.service, timeout=4)
    wait_for(lambda: as_admin.get(slower, timeout=10).status_code == 200, timeout=10, interval=0.2)


def test_consistent_hash_is_sticky(backends: Backends) -> None:
    _set_strategy(backends.redis_url, backends.service, "hash")

    def owners(key: str) -> set[str]:
        return set(_spread(backends, 10, headers={"x-balance-key": key}))

    wait_for(lambda: all(len(owners(f"user-{i}")) == 1 for i in range(5)), timeout=10)
    spread = {next(iter(owners(f"user-{i}"))) for i in range(40)}
    assert len(spread) >= 2  # different keys land on different instances
    # An empty key is no key (Sanic's route, then the fast path's): round-robin, as
    # without the header, not every request to the owner of "".
    assert len(_spread(backends, 12, headers={"x-balance-key": ""})) == 3


def test_hash_on_a_header_the_policy_names(backends: Backends) -> None:
    doc = set_service(backends.redis_url, backends.service, strategy="hash",
                      hash_on="header:X-User-Id")  # fmt: skip
    wait_applied(backends.gateway, doc.version)

    def owners(user: str) -> set[str]:
        # X-Balance-Key changes with every request: the policy's header is the key now.
        svc = {_one(backends, {"x-user-id": user, "x-balance-key": str(i)}) for i in range(6)}
        nlp = {
            as_admin.post(f"{backends.gateway}/nlp", headers={"x-user-id": user},
                          json={"service_name": backends.service}).json()["instance"]
            for _ in range(3)
        }  # fmt: skip
        return svc | nlp

    spread = [owners(f"user-{i}") for i in range(12)]
    assert all(len(owner) == 1 for owner in spread), spread
    assert len(set().union(*spread)) >= 2  # different users land on different instances


def _one(b: Backends, headers: dict[str, str]) -> str:
    reply = as_admin.get(f"{b.gateway}/svc/{b.service}/echo", headers=headers, timeout=10)
    return str(reply.json()["instance"])


async def _concurrent_spread(b: Backends, total: int, concurrency: int = 8) -> Counter[str]:
    counts: Counter[str] = Counter()
    remaining = [total]

    async def worker(client: httpx.AsyncClient) -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            r = await client.get(f"/svc/{b.service}/echo")
            counts[r.json()["instance"]] += 1

    async with httpx.AsyncClient(
        base_url=b.gateway, timeout=10, headers=as_admin.headers
    ) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return counts


def test_least_conn_avoids_the_slow_instance_under_load(backends: Backends) -> None:
    _set_strategy(backends.redis_url, backends.service, "least_conn")
    slow = f"{backends.service}-c"
    as_admin.post(f"http://127.0.0.1:{backends.ports[slow]}/admin/delay?ms=100")
    wait_for(lambda: asyncio.run(_concurrent_spread(backends, 120))[slow] < 20, timeout=30)
    as_admin.post(f"http://127.0.0.1:{backends.ports[slow]}/admin/delay?ms=0")
    wait_for(lambda: asyncio.run(_concurrent_spread(backends, 120))[slow] >= 25, timeout=30)


def test_active_health_check_removes_and_readmits(backends: Backends) -> None:
    sick = f"{backends.service}-a"
    as_admin.post(f"http://127.0.0.1:{backends.ports[sick]}/admin/health?ok=0")
    # Down after two failed checks (2 s apart), without any request failing.
    wait_for(lambda: sick not in _spread(backends, 30), timeout=15, interval=0.5)
    as_admin.post(f"http://127.0.0.1:{backends.ports[sick]}/admin/health?ok=1")
    wait_for(lambda: sick in _spread(backends, 30), timeout=15, interval=0.5)
    # The checks (a GET per instance every 2 s) are not logged one line each.
    log = gateway_process(backends.gateway).log_path.read_text()
    assert '"logger": "httpx"' not in log


def test_dead_only_instance_is_502_then_503(gateway: str) -> None:
    service = f"dead{uuid.uuid4().hex[:6]}"
    closed_port = free_port()  # nothing listens there
    beat = {"service": service, "address": f"127.0.0.1:{closed_port}"}
    assert as_admin.post(f"{gateway}/heartbeat", json=beat).status_code == 200

    def known() -> httpx.Response | None:
        r = as_admin.get(f"{gateway}/svc/{service}/x")
        return r if r.status_code != 404 else None  # 404 until the gateway's view has it

    first = wait_for(known, timeout=5)
    assert first.status_code == 502, first.text  # the connect failure itself
    assert first.json()["error"]["code"] == "upstream_failed"
    then = as_admin.get(f"{gateway}/svc/{service}/x")  # ejected now
    assert then.status_code == 503
    assert then.json()["error"]["code"] == "no_healthy_instance"


def test_retries_stop_when_the_services_retry_budget_is_spent(gateway: str, redis_url: str) -> None:
    """Five dead instances, three attempts a request, and a budget of one retry (no share
    per request, no minimum rate): the first request tries two instances, the next ones
    only their first; without the budget the first two would try three and two."""
    service = f"budget{uuid.uuid4().hex[:6]}"
    doc = set_service(
        redis_url, service, retries=2, retry_budget={"ratio": 0.0, "min_per_second": 0.0}
    )
    wait_applied(gateway, doc.version)

    async def scenario() -> list[int]:
        async with dead_instances(redis_url, service, 5):
            return [as_admin.get(f"{gateway}/svc/{service}/x").status_code for _ in range(5)]

    assert asyncio.run(scenario()) == [502, 502, 502, 502, 503]
    # The gateway says so: four retries refused, none left.
    stats = as_admin.get(f"{gateway}/admin/proxy/stats").json()
    budget = stats["retry_budgets"][service]
    assert budget == {"available": 0.0, "cap": 1.0, "denied": 4, "exhausted": True}


def test_two_services_whose_instances_share_an_id_each_get_their_own(
    gateway: str, redis_url: str
) -> None:
    # An instance id names an instance within its service; the native heartbeat lets a
    # backend choose it, and two teams may well both choose "worker-1".
    api_key = issue_api_key(redis_url, ["registry"], name="backends")
    tag = uuid.uuid4().hex[:6]
    alpha = Backends(gateway, redis_url, f"alpha{tag}", api_key)
    beta = Backends(gateway, redis_url, f"beta{tag}", api_key)
    try:
        for backends in (alpha, beta):
            backends.start(backends.service, instance_id="worker-1")
        wait_for(lambda: _ok(alpha, "/echo") and _ok(beta, "/echo"), timeout=30)
        reached: Counter[str] = Counter()
        with httpx.Client(base_url=gateway, timeout=10, headers=as_admin.headers) as client:
            for _ in range(20):
                for backends in (alpha, beta):
                    response = client.get(f"/svc/{backends.service}/echo")
                    assert response.headers["x-upstream-instance"] == "worker-1"
                    reached[f"{backends.service} -> {response.json()['instance']}"] += 1
        assert reached == {f"{alpha.service} -> {alpha.service}": 20,
                           f"{beta.service} -> {beta.service}": 20}  # fmt: skip
    finally:
        for proc in [*alpha.procs.values(), *beta.procs.values()]:
            proc.stop()
