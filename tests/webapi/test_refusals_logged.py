"""The gateway's refused requests in its log, through a real gateway process: each
logged in full with its client's address, up to `LOG_REFUSALS_PER_CLIENT` (10) a
minute per address, then counted in one `request refusals not logged` line
(`webapi.errors`, `common.log_budget`). A client sending made-up API keys in a loop
made three lines in four of the gateway's log in a soak."""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid

import httpx
import pytest

from common import apikeys
from common.settings import Settings
from tests.helpers import wait_for
from tests.support.policy import apply_routes
from tests.support.raw_http import connect, exchange, read_answers
from tests.support.registry import deregister, register
from tests.support.served import served
from tests.webapi.conftest import as_admin, gateway_process, running_gateway
from tests.webapi.upstream_servers import keep_alive, upstream_in_thread
from webapi.app import create_app

pytestmark = pytest.mark.timeout(60)


def _made_up_key() -> str:
    """A well-formed API key that no record has."""
    return apikeys.format_key(secrets.token_hex(6), secrets.token_urlsafe(32))


def test_a_client_refused_in_a_loop_is_logged_ten_times_then_counted(redis_url: str) -> None:
    with running_gateway(redis_url) as base:
        process = gateway_process(base)
        with httpx.Client(base_url=base, timeout=5) as flooding:
            for _ in range(50):
                answer = flooding.get("/api/v1/auth/me", headers={"X-Api-Key": _made_up_key()})
                assert answer.status_code == 401
        # Another client's refusal is logged in full: the budget is each address's own.
        other = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=base, transport=other, timeout=5) as client:
            assert client.get("/api/v1/auth/me").status_code == 401
        wait_for(lambda: len(process.log_records("request refused")) >= 11, timeout=5)
        refused = process.log_records("request refused")
        assert len(refused) == 11
        assert [r["client"] for r in refused] == ["127.0.0.1"] * 10 + ["127.0.0.2"]
        assert {r["code"] for r in refused[:10]} == {"unauthorized"}
        # The rest are counted: told once the minute is over, or (here) as the gateway stops.
        assert process.log_records("request refusals not logged") == []
        process.stop()
        summaries = process.log_records("request refusals not logged")
        assert [(s["client"], s["count"]) for s in summaries] == [("127.0.0.1", 40)]


def test_an_ipv6_client_is_bounded_by_its_64_not_per_address(redis_url: str) -> None:
    # A client holding a /64 (addresses given by a trusted proxy here) could spread its
    # refusals over as many budgets as it has addresses (up to the shared one, past
    # 1,000): ten lines a minute per address. One budget per /64 now.
    with running_gateway(redis_url, TRUSTED_PROXIES="127.0.0.1") as base:
        process = gateway_process(base)
        with httpx.Client(base_url=base, timeout=5) as proxy:
            for host in range(1, 16):
                forwarded = {"X-Forwarded-For": f"2001:db8::{host:x}"}
                assert proxy.get("/api/v1/auth/me", headers=forwarded).status_code == 401
        wait_for(lambda: len(process.log_records("request refused")) >= 10, timeout=5)
        refused = process.log_records("request refused")
        assert [r["client"] for r in refused] == [f"2001:db8::{h:x}" for h in range(1, 11)]
        process.stop()
        summaries = process.log_records("request refusals not logged")
        assert [(s["client"], s["count"]) for s in summaries] == [("2001:db8::/64", 5)]


def test_the_fast_paths_refusals_name_the_client_behind_a_trusted_proxy(redis_url: str) -> None:
    # The fast path logged the refusals it makes itself (a held body's 408, a
    # pass-through route's connect failure) under the socket's peer: behind a trusted
    # proxy, every client shared the proxy's budget and the lines named the proxy.
    ghost = f"ghost{uuid.uuid4().hex[:6]}"  # a pass-through route's never-registered service
    with running_gateway(redis_url, TRUSTED_PROXIES="127.0.0.1", REQUEST_TIMEOUT="0.5") as base:
        process = gateway_process(base)
        apply_routes(base, redis_url, [{"prefix": "/nowhere/", "service": ghost, "public": True,
                                        "strip_prefix": False, "passthrough": True}])  # fmt: skip
        try:
            # The admin key in the gateway's cache: the fast path holds a request for its body.
            assert as_admin.get(f"{base}/admin/proxy/stats", timeout=5).status_code == 200
            answer = exchange(base, b"GET /nowhere/x HTTP/1.1\r\nHost: gateway.test\r\n"
                              b"X-Forwarded-For: 203.0.113.7\r\n\r\n")  # fmt: skip
            assert answer.status == 404  # unknown_service
            head = (f"POST /svc/{ghost}/upload HTTP/1.1\r\nHost: gateway.test\r\n"
                    f"{as_admin.field_lines()}X-Forwarded-For: 203.0.113.8\r\n"
                    "Content-Length: 100\r\n\r\n{")  # fmt: skip
            assert exchange(base, head.encode()).status == 408  # the body stalled
        finally:
            apply_routes(base, redis_url, [])
        wait_for(lambda: len(process.log_records("request refused")) >= 2, timeout=5)
        refused = process.log_records("request refused")
        assert [(r["client"], r["status"]) for r in refused] == [
            ("203.0.113.7", 404),
            ("203.0.113.8", 408),
        ]


