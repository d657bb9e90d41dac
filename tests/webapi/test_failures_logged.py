"""The gateway's own failures (502 `upstream_failed`, 503 `no_healthy_instance`, 504
`upstream_timeout`) in its log, through a real gateway process: each kind of failure
of each service logged in full 10 times a minute, then counted in one `gateway errors
not logged` line (`webapi.errors`, `common.log_budget`). Unbounded, a service down
under load wrote a warning line per request (4,800 for 4,800 requests in 9 s)."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import pytest

from tests.helpers import free_port, tcp_instance
from tests.support.registry import VIEWS_RESYNCED, registered
from tests.webapi.conftest import as_admin, gateway_process, running_gateway

pytestmark = pytest.mark.timeout(60)

# Requests from each of the clients (127.0.0.1 to .3), so many at once from each.
REQUESTS, AT_ONCE, CLIENTS = 150, 10, 3


@asynccontextmanager
async def _hung_instance() -> AsyncIterator[str]:
    """An instance that takes connections and never answers; its address."""

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async with tcp_instance(hang) as address:
        yield address


async def _burst(base: str, send: str, service: str) -> collections.Counter[int]:
    """`REQUESTS` requests to `service` from each client, `AT_ONCE` at a time: by the fast
    path (`/svc/`, `send` "fast") or Sanic's route (`/nlp`); the statuses answered."""
    statuses: collections.Counter[int] = collections.Counter()

    async def client(host: int) -> None:
        transport = httpx.AsyncHTTPTransport(local_address=f"127.0.0.{host}")
        async with httpx.AsyncClient(base_url=base, transport=transport, timeout=10,
                                     headers=as_admin.headers) as http:  # fmt: skip

            async def loop() -> None:
                for _ in range(REQUESTS // AT_ONCE):
                    if send == "fast":
                        answer = await http.get(f"/svc/{service}/x")
                    else:
                        answer = await http.post("/nlp", json={"service_name": service})
                    statuses[answer.status_code] += 1

            await asyncio.gather(*(loop() for _ in range(AT_ONCE)))

    await asyncio.gather(*(client(host) for host in range(1, CLIENTS + 1)))
    return statuses


async def test_a_failing_service_is_logged_ten_times_per_kind_then_counted(
    redis_url: str,
) -> None:
    down, hung, other = (f"{name}{uuid.uuid4().hex[:6]}" for name in ("down", "hung", "other"))
    with running_gateway(redis_url, PROXY_TIMEOUT="0.3") as base:
        process = gateway_process(base)
        async with _hung_instance() as hung_address, AsyncExitStack() as stack:
            for service, address in ((down, f"127.0.0.1:{free_port()}"), (hung, hung_address),
                                     (other, f"127.0.0.1:{free_port()}")):  # fmt: skip
                await stack.enter_async_context(
                    registered(redis_url, service, {f"{service}-a": address})
                )
            await asyncio.sleep(VIEWS_RESYNCED)  # every view knows them
            answered = {
                down: await _burst(base, "fast", down) + await _burst(base, "sanic", down),
                hung: await _burst(base, "fast", hung),
            }
            # Another service failing meanwhile: logged in full all the same.
            async with httpx.AsyncClient(base_url=base, headers=as_admin.headers) as http:
                answer = await http.get(f"/svc/{other}/x")
            answered[other] = collections.Counter({answer.status_code: 1})
        lines = process.log_records("gateway error")
        # Before: one line per request (1,351 here).
        assert len(lines) <= 10 * 5, collections.Counter(r.get("code") for r in lines)
        logged = collections.Counter((r["target_service"], r["status"], r["code"]) for r in lines)
        assert max(logged.values()) <= 10
        assert {(s, st) for s, st, _ in logged} >= {(down, 502), (down, 503), (hung, 504),
                                                   (other, 502)}  # fmt: skip
        assert all(r["message"] for r in lines)
        # Every failure is logged or counted: the counts are told as the gateway stops.
        process.stop()
        counted: collections.Counter[str] = collections.Counter()
        for summary in process.log_records("gateway errors not logged"):
            counted[summary["target_service"]] += summary["count"]
        for service, statuses in answered.items():
            failures = sum(n for status, n in statuses.items() if status >= 500)
            assert (
                sum(n for (s, _, _), n in logged.items() if s == service) + counted[service]
                == failures
            ), (service, statuses)
