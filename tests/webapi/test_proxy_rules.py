"""The proxy's failover rules (`webapi.proxy.attempts`) and the `X-Forwarded-*` fields,
end to end: a real gateway process in front of instances that misbehave on cue.

The misbehaving instances are scripted upstreams (`upstream_servers.Upstream`) in the
test's own event loop, registered straight into the registry: each request they
accept is recorded, so a test can say which instance saw a request and which never did.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from common.balancing import HealthBook
from tests.helpers import issue_api_key, wait_for_async
from tests.support.policy import update_service, wait_applied
from tests.support.registry import registered
from tests.webapi.conftest import Backend, answered
from tests.webapi.upstream_servers import Peer, Upstream, keep_alive, ok

pytestmark = pytest.mark.timeout(120)

# Failures in a row that eject an instance (the gateway's book has the default).
STREAK = HealthBook().failures_to_eject


@dataclass
class Script:
    """How the faulty instance treats each request it accepts: `answer` it (with its
    target, as `keep_alive` does), `close` or `reset` the connection without answering,
    or `stall` (never answer: the gateway gives up and closes)."""

    mode: str = "answer"

    async def serve(self, peer: Peer) -> None:
        async for req in peer.requests():
            if self.mode == "answer":
                await peer.send(ok(req.target.encode()))
            elif self.mode == "close":
                peer.close()
                return
            elif self.mode == "reset":
                peer.reset()
                return


@dataclass
class Pair:
    """Two instances of `service` behind the gateway: `healthy` always answers, `faulty`
    does as `script` says. `client` is at `/svc/<service>` with the admin API key."""

    gateway: str
    service: str
    healthy: Upstream
    faulty: Upstream
    script: Script
    client: httpx.AsyncClient

    def seen(self, up: Upstream) -> set[str]:
        """The targets `up` has accepted (a request it broke included)."""
        return {req.target for req in up.requests}

    def answered_by(self, reply: httpx.Response) -> str:
        return str(reply.headers.get("x-upstream-instance", "none")).rpartition("-")[2]


@pytest.fixture
async def pair(gateway: str, redis_url: str, auth: dict[str, str]) -> AsyncIterator[Pair]:
    service = f"rules{uuid.uuid4().hex[:6]}"
    script = Script()
    async with (
        Upstream(keep_alive) as healthy,
        Upstream(script.serve) as faulty,
        registered(
            redis_url,
            service,
            {f"{service}-healthy": healthy.address, f"{service}-faulty": faulty.address},
        ),  # fmt: skip
        httpx.AsyncClient(base_url=f"{gateway}/svc/{service}", headers=auth, timeout=10) as c,
    ):

        async def both_answered() -> bool:
            await c.get("/warm-up")  # 404 until the gateway's view has the service
            return bool(healthy.requests and faulty.requests)

        # Every request answered so far: the health book has nothing against either.
        await wait_for_async(both_answered, timeout=10)
        healthy.requests.clear()
        faulty.requests.clear()
        yield Pair(gateway, service, healthy, faulty, script, c)


# A broken connection: retried on another instance only for an idempotent method.


@pytest.mark.parametrize("mode", ["close", "reset"])
async def test_a_get_whose_connection_breaks_is_answered_by_the_other_instance(
    pair: Pair, mode: str
) -> None:
    pair.script.mode = mode
    replies = [await pair.client.get(f"/get/{i}") for i in range(4)]
    assert [r.status_code for r in replies] == [200] * 4
    assert {pair.answered_by(r) for r in replies} == {"healthy"}
    assert [r.text for r in replies] == [f"/get/{i}" for i in range(4)]
    broken = pair.seen(pair.faulty)
    assert broken  # round robin sent the faulty instance its share, which it broke
    assert broken <= pair.seen(pair.healthy)  # ... and each was tried again on the other


@pytest.mark.parametrize("mode", ["close", "reset"])
async def test_a_post_whose_connection_breaks_is_not_retried(pair: Pair, mode: str) -> None:
    pair.script.mode = mode
    for i in range(4):  # round robin: the faulty instance gets one of the first two
        target = f"/post/{i}"
        reply = await pair.client.post(target, content=b'{"n": 1}')
        if target in pair.seen(pair.faulty):
            break
        assert reply.status_code == 200
    else:
        pytest.fail("no POST reached the faulty instance")
    # It may have applied the POST before the connection broke: the caller decides.
    assert reply.status_code == 502
    assert reply.json()["error"]["code"] == "upstream_failed"
    assert target not in pair.seen(pair.healthy)


# A timeout: answered 504, not retried, and it counts toward the failure streak.


async def test_timeouts_are_not_retried_and_a_streak_of_them_ejects(
    pair: Pair, redis_url: str
) -> None:
    doc = await update_service(redis_url, pair.service, timeout=0.3)  # not PROXY_TIMEOUT's 1 s
    await asyncio.to_thread(wait_applied, pair.gateway, doc.version)
    pair.script.mode = "stall"
    replies: dict[str, httpx.Response] = {}
    timeouts = 0
    # Round robin alternates while both are in: every other request reaches the
    # staller, so it has its streak within 2 * STREAK requests unless one timeout
    # already ejected it (then it would sit out a second, more than these take).
    for i in range(2 * STREAK):
        target = f"/t/{i}"
        reply = replies[target] = await pair.client.get(target)
        timeouts += reply.status_code == 504
        if timeouts == STREAK:
            break
    assert timeouts == STREAK, {t: r.status_code for t, r in replies.items()}
    for target, reply in replies.items():
        if reply.status_code == 504:
            assert reply.json()["error"]["code"] == "upstream_timeout"
            assert target in pair.seen(pair.faulty)
            assert target not in pair.seen(pair.healthy)  # not retried
        else:
            assert reply.status_code == 200 and pair.answered_by(reply) == "healthy"
    # Ejected now (for a second, the first ejection's length): the next requests all
    # go to the other instance.
    stalled = len(pair.faulty.requests)
    after = [await pair.client.get(f"/after/{i}") for i in range(4)]
    assert [(r.status_code, pair.answered_by(r)) for r in after] == [(200, "healthy")] * 4
    assert len(pair.faulty.requests) == stalled


# X-Forwarded-*: the same through the fast path and Sanic's route.


@pytest.mark.parametrize(
    ("host", "prior"), [(None, None), ("api.example.test:8443", "203.0.113.7, 10.0.0.2")]
)
def test_forwarded_fields_reach_the_upstream_on_both_paths(
    backend: Backend, host: str | None, prior: str | None
) -> None:
    # A fresh API key: its first request is Sanic's (the credential is not cached
    # yet), the second the fast path's.
    key = issue_api_key(backend.redis_url, [backend.service], name="forwarded")
    headers = {"X-Api-Key": key}
    if host is not None:
        headers["Host"] = host
    if prior is not None:
        headers["X-Forwarded-For"] = prior
    port = backend.gateway.rpartition(":")[2]
    expected = {
        "host": backend.service,
        "x-forwarded-host": host or f"127.0.0.1:{port}",
        "x-forwarded-for": f"{prior}, 127.0.0.1" if prior else "127.0.0.1",
        "x-forwarded-proto": "http",
    }
    for path, fast in (("normal", 0), ("fast", 1)):
        before = answered(backend.gateway)
        reply = httpx.get(f"{backend.base}/echo", headers=headers, timeout=10)
        assert reply.status_code == 200, reply.text
        assert answered(backend.gateway) - before == fast, path
        seen = reply.json()["headers"]
        assert {name: seen.get(name) for name in expected} == expected, path
