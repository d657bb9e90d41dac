"""Responses whose upstream body fails after their head was written (the gateway can only
close the client's connection) in the gateway's log, through a real gateway process:
`upstream body failed` 10 times a minute per service, then counted in one `upstream body
failures not logged` line (`webapi.errors.log_cut`), on each path that relays a body:
the fast path's coroutine and its direct exchange, and Sanic's `/svc/` route.
Unbounded, an instance cutting its answers wrote a warning line per request."""

from __future__ import annotations

import asyncio
import collections
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from functools import partial

import httpx
import pytest

from tests.helpers import tcp_instance
from tests.support.raw_http import Answer, connect, raw_request, read_answers
from tests.support.registry import VIEWS_RESYNCED, registered
from tests.webapi.conftest import as_admin, gateway_process, running_gateway

pytestmark = pytest.mark.timeout(60)

REQUESTS, AT_ONCE = 60, 10
WHOLE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CUT = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10  # then closed


def _cutting_instance(whole_first: bool, cut: bytes = CUT) -> AbstractAsyncContextManager[str]:
    """An instance that cuts its answer's body (`cut`, then closes): on each connection's
    first request, or (`whole_first`) on its second, the first answered whole, so the
    gateway sends the second on its idle pooled connection (the fast path's direct
    exchange). Its address."""
    return _answering(lambda: (WHOLE, cut) if whole_first else (cut,))


@asynccontextmanager
async def _answering(answers: Callable[[], Iterable[bytes]]) -> AsyncIterator[str]:
    """An instance giving each connection the `answers()` in turn, one a request, then
    closing it (never, for an endless `answers()`). Its address."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for answer in answers():
                head = await reader.readuntil(b"\r\n\r\n")
                if b"chunked" in head.lower():  # Sanic's route: the body whole first
                    await reader.readuntil(b"0\r\n\r\n")
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async with tcp_instance(serve) as address:
        yield address


def _one_after_another(base: str, path: str, count: int) -> list[Answer]:
    """`count` GETs of `path`, one after another on one keep-alive connection: the
    answers, up to the gateway's closing it."""
    answers: list[Answer] = []
    with connect(base) as sock:
        for _ in range(count):
            try:
                sock.sendall(raw_request("GET", path, as_admin.headers))
                answers += read_answers(sock, 1)
            except (AssertionError, OSError):  # closed before an answer
                break
    return answers


