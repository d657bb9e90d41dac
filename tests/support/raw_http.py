"""A raw HTTP/1.1 client for the gateway's and the websocket service's tests:
pipelining, split writes and exact bytes on the wire need the socket itself."""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass

import httptools


def raw_request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    names: list[str]  # every header name, in order


class _Responses:
    """httptools callbacks: the answers read so far."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[Answer] = []
        self._headers: dict[str, str] = {}
        self._names: list[str] = []
        self._body: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode()
        self._names.append(name.decode().lower())

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        self.done.append(Answer(status, self._headers, b"".join(self._body), self._names))
        self._headers, self._body, self._names = {}, [], []


def read_answers(sock: socket.socket, count: int) -> list[Answer]:
    responses = _Responses()
    deadline = time.monotonic() + 10
    while len(responses.done) < count and time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        responses.parser.feed_data(data)
    assert len(responses.done) == count
    return responses.done


def connect(gateway: str) -> socket.socket:
    host, port = gateway.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def exchange(server: str, raw: bytes) -> Answer:
    """Send `raw` on a new connection to `server` (as `connect` takes it) and read one
    answer; the connection is closed after it."""
    with connect(server) as sock:
        sock.sendall(raw)
        return read_answers(sock, 1)[0]


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the other end closes (or resets) `sock` within `timeout`; False if it
    keeps it open that long."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def trickle(sock: socket.socket, data: bytes, every: float, limit: float = 8.0) -> bool:
    """Send `data` a byte every `every` seconds (a slowloris client) until the other end
    answers or closes, or `limit` seconds pass (or `data` is all sent): whether the
    other end ended it. What was answered is left unread on `sock`."""
    start = time.monotonic()
    for byte in data:
        if time.monotonic() - start > limit:
            return False
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return True
        ready, _, _ = select.select([sock], [], [], every)
        if ready:  # an answer, or the close
            return True
    return False
