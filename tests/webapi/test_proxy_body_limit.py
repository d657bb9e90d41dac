"""The proxy's request body limit: the live policy's `max_body` for a service, else
PROXY_MAX_BODY. A body over it is a 413 with the JSON error body, and the instance
never sees the request, whichever path (fast path, Sanic's route, compatibility
endpoint) would have carried it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.policy import set_service, wait_applied
from tests.webapi.conftest import Backend, as_admin, running_backend

pytestmark = pytest.mark.timeout(120)

LIMIT = 1000


@pytest.fixture(scope="module")
def limited(gateway: str, redis_url: str) -> Iterator[Backend]:
    """A backend whose service takes bodies of at most `LIMIT` bytes."""
    with running_backend(gateway, redis_url) as b:
        doc = set_service(redis_url, b.service, max_body=LIMIT)
        wait_applied(gateway, doc.version)
        yield b


def _uploads(b: Backend) -> int:
    return int(as_admin.get(f"{b.base}/admin/state", timeout=5).json()["uploads"])


def _refused(reply: httpx.Response) -> bool:
    return reply.status_code == 413 and reply.json()["error"]["code"] == "payload_too_large"


def test_a_body_at_the_limit_goes_through(limited: Backend) -> None:
    reply = as_admin.post(f"{limited.base}/upload", content=b"x" * LIMIT)
    assert reply.status_code == 200 and reply.json()["bytes"] == LIMIT


def test_a_declared_body_over_the_limit_is_refused_before_any_instance_sees_it(
    limited: Backend,
) -> None:
    before = _uploads(limited)
    # Small enough for the fast path, which leaves it to the route's 413.
    assert _refused(as_admin.post(f"{limited.base}/upload", content=b"x" * (LIMIT + 1)))
    # Larger than the fast path takes: the route itself.
    assert _refused(as_admin.post(f"{limited.base}/upload", content=b"x" * 200_000))
    assert _uploads(limited) == before


def test_a_chunked_body_over_the_limit_is_refused(limited: Backend) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(4):
            yield b"y" * 400

    assert _refused(as_admin.post(f"{limited.base}/upload", content=chunks()))
    # The instance's connection that had the body's start is not used again: the next
    # upload arrives whole.
    reply = as_admin.post(f"{limited.base}/upload", content=b"z" * 10)
    assert reply.status_code == 200 and reply.json()["bytes"] == 10


def test_the_compatibility_endpoints_take_the_services_limit(limited: Backend) -> None:
    small = as_admin.post(f"{limited.gateway}/nlp", json={"service_name": limited.service})
    assert small.status_code == 200
    big = {"service_name": limited.service, "text": "w" * LIMIT}
    assert _refused(as_admin.post(f"{limited.gateway}/nlp", json=big))
