"""What a refusal's message says, through a real gateway process: what the request
asked for, never a placeholder of the gateway's (`None`), and a client's bytes escaped
rather than decoded into characters it never sent."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import issue_api_key
from tests.support.raw_http import exchange

pytestmark = pytest.mark.timeout(60)


def test_a_scope_refusal_for_an_internal_services_http_routes_names_no_none(
    gateway: str, redis_url: str
) -> None:
    user = issue_api_key(redis_url, ["*"], user_id="messages-user")
    answer = httpx.get(f"{gateway}/svc/auth/x", headers={"Authorization": f"Bearer {user}"})
    assert answer.status_code == 403
    message = answer.json()["error"]["message"]
    assert message == "this credential's scopes do not include admin.auth"


def test_a_header_name_that_is_not_ascii_is_quoted_escaped(gateway: str) -> None:
    answer = exchange(
        gateway, b"GET /health HTTP/1.1\r\nHost: gateway.test\r\nX-\xc3\xa9: 1\r\n\r\n"
    )
    assert answer.status == 400
    error = json.loads(answer.body)["error"]
    assert error["code"] == "malformed_header"
    assert error["message"] == "malformed header field name 'X-\\xc3\\xa9'"
