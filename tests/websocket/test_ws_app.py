"""The WebSocket service's basics, through a real server process: health, pings, bad input."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import httpx
import pytest
import websockets

from tests.support.malformed import BODY_CASES, CASES
from tests.support.raw_http import closed_by_peer, connect, exchange, read_answers, trickle
from tests.websocket.conftest import WsServer
from websocket.app import create_app
from websocket.route_kinds import RouteKind

pytestmark = pytest.mark.timeout(60)


def test_every_route_declares_its_kind() -> None:
    # What the service tells its routes apart by (`websocket.route_kinds`): a route that
    # declared none would need a credential, and be neither tapped nor relayed.
    app = create_app(name=f"kinds{uuid.uuid4().hex[:6]}")
    app.router.finalize()
    kinds = {route.path: getattr(route.ctx, "kind", None) for route in app.router.routes}
    assert kinds == {
        "health": RouteKind.PLAIN,
        "ws": RouteKind.CLIENTS,
        "ws/stream": RouteKind.STREAM,
        "ws/proxy/<service:str>": RouteKind.RELAY,
        "ws/proxy/<service:str>/<path:path>": RouteKind.RELAY,
    }


def test_health_reports_redis_and_connections(ws_server: WsServer) -> None:
    body = httpx.get(f"http://{ws_server.address}/health").json()
    assert body["status"] == "ok" and body["redis"] == {"ok": True}
    assert isinstance(body["connections"], int)


async def test_ping_pong(ws_server: WsServer) -> None:
    async with ws_server.connect() as ws:
        await ws.send("ping")
        assert await ws.recv() == "pong"
        await ws.send(json.dumps({"type": "ping", "id": 7}))
        assert json.loads(await ws.recv()) == {"type": "pong", "id": 7}


async def test_bad_messages_get_errors_not_disconnects(ws_server: WsServer) -> None:
    async with ws_server.connect() as ws:
        await ws.send("{not json")
        answer = json.loads(await ws.recv())
        assert answer["error"]["code"] == -32700 and answer["id"] is None
        await ws.send(json.dumps({"type": "dance", "id": 3}))
        answer = json.loads(await ws.recv())
        assert answer["error"]["code"] == "unknown_type" and answer["id"] == 3
        await ws.send(json.dumps({"type": "subscribe", "channel": "no spaces allowed"}))
        assert json.loads(await ws.recv())["error"]["code"] == "bad_channel"
        await ws.send("ping")
        assert await ws.recv() == "pong"


@pytest.mark.parametrize("path", ["/ws", "/ws/stream"])
async def test_oversized_frame_closes_1009(ws_server: WsServer, path: str) -> None:
    async with ws_server.connect(path, max_size=None) as ws:
        await ws.send("x" * (256 * 1024))  # the test server's limit is 64 KiB
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


# Every malformed request the gateway is tested with, on a plain route and on an
# upgrade route; a body's fault is not read on an upgrade route (its credential is).
_MALFORMED = [(case, "/health") for case in CASES] + [
    (case, path) for case in CASES if case not in BODY_CASES for path in ("/ws", "/ws/proxy/svc/x")
]


@pytest.mark.parametrize(("case", "path"), _MALFORMED)
def test_a_malformed_request_gets_the_gateways_json_4xx(
    ws_server: WsServer, case: str, path: str
) -> None:
    # Not a 401 on an upgrade route: a head Sanic could not parse gets its parse error,
    # and one it took leniently (a space before a colon, a NUL) is refused before any
    # credential is read.
    fields, status, code = CASES[case]
    refusals = len(ws_server.proc.log_records("request refused"))
    head = f"GET {path} HTTP/1.1\r\nHost: ws.test\r\n{fields}"
    answer = exchange(ws_server.address, head.encode("latin-1"))
    assert answer.headers["content-type"].startswith("application/json")
    assert (answer.status, json.loads(answer.body)["error"]["code"]) == (status, code)
    # Logged once (design §10), before the answer was written.
    logged = ws_server.proc.log_records("request refused")[refusals:]
    assert [(r["status"], r["code"]) for r in logged] == [(status, code)]


def test_an_unknown_path_gets_the_json_error_body(ws_server: WsServer) -> None:
    answer = httpx.get(f"http://{ws_server.address}/nowhere", timeout=10)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("line", ["GET /health\t HTTP/1.1", "CONNECT 127.0.0.1:22 HTTP/1.1"])
def test_a_target_sanic_cannot_parse_gets_a_json_400(ws_server: WsServer, line: str) -> None:
    # (`common.strict_http`: Sanic built its error's request from the same target,
    # failed again, and the client got no answer and the log a traceback.)
    log = ws_server.proc.log_path
    lines = len(log.read_text().splitlines())
    answer = exchange(ws_server.address, f"{line}\r\nHost: ws.test\r\n\r\n".encode())
    error = json.loads(answer.body)["error"]
    assert (answer.status, error["code"]) == (400, "bad_request")
    assert "\t" not in error["message"]
    assert [x for x in log.read_text().splitlines()[lines:] if '"level": "error"' in x] == []


def test_a_transfer_coding_name_is_read_ignoring_case(ws_server: WsServer) -> None:
    # RFC 9112 §7: `Chunked` is chunked; its body is read, and the next request follows.
    request = "GET /health HTTP/1.1\r\nHost: ws.test\r\n"
    with connect(ws_server.address) as sock:
        sock.sendall(f"{request}Transfer-Encoding: Chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n".encode())
        sock.sendall(f"{request}\r\n".encode())
        assert [a.status for a in read_answers(sock, 2)] == [200, 200]


def test_a_trickling_head_gets_a_408_and_the_connection_closes(
    make_ws_server: Callable[..., WsServer],
) -> None:
    # A byte every 0.3 s is never silent for REQUEST_TIMEOUT (60 s), which restarts at
    # every byte: only the head's own deadline ends it (`common.strict_http`).
    server = make_ws_server(REQUEST_HEAD_TIMEOUT="1")
    head = b"GET /ws HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nX-Slow: " + b"a" * 1000
    with connect(server.address) as sock:
        ended = trickle(sock, head, every=0.3)
        answer = read_answers(sock, 1)[0]
        assert answer.headers["content-type"].startswith("application/json")
        assert (answer.status, json.loads(answer.body)["error"]["code"]) == (408, "request_timeout")
        assert answer.headers["connection"] == "close"
        assert closed_by_peer(sock)
    assert ended  # (by the server, not by the trickle's own limit)