def test_a_splices_refusals_of_a_held_head_name_the_socket_peer(redis_url: str) -> None:
    # A splice's head deadline (408) and a checked splice's head bound (431) answer the
    # head it holds, not whole: not read, whatever `X-Forwarded-For` line it holds, so
    # logged under the socket's peer (the trusted proxy here). A whole request pipelined
    # before that head was held with it, and the 408 answered it (logged under the
    # peer, then under its own client): it is forwarded now, and the instance answers it.
    service = f"held{uuid.uuid4().hex[:6]}"
    with (
        upstream_in_thread(keep_alive) as instance,
        running_gateway(redis_url, TRUSTED_PROXIES="127.0.0.1", REQUEST_TIMEOUT="0.5") as base,
    ):
        process = gateway_process(base)
        asyncio.run(register(redis_url, service, {f"{service}-a": instance.address}))
        splice = {"service": service, "public": True, "strip_prefix": False, "passthrough": True}
        apply_routes(base, redis_url, [{"prefix": "/held/", **splice},
                                       {"prefix": "/tun/", "tunnel": True, **splice}])  # fmt: skip
        whole = b"GET /held/a HTTP/1.1\r\nHost: g\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n"
        stalled = b"GET /held/b HTTP/1.1\r\nHost: g\r\nX-Forwarded-For: 203.0.113.10\r\nX-S"
        oversized = stalled.replace(b"/b", b"/c") + b"a" * 70_000
        try:
            for sent, statuses in ((whole + stalled, [200, 408]),
                                   (stalled.replace(b"/held/", b"/tun/"), [408]),
                                   (oversized, [431])):  # fmt: skip
                with connect(base) as sock:
                    sock.sendall(sent)
                    assert [a.status for a in read_answers(sock, len(statuses))] == statuses
        finally:
            apply_routes(base, redis_url, [])
            asyncio.run(deregister(redis_url, service, f"{service}-a"))
        wait_for(lambda: len(process.log_records("request refused")) >= 3, timeout=5)
        refused = process.log_records("request refused")
        assert [(r["path"], r["client"], r["status"]) for r in refused] == [
            ("/held/b", "127.0.0.1", 408),
            ("/tun/b", "127.0.0.1", 408),
            ("/held/c", "127.0.0.1", 431),
        ]


async def test_two_gateways_in_one_process_keep_their_own_budgets(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The budgets were a module global: two gateway apps in one process shared them, and
    # the limit of the last one started. Each app's budgets are its own now.
    caplog.set_level(logging.INFO, logger="webapi.errors")
    apps = [create_app(Settings(redis_url=redis_url, log_refusals_per_client=limit),
                       name=f"refusals{limit}_{uuid.uuid4().hex[:6]}")
            for limit in (2, 5)]  # fmt: skip
    logged = []
    async with served(apps[0]) as first, served(apps[1]) as second:
        for base in (first, second):
            async with httpx.AsyncClient(base_url=base, timeout=5) as client:
                for _ in range(6):
                    assert (await client.get("/api/v1/auth/me")).status_code == 401
            logged.append(sum(r.message == "request refused" for r in caplog.records))
    assert logged == [2, 2 + 5]  # from one address: each app's limit, in its own budget
    # Each app told its own count as it stopped (`after_server_stop`).
    summaries = [r for r in caplog.records if r.message == "request refusals not logged"]
    assert sorted(r.__dict__["fields"]["count"] for r in summaries) == [6 - 5, 6 - 2]
