"""Policy routes whose prefix starts with the letters of a gateway path (README's
`/nlp-api/`, `/healthz/`) through a real gateway and backend: accepted, proxied, and
the gateway's own `/nlp` and `/health` still its own; a prefix that shares a path
segment with them is refused."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.policy import set_document, wait_applied
from tests.webapi.conftest import Backend, as_admin

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def routed(backend: Backend) -> Iterator[Backend]:
    """README's route example, `/nlp-api/`, and a public `/healthz/`, to the backend."""
    service = backend.service
    doc = set_document(backend.redis_url, routes=[
        {"prefix": "/nlp-api/", "service": service, "strip_prefix": True, "public": False},
        {"prefix": "/healthz/", "service": service, "public": True},
    ])  # fmt: skip
    try:
        wait_applied(backend.gateway, doc.version, timeout=5)
        yield backend
    finally:
        set_document(backend.redis_url, routes=[])


def test_routes_next_to_the_gateways_paths_are_proxied_and_leave_them_alone(
    routed: Backend,
) -> None:
    base = routed.gateway
    proxied = as_admin.get(f"{base}/nlp-api/echo", timeout=5)
    assert proxied.status_code == 200, proxied.text
    assert proxied.json()["path"] == "/echo"  # the prefix stripped
    assert httpx.get(f"{base}/nlp-api/echo", timeout=5).status_code == 401  # not public
    public = httpx.get(f"{base}/healthz/echo", timeout=5)
    assert public.status_code == 200 and public.json()["instance"] == f"{routed.service}-a"

    health = httpx.get(f"{base}/health", timeout=5)  # the gateway's own, not the route
    assert health.status_code == 200 and "policy_version" in health.json()
    nlp = as_admin.post(f"{base}/nlp", json={"service_name": routed.service}, timeout=5)
    assert nlp.status_code == 200, nlp.text  # the compatibility route: the backend's /nlp
    assert nlp.json()["echo"] == {"service_name": routed.service}


@pytest.mark.parametrize("prefix", ["/nlp/", "/health/", "/api/v2/"])
def test_a_route_sharing_a_segment_with_a_gateway_path_is_refused(
    gateway: str, prefix: str
) -> None:
    route = {"prefix": prefix, "service": "web"}
    checked = as_admin.post(f"{gateway}/admin/policy/validate", json={"routes": [route]})
    assert checked.status_code == 422, checked.text
    detail = checked.json()["error"]["details"][0]
    assert detail["loc"] == "routes[0].prefix"
    assert "overlaps the gateway's reserved prefix" in detail["msg"]
