"""Methods a route does not take, through a real gateway process: a 405 with `Allow`,
whatever the credential (none, a user's, an admin's), and HEAD answered wherever GET
is (`common.router`). The access check used to take a request no route took for an
undeclared route: a wrong method got 401 without a credential, 403 with a user's,
and its 405 only with an admin's."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import issue_api_key
from tests.support.methods import assert_head_answers_as_get
from tests.support.raw_http import exchange

pytestmark = pytest.mark.timeout(60)

# (method, path, the Allow expected)
WRONG_METHODS = [
    ("DELETE", "/health", "GET, HEAD"),  # public
    ("GET", "/api/v1/auth/login", "POST"),  # public
    ("PUT", "/rpc/iptv/search", "POST"),
    ("HEAD", "/rpc/iptv/search", "POST"),  # no GET there: no HEAD either
    ("POST", "/admin/users", "GET, HEAD"),
    ("PROPFIND", "/svc/echo/x", "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"),
    ("TRACE", "/nowhere", "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"),  # the catch-all
]


@pytest.fixture(scope="module")
def credentials(redis_url: str, auth: dict[str, str]) -> dict[str, dict[str, str]]:
    user = issue_api_key(redis_url, ["iptv"], user_id="methods-user")
    return {"none": {}, "user": {"Authorization": f"Bearer {user}"}, "admin": auth}


@pytest.mark.parametrize(("method", "path", "allow"), WRONG_METHODS)
def test_a_wrong_method_is_a_405_with_allow_whatever_the_credential(
    gateway: str, credentials: dict[str, dict[str, str]], method: str, path: str, allow: str
) -> None:
    for who, headers in credentials.items():
        answer = httpx.request(method, gateway + path, headers=headers, timeout=5)
        assert answer.status_code == 405, (who, answer.text)
        assert answer.headers["allow"] == allow, who
        if method != "HEAD":
            error = answer.json()["error"]
            assert error["code"] == "method_not_allowed", who
            assert "None" not in error["message"]


def test_head_is_answered_as_get_without_the_body(gateway: str) -> None:
    assert_head_answers_as_get(f"{gateway}/health")


def test_head_needs_what_get_needs(gateway: str, redis_url: str) -> None:
    url = f"{gateway}/api/v1/channels"  # `iptv.list_channels`
    assert httpx.head(url, timeout=5).status_code == 401
    scopeless = {"Authorization": f"Bearer {issue_api_key(redis_url, ['auth'])}"}
    assert httpx.head(url, headers=scopeless, timeout=5).status_code == 403


def test_options_asterisk_is_a_405_whatever_the_credential(
    gateway: str, credentials: dict[str, dict[str, str]]
) -> None:
    for who, headers in credentials.items():
        fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head = f"OPTIONS * HTTP/1.1\r\nHost: gateway.test\r\n{fields}\r\n"
        answer = exchange(gateway, head.encode())
        assert answer.status == 405, (who, answer.body)
        assert answer.headers.get("allow") == "", who
        assert json.loads(answer.body)["error"]["code"] == "method_not_allowed"