async def _burst(http: httpx.AsyncClient, service: str, sanic: bool = False) -> int:
    """`REQUESTS` requests to `service`, `AT_ONCE` at a time: by the fast path, or
    (`sanic`) with a chunked body, which only Sanic's route takes. How many were cut."""
    cut = 0

    async def body() -> AsyncIterator[bytes]:
        yield b"x"

    async def loop() -> None:
        nonlocal cut
        for _ in range(REQUESTS // AT_ONCE):
            try:
                if sanic:
                    await http.post(f"/svc/{service}/x", content=body())
                else:
                    await http.get(f"/svc/{service}/x")
            except httpx.RemoteProtocolError:
                cut += 1

    await asyncio.gather(*(loop() for _ in range(AT_ONCE)))
    return cut


async def test_cut_answers_are_logged_ten_times_per_service_then_counted(
    redis_url: str,
) -> None:
    first, second = (f"{name}{uuid.uuid4().hex[:6]}" for name in ("cutfirst", "cutsecond"))
    with running_gateway(redis_url) as base:
        process = gateway_process(base)
        async with AsyncExitStack() as stack:
            for service, whole_first in ((first, False), (second, True)):
                address = await stack.enter_async_context(_cutting_instance(whole_first))
                await stack.enter_async_context(
                    registered(redis_url, service, {f"{service}-a": address})
                )
            await asyncio.sleep(VIEWS_RESYNCED)  # every view knows them
            async with httpx.AsyncClient(base_url=base, timeout=10,
                                         headers=as_admin.headers) as http:  # fmt: skip
                cuts = {
                    first: await _burst(http, first) + await _burst(http, first, sanic=True),
                    second: await _burst(http, second),
                }
        assert cuts[first] == 2 * REQUESTS and cuts[second] > 0, cuts
        lines = process.log_records("upstream body failed")
        # Before: one line per cut answer (150 and more here).
        logged = collections.Counter(r["target_service"] for r in lines)
        assert logged == {first: 10, second: 10}, logged
        assert all(r["service"] == "webapi" and r["error"] for r in lines)
        # Every cut is logged or counted: the counts are told as the gateway stops.
        process.stop()
        counted: collections.Counter[str] = collections.Counter()
        for summary in process.log_records("upstream body failures not logged"):
            counted[summary["target_service"]] += summary["count"]
        # Exactly: a whole answer is never counted (`test_a_whole_answer_after_...`).
        assert logged[first] + counted[first] == cuts[first]
        assert logged[second] + counted[second] == cuts[second]


async def test_a_body_failing_before_the_head_is_written_is_answered_as_sanic_answers_it(
    redis_url: str,
) -> None:
    """A body that fails in the read its head came in (a malformed chunk): nothing is
    written yet, so the fast path answers an error, the proxy's own 502
    `upstream_failed` (`client_error`), as Sanic's routes answer a failed body; not
    the raw upstream error (502 `upstream_protocol_error`, logged as an `rpc error`)."""
    service = f"badchunk{uuid.uuid4().hex[:6]}"
    bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    with running_gateway(redis_url) as base:
        process = gateway_process(base)
        async with (
            _cutting_instance(True, bad) as address,
            registered(redis_url, service, {f"{service}-a": address}),
        ):
            await asyncio.sleep(VIEWS_RESYNCED)  # every view knows it
            async with httpx.AsyncClient(base_url=base, timeout=10,
                                         headers=as_admin.headers) as http:  # fmt: skip
                answers = [await http.get(f"/svc/{service}/x") for _ in range(4)]
        failed = [a for a in answers if a.status_code != 200]
        assert failed, [a.text for a in answers]
        assert {(a.status_code, a.json()["error"]["code"]) for a in failed} == {
            (502, "upstream_failed")}  # fmt: skip
        assert process.log_records("rpc error") == []
        assert {r["target_service"] for r in process.log_records("gateway error")} == {service}


async def test_a_whole_answer_after_a_cut_one_is_not_cut(redis_url: str) -> None:
    """A whole answer from the fast path's coroutine, after that coroutine handled a cut
    answer of another service: written whole, not logged as cut, and its client's
    keep-alive connection kept. Before, compiled by mypyc, the `finally` holding an
    `await` re-raised the exception the earlier cut left in `sys.exc_info()` after the
    whole answer was written: `upstream body failed` under the good answer's request id,
    and its client's connection closed."""
    cutting, whole = (f"{name}{uuid.uuid4().hex[:6]}" for name in ("cutter", "whole"))
    with running_gateway(redis_url) as base:
        process = gateway_process(base)
        async with (
            _cutting_instance(False) as cut_address,
            _answering(partial(itertools.repeat, WHOLE)) as whole_address,
            registered(redis_url, cutting, {f"{cutting}-a": cut_address}),
            registered(redis_url, whole, {f"{whole}-a": whole_address}),
        ):
            await asyncio.sleep(VIEWS_RESYNCED)  # every view knows them
            async with httpx.AsyncClient(base_url=base, timeout=10,
                                         headers=as_admin.headers) as http:  # fmt: skip
                # Sanic's route (the credential is not cached yet), then the coroutine's
                # (the instance closes each connection it cuts: none is idle to send on).
                for _ in range(2):
                    with pytest.raises(httpx.RemoteProtocolError):
                        await http.get(f"/svc/{cutting}/x")
            # The first on a new connection (the coroutine), the next on it (direct).
            answers = await asyncio.to_thread(_one_after_another, base, f"/svc/{whole}/x", 3)
        assert [(a.status, a.body) for a in answers] == [(200, b"ok")] * 3
        logged = collections.Counter(r["target_service"] for r in process.log_records(
            "upstream body failed"))  # fmt: skip
        assert logged == {cutting: 2}, logged
