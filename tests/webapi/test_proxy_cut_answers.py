"""Answers cut short, end to end: by a service's `total_timeout` (the bound on a whole
exchange), or by the upstream itself. Either way the client must see the cut.

The gateway's read timeout (PROXY_TIMEOUT, 1 s in the test gateway) bounds each
silence; an instance that keeps trickling never hits it. The live policy's
`total_timeout` bounds the whole exchange: past it, a response being streamed is cut
(its client connection closed: nothing else can tell the client) and a request still
waiting for its head gets 504. An upstream that closes in the middle of its body
is cut the same way. The instance here is a scripted upstream in the
test's own loop, registered straight into the registry.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from tests.helpers import issue_api_key, wait_for_async
from tests.support.policy import update_service, wait_applied
from tests.support.registry import registered
from tests.webapi.conftest import fast_path
from tests.webapi.upstream_servers import Peer, Upstream, ok

pytestmark = pytest.mark.timeout(120)

TOTAL = 0.5  # the service's total timeout (s)
TRICKLE = 200  # chunks of the trickled answer, one every 50 ms: 10 s in all


async def _instance(peer: Peer) -> None:
    """`/slow-head` answers after 1.5 s (past the test gateway's 1 s read timeout, within
    the policy's head timeout); `/trickle`, `/nlp` and `/ai_server/` send their head at
    once and then a JSON body a byte every 50 ms, never silent for long; `/half` sends
    half its body and closes; `/endless-head` a head that does not end; the rest `ok`."""
    async for req in peer.requests():
        if req.target == "/half":
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
            peer.close()
            return
        if req.target == "/endless-head":
            await peer.send_endless(b"HTTP/1.1 200 OK\r\n", b"X-More: header\r\n")
            return
        if req.target == "/slow-head":
            await asyncio.sleep(1.5)
            await peer.send(ok(b"{}"))
        elif req.target in ("/trickle", "/nlp", "/ai_server/"):
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
            for _ in range(TRICKLE - 1):
                await peer.send(b"1\r\n \r\n")
                await asyncio.sleep(0.05)
            await peer.send(b"1\r\n1\r\n0\r\n\r\n")
        else:
            await peer.send(ok(req.target.encode()))


@dataclass
class Bounded:
    """One instance of `service` under a total timeout; `client` is at the gateway and
    carries no credential (`auth`: the admin's)."""

    gateway: str
    redis_url: str
    service: str
    instance: Upstream
    client: httpx.AsyncClient
    auth: dict[str, str]


@pytest.fixture
async def bounded(gateway: str, redis_url: str, auth: dict[str, str]) -> AsyncIterator[Bounded]:
    service = f"total{uuid.uuid4().hex[:6]}"
    doc = await update_service(redis_url, service, total_timeout=TOTAL, timeout=5)
    async with (
        Upstream(_instance) as instance,
        registered(redis_url, service, {f"{service}-a": instance.address}),
        httpx.AsyncClient(base_url=gateway, timeout=10) as client,
    ):

        async def known() -> bool:
            reply = await client.get(f"/svc/{service}/warm-up", headers=auth)
            return reply.status_code == 200

        await wait_for_async(known, timeout=10)
        await asyncio.to_thread(wait_applied, gateway, doc.version)
        yield Bounded(gateway, redis_url, service, instance, client, auth)


async def _cut_short(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> int:
    """GET an answer that starts (200) and whose connection closes before its end.
    The body bytes that came."""
    got = 0
    async with client.stream("GET", url, headers=headers) as reply:
        assert reply.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            async for chunk in reply.aiter_bytes():
                got += len(chunk)
    return got


@pytest.mark.parametrize(("target", "whole"), [("/trickle", TRICKLE), ("/half", 100)])
async def test_a_cut_answer_is_cut_for_the_client_on_both_paths(
    bounded: Bounded, target: str, whole: int
) -> None:
    # A fresh API key: its first request is Sanic's (the credential is not cached yet);
    # later ones take the fast path, straight onto an idle upstream connection.
    key = await asyncio.to_thread(issue_api_key, bounded.redis_url, [bounded.service],
                                  name="cut")  # fmt: skip
    headers = {"X-Api-Key": key}
    url = f"/svc/{bounded.service}{target}"
    direct = (await asyncio.to_thread(fast_path, bounded.gateway))["direct"]
    assert await _cut_short(bounded.client, url, headers) < whole
    assert (await asyncio.to_thread(fast_path, bounded.gateway))["direct"] == direct

    # An answered request leaves an idle connection for the fast path's direct exchange.
    answer = await bounded.client.get(f"/svc/{bounded.service}/fine", headers=headers)
    assert answer.status_code == 200 and answer.text == "/fine"
    direct = (await asyncio.to_thread(fast_path, bounded.gateway))["direct"]
    assert await _cut_short(bounded.client, url, headers) < whole
    assert (await asyncio.to_thread(fast_path, bounded.gateway))["direct"] == direct + 1

    # The instance is not blamed for a cut answer: it still serves.
    answer = await bounded.client.get(f"/svc/{bounded.service}/after", headers=headers)
    assert answer.status_code == 200 and answer.text == "/after"


async def test_a_head_that_does_not_end_is_a_502_on_both_paths(bounded: Bounded) -> None:
    # Within the total timeout: cut by the head's size limit, not by a deadline. A fresh
    # API key's first request is Sanic's; once cached, the fast path's direct exchange.
    key = await asyncio.to_thread(issue_api_key, bounded.redis_url, [bounded.service],
                                  name="endless")  # fmt: skip
    headers = {"X-Api-Key": key}
    url = f"/svc/{bounded.service}/endless-head"
    for fast in (False, True):
        direct = (await asyncio.to_thread(fast_path, bounded.gateway))["direct"]
        reply = await bounded.client.get(url, headers=headers)
        assert reply.status_code == 502
        error = reply.json()["error"]
        assert error["code"] == "upstream_failed"
        assert error["message"].endswith("response head over 65536 bytes")
        taken = (await asyncio.to_thread(fast_path, bounded.gateway))["direct"] > direct
        assert taken == fast
        # An answered request leaves an idle connection for the fast path's next try.
        answer = await bounded.client.get(f"/svc/{bounded.service}/fine", headers=headers)
        assert answer.status_code == 200


async def test_the_total_timeout_bounds_the_wait_for_the_head(bounded: Bounded) -> None:
    reply = await bounded.client.get(f"/svc/{bounded.service}/slow-head", headers=bounded.auth)
    assert reply.status_code == 504
    assert reply.json()["error"]["code"] == "upstream_timeout"


async def test_compatibility_endpoints_answer_504_when_the_answer_is_not_over_in_time(
    bounded: Bounded,
) -> None:
    body = {"service_name": bounded.service, "text": "x"}
    nlp = await bounded.client.post("/nlp", json=body, headers=bounded.auth)
    assert nlp.status_code == 504
    assert nlp.json()["error"]["code"] == "upstream_timeout"
    envelope = {"server_name": bounded.service, "params": {}, "data": {}}
    ai = await bounded.client.post("/ai_server/", json=envelope, headers=bounded.auth)
    assert ai.status_code == 504
    body = ai.json()
    assert (body["server_name"], body["status"], body["data"]) == (bounded.service, 504, None)
    assert body["error"]["code"] == "upstream_timeout"
