"""A request refused before the websocket service read all of it: the connection closes
lingering, as the gateway's (`common.lingering`), so a client still sending reads the
whole refusal. The service used to close at once: with the rest of the request unread,
the kernel answered it with a TCP reset, and a client writing its request before
reading (as most do) failed on its write (`ConnectionResetError`), never reading the
answer."""

from __future__ import annotations

import json

import pytest

from tests.support.raw_http import connect, exchange, read_answers
from tests.websocket.conftest import WsServer, upgrade_head

pytestmark = pytest.mark.timeout(60)

# Well past what the sockets' buffers take in while the service reads nothing more:
# the client's write of it ends only if the service keeps reading.
SENT = 32 * 1024 * 1024
UPGRADE = upgrade_head("/ws/stream")
# A head over the 16 KiB bound, refused as soon as the bound is passed.
HEAD_TOO_LARGE = f"{UPGRADE}X-Big: ".encode() + b"a" * SENT + b"\r\n\r\n"
# A body that cannot be framed, refused with the head (`common.strict_http`).
UNFRAMED = f"{UPGRADE}Transfer-Encoding: gzip, chunked\r\n\r\n".encode() + b"b" * SENT


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (HEAD_TOO_LARGE, 431, "request_header_fields_too_large"),
        (UNFRAMED, 400, "bad_request"),
    ],
    ids=["431 head too large", "400 body not framed"],
)
def test_a_client_still_sending_reads_the_whole_refusal(
    ws_server: WsServer, request_bytes: bytes, status: int, code: str
) -> None:
    with connect(ws_server.address) as sock:
        sock.sendall(request_bytes)  # (the old code's reset failed this write)
        answer = read_answers(sock, 1)[0]
        assert sock.recv(1) == b""  # then the service's FIN, not a reset
    assert answer.status == status
    assert json.loads(answer.body)["error"]["code"] == code


@pytest.mark.parametrize("credential", [True, False], ids=["credential", "none"])
@pytest.mark.parametrize("path", ["/ws/stream", "/health"])
def test_a_body_is_refused_before_it_is_read(
    ws_server: WsServer, path: str, credential: bool
) -> None:
    # No route of the service takes a body (an upgrade has none, RFC 6455 §4.1; /health
    # is a GET), yet it waited for up to Sanic's 100 MB default of one, read into
    # memory: a cheap way to make it hold memory. Now the head is answered at once.
    head = upgrade_head(path) + f"Content-Length: {SENT}\r\n"
    if credential:
        head += f"Authorization: Bearer {ws_server.token()}\r\n"
    # (no body follows: no answer may wait for it)
    answer = exchange(ws_server.address, f"{head}\r\n".encode())
    # (a credential is checked first where one is needed: without it, a 401 at once)
    if path == "/ws/stream" and not credential:
        assert answer.status == 401
    else:
        assert answer.status == 413
        assert json.loads(answer.body)["error"]["code"] == "payload_too_large"
    assert answer.headers["connection"] == "close"


def test_an_upgrade_with_a_large_head_is_taken(ws_server: WsServer) -> None:
    # A browser's upgrade (cookies, user agent, a `bearer` subprotocol and its JWT) is
    # well over 1 KiB: the body bound (1 KiB) set the head's too, as Sanic derives it.
    head = (f"{UPGRADE}Authorization: Bearer {ws_server.token()}\r\n"
            f"Cookie: c={'a' * 8000}\r\n\r\n")  # fmt: skip
    with connect(ws_server.address) as sock:
        sock.sendall(head.encode())
        assert sock.recv(12) == b"HTTP/1.1 101"
