"""The gateway's `rpc error` warnings (an RPC route's 5xx: no live instance, a timeout,
a handler crash) in its log, through a real gateway process: each kind of failure of
each service logged in full 10 times a minute, then counted in one `rpc errors not
logged` line (`webapi.errors`, `common.log_budget`). Unbounded, an RPC service down
under load wrote a warning line per request."""

from __future__ import annotations

import asyncio
import collections
import uuid

import httpx
import pytest

from tests.helpers import serve_until_live
from tests.support.calc_service import build
from tests.webapi.conftest import as_admin, gateway_process, running_gateway

pytestmark = pytest.mark.timeout(60)

# Requests to each service, so many at once.
REQUESTS, AT_ONCE = 60, 10


async def _burst(
    http: httpx.AsyncClient, url: str, body: dict[str, object], requests: int = REQUESTS
) -> list[int]:
    """`requests` calls of `url`, `AT_ONCE` at a time; the statuses answered."""
    statuses: list[int] = []

    async def loop() -> None:
        for _ in range(requests // AT_ONCE):
            statuses.append((await http.post(url, json=body)).status_code)

    await asyncio.gather(*(loop() for _ in range(AT_ONCE)))
    return statuses


async def test_a_failing_rpc_service_is_logged_ten_times_per_kind_then_counted(
    redis_url: str,
) -> None:
    tag = uuid.uuid4().hex[:6]
    crashing = [build(f"crash{tag}{n}") for n in "ab"]  # two services whose handler crashes
    tasks = [await serve_until_live(svc, redis_url) for svc in crashing]
    gone = f"gone{tag}"  # served once, stopped: no live instance, 503
    stopped = await serve_until_live(build(gone), redis_url)
    stopped.cancel()
    await asyncio.gather(stopped, return_exceptions=True)
    try:
        with running_gateway(redis_url, RPC_TIMEOUT="0.3") as base:
            process = gateway_process(base)
            async with httpx.AsyncClient(base_url=base, timeout=10,
                                         headers=as_admin.headers) as http:  # fmt: skip
                answered = {
                    crashing[0].name: await _burst(http, f"/rpc/{crashing[0].name}/fail", {})
                    + await _burst(http, f"/rpc/{crashing[0].name}/sleep", {"seconds": 1}, 20),
                    crashing[1].name: await _burst(http, f"/rpc/{crashing[1].name}/fail", {}),
                    gone: await _burst(http, f"/rpc/{gone}/x", {}),
                }
            lines = process.log_records("rpc error")
            # Before: one line per request (200 here).
            assert len(lines) <= 10 * 4, collections.Counter(r.get("code") for r in lines)
            logged = collections.Counter(
                (r["target_service"], r["status"], r["code"]) for r in lines
            )
            assert max(logged.values()) <= 10
            # A crash of each service is logged: they share no budget.
            assert set(logged) == {
                (crashing[0].name, 502, "remote_error"), (crashing[0].name, 504, "timeout"),
                (crashing[1].name, 502, "remote_error"), (gone, 503, "service_unavailable"),
            }  # fmt: skip
            assert all(r["service"] == "webapi" for r in lines)
            # Every failure is logged or counted: the counts are told as the gateway stops.
            process.stop()
            counted: collections.Counter[str] = collections.Counter()
            for summary in process.log_records("rpc errors not logged"):
                counted[summary["target_service"]] += summary["count"]
            for service, statuses in answered.items():
                assert all(status >= 500 for status in statuses), statuses
                mine = sum(n for (s, _, _), n in logged.items() if s == service)
                assert mine + counted[service] == len(statuses), service
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
