"""Methods a route does not take, on the websocket service as at the gateway
(`common.router`): a 405 with `Allow` whatever the credential (none, a bad one, one
whose scopes reach nothing here, one reaching everything), a path no route takes a
404 likewise, and HEAD answered wherever GET is, but on a WebSocket route, whose GET
is an upgrade. The upgrade's access check used to run for a request no route took:
`POST /ws/stream` or `DELETE /ws/proxy/...` without a credential got 401, and its 405
only with a valid credential."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.methods import assert_head_answers_as_get
from tests.support.raw_http import exchange
from tests.websocket.conftest import WsServer

pytestmark = pytest.mark.timeout(60)

# (method, path, the Allow expected)
WRONG_METHODS = [
    ("POST", "/ws/stream", "GET"),
    ("DELETE", "/ws", "GET"),
    ("PUT", "/ws/proxy/svc/x", "GET"),
    ("PATCH", "/ws/proxy/svc", "GET"),
    ("HEAD", "/ws/stream", "GET"),  # an upgrade is a GET: no HEAD of it
    ("HEAD", "/ws/proxy/svc/x", "GET"),
    ("DELETE", "/health", "GET, HEAD"),
    ("POST", "/health", "GET, HEAD"),
]


@pytest.fixture(scope="module")
def credentials(ws_server: WsServer) -> dict[str, dict[str, str]]:
    forged = ws_server.token()[:-8] + "AAAAAAAA"  # a signature that does not verify
    return {
        "none": {},
        "bad": {"Authorization": f"Bearer {forged}"},
        "scopeless": {"Authorization": f"Bearer {ws_server.token(scopes=('auth',))}"},
        "all": ws_server.bearer(),
    }


@pytest.mark.parametrize(("method", "path", "allow"), WRONG_METHODS)
def test_a_wrong_method_is_a_405_with_allow_whatever_the_credential(
    ws_server: WsServer, credentials: dict[str, dict[str, str]], method: str, path: str, allow: str
) -> None:
    url = f"http://{ws_server.address}{path}"
    for who, headers in credentials.items():
        answer = httpx.request(method, url, headers=headers, timeout=5)
        assert answer.status_code == 405, (who, answer.text)
        assert answer.headers["allow"] == allow, who
        if method != "HEAD":
            error = answer.json()["error"]
            assert error["code"] == "method_not_allowed", who
            assert error["message"] == f"{method} is not allowed for {path}", who


def test_an_unknown_path_is_a_404_whatever_the_credential(
    ws_server: WsServer, credentials: dict[str, dict[str, str]]
) -> None:
    for who, headers in credentials.items():
        answer = httpx.get(f"http://{ws_server.address}/ws/nothing", headers=headers, timeout=5)
        assert answer.status_code == 404, (who, answer.text)
        assert answer.json()["error"]["code"] == "not_found", who


def test_head_health_is_answered_as_get_without_the_body(ws_server: WsServer) -> None:
    assert_head_answers_as_get(f"http://{ws_server.address}/health")


def test_options_asterisk_is_a_405_whatever_the_credential(
    ws_server: WsServer, credentials: dict[str, dict[str, str]]
) -> None:
    for who, headers in credentials.items():
        fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head = f"OPTIONS * HTTP/1.1\r\nHost: ws.test\r\n{fields}\r\n"
        answer = exchange(ws_server.address, head.encode())
        assert answer.status == 405, (who, answer.body)
        assert answer.headers.get("allow") == "", who
        assert json.loads(answer.body)["error"]["code"] == "method_not_allowed"
