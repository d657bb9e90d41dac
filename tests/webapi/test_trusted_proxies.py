"""The client IP behind a trusted proxy (`TRUSTED_PROXIES`) that adds its own
`X-Forwarded-For` field line after the client's (HAProxy's `option forwardfor`): every
line counts, joined in order into one list (RFC 9110 §5.3), so the address the proxy
wrote is the client's, not the one the client wrote itself. Read so on Sanic's route (IP
rate limits) and on the fast path (`hash_on: client_ip`); what the instance receives is
the same list with the peer appended.

A real gateway trusting 127.0.0.1 (this test, the "proxy"), two real backends.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import issue_api_key, wait_for
from tests.support.policy import set_document, set_service, wait_applied
from tests.webapi.conftest import (
    Backend,
    as_admin,
    fast_path,
    http_instance,
    running_backend,
    running_gateway,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pair(redis_url: str) -> Iterator[Backend]:
    """Two instances of one service behind a gateway that trusts 127.0.0.1."""
    with (
        running_gateway(redis_url, TRUSTED_PROXIES="127.0.0.1") as gateway,
        running_backend(gateway, redis_url) as b,
    ):
        api_key = issue_api_key(redis_url, ["registry"], name="xff-backend")
        second = http_instance(gateway, api_key, b.service, f"{b.service}-b")
        try:
            wait_for(lambda: len(_instances(b)) == 2, timeout=30)
            yield b
        finally:
            second.stop()


def _instances(b: Backend) -> list[str]:
    body = httpx.get(f"{b.gateway}/health", timeout=5).json()
    return list(body["services"].get(b.service, {}).get("instances", []))


def _echo(b: Backend, *lines: str) -> httpx.Response:
    """GET /echo through the gateway with one `X-Forwarded-For` field line per `lines`."""
    headers = [*as_admin.headers.items(), *(("X-Forwarded-For", line) for line in lines)]
    return httpx.get(f"{b.base}/echo", headers=headers, timeout=10)


def test_an_ip_rate_limit_reads_the_proxys_line_not_the_clients(pair: Backend) -> None:
    rule = {"id": f"xff{uuid.uuid4().hex[:6]}", "service": pair.service, "key": "ip",
            "rate": 1, "period": 60, "burst": 3}  # fmt: skip
    version = set_document(pair.redis_url, limits=[rule]).version
    try:
        wait_applied(pair.gateway, version)
        # One client (the proxy's line) writing a new address in its own line each time.
        answers = [_echo(pair, f"198.51.100.{i}", "203.0.113.8") for i in range(5)]
        assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
        seen = answers[0].json()["headers"]["x-forwarded-for"]
        assert seen == "198.51.100.0, 203.0.113.8, 127.0.0.1"
        # Another client behind the same proxy has its own allowance.
        assert _echo(pair, "198.51.100.0", "203.0.113.80").status_code == 200
    finally:
        set_document(pair.redis_url, limits=[])


def test_hash_on_client_ip_reads_every_line_on_the_fast_path(pair: Backend) -> None:
    doc = set_service(pair.redis_url, pair.service, strategy="hash", hash_on="client_ip")
    wait_applied(pair.gateway, doc.version)
    before = fast_path(pair.gateway)["answered"]

    def owners(client: str) -> set[str]:
        replies = [_echo(pair, f"198.51.100.{i}", client) for i in range(6)]
        assert all(r.status_code == 200 for r in replies)
        seen = replies[-1].json()["headers"]["x-forwarded-for"]
        assert seen == f"198.51.100.5, {client}, 127.0.0.1"
        return {r.json()["instance"] for r in replies}

    spread = [owners(f"203.0.113.{k}") for k in range(10)]
    assert all(len(owner) == 1 for owner in spread), spread
    assert len(set().union(*spread)) == 2  # different clients land on different instances
    assert fast_path(pair.gateway)["answered"] >= before + 60  # the fast path's reading
