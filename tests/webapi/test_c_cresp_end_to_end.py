"""`webapi.proxy._cresp`, the C read of a whole upstream response (issue 4), end to end:
through the upstream pool's real sockets, and through a real gateway's fast path with
the C (behind a spy) and without: the same answers, on reused upstream connections.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import httpx
import pytest

import webapi.proxy.connection as connection
from tests.helpers import ServiceProcess, free_port, wait_for
from tests.webapi.conftest import Backend, as_admin, fast_path, running_backend, running_gateway
from tests.webapi.cresp_fixtures import (  # noqa: F401  (the `cresp` fixture)
    CORPUS,
    Spy,
    cresp_module,
)
from tests.webapi.upstream_servers import Peer, Upstream
from webapi.proxy import UpstreamPool

pytestmark = pytest.mark.timeout(120)


# Through the pool's real sockets (`exchange()`: the coroutine path).


async def test_the_pool_reads_whole_responses_with_the_c_and_reuses_its_connection(
    cresp: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    responses = [response for head_request, response in CORPUS if not head_request]
    responses = [r for r in responses if b"close" not in r.lower()]

    async def handler(peer: Peer) -> None:
        for response in responses:
            if await peer.request() is None:
                return
            await peer.send(response)

    async def fetch_all(c: object) -> tuple[list[Any], int]:
        monkeypatch.setattr(connection, "_C", c)
        got = []
        async with Upstream(handler) as up, UpstreamPool(connect_timeout=2, read_timeout=5) as pool:
            for _ in responses:
                resp = await pool.request(up.address, "GET", "/", [])
                got.append((resp.status, resp.reason, resp.headers, await resp.read()))
                await resp.aclose()
        return got, up.connections

    spy = Spy(cresp)
    assert await fetch_all(spy) == await fetch_all(None)
    assert spy.answers == len(responses) > 20  # each read whole, by the C
    assert (await fetch_all(spy))[1] == 1  # one connection: each time back to the pool


# Through a real gateway: its fast path with the C (behind a spy) and without.

_SPY_GATEWAY = """
import json, runpy
import webapi.proxy.connection as connection
real = connection._C
assert real is not None, "SWITCHBOARD_C=1 with the build used: the C is on"
class Spy:
    def parse_response(self, data, head_request):
        whole = real.parse_response(data, head_request)
        print(json.dumps({"msg": "cresp", "answered": whole is not None}), flush=True)
        return whole
connection._C = Spy()
runpy.run_module("webapi", run_name="__main__", alter_sys=True)
"""


@contextmanager
def spied_gateway(redis_url: str) -> Iterator[tuple[str, ServiceProcess]]:
    """A gateway process as `running_gateway`'s, with the C on and behind a spy that
    logs each of its answers (`{"msg": "cresp"}`)."""
    port = free_port()
    env = {
        "REDIS_URL": redis_url,
        "WEBAPI_PORT": str(port),
        "HEARTBEAT_TTL": "1.5",
        "PROXY_TIMEOUT": "1",
        "SWITCHBOARD_C": "1",
    }
    proc = ServiceProcess(["python", "-c", _SPY_GATEWAY], env=env, name="webapi-cresp").start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: not proc.alive() or _up(base), timeout=30)
        assert proc.alive(), f"the gateway exited:\n{proc.log_tail()}"
        yield base, proc
    finally:
        proc.stop()


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _answers(backend: Backend, requests: list[tuple[str, str, bytes]]) -> list[Any]:
    """Each answer's status, fields and body, but for what differs from one gateway to
    the other: the latencies, and the gateway's address (`X-Forwarded-Host`, echoed)."""
    got = []
    gateway = backend.gateway.removeprefix("http://").encode()
    with httpx.Client(headers=as_admin.headers, timeout=10) as client:
        for i, (method, path, body) in enumerate(requests):
            reply = client.request(
                method, f"{backend.base}{path}", content=body, headers={"X-Request-Id": f"r{i}"}
            )
            assert reply.headers["x-request-id"] == f"r{i}"
            skipped = ["x-upstream-latency", "x-gateway-latency"]
            if method != "HEAD":  # the body's length: it varies with the gateway's address
                assert int(reply.headers.get("content-length", 0)) == len(reply.content)
                skipped.append("content-length")
            fields = [(k, v) for k, v in reply.headers.multi_items() if k not in skipped]
            got.append((reply.status_code, fields, reply.content.replace(gateway, b"GATEWAY")))
    return got


def test_the_gateway_answers_the_same_with_the_c_and_reuses_upstream_connections(
    cresp: ModuleType, redis_url: str
) -> None:
    requests = [("GET", f"/echo?n={i}", b"") for i in range(12)]
    requests += [
        ("HEAD", "/echo", b""),
        ("GET", "/status/204", b""),
        ("GET", "/status/304", b""),
        ("GET", "/status/404", b""),
        ("POST", "/nlp", b'{"text": "bonjour"}'),
        ("GET", "/echo?last=1", b""),
    ]
    with spied_gateway(redis_url) as (on, proc), running_backend(on, redis_url) as backend:
        before, direct = len(proc.log_records("cresp")), fast_path(on)["direct"]
        with_c = _answers(backend, requests)
        records = proc.log_records("cresp")[before:]
        assert fast_path(on)["direct"] - direct == len(requests)  # each on an idle connection
        with running_gateway(redis_url, SWITCHBOARD_C="0") as off:
            off_backend = Backend(off, redis_url, backend.service)  # the same instance
            wait_for(lambda: as_admin.get(f"{off_backend.base}/echo").status_code == 200)
            assert _answers(off_backend, requests) == with_c
    assert with_c[0][0] == 200 and json.loads(with_c[0][2])["query"] == "n=0"
    assert [status for status, _, _ in with_c[12:16]] == [405, 204, 304, 404]
    assert len(records) == len(requests)
    assert all(record["answered"] for record in records)
