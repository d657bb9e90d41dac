"""The upstream request head of the proxy (hop-by-hop stripping and the fields the
gateway adds are `common.forwarding`'s)."""

from __future__ import annotations

from collections.abc import AsyncIterable

# Methods whose request normally has a body: an empty one gets `Content-Length: 0`.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# How the request body goes on the wire (`build_request_head`'s second result).
NO_BODY = 0  # nothing follows the head
SIZED = 1  # `Content-Length` bytes follow
CHUNKED = 2  # `Transfer-Encoding: chunked`

RequestBody = bytes | bytearray | AsyncIterable[bytes] | None


def build_request_head(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    authority: str,
    body: RequestBody,
) -> tuple[bytes, int, int]:
    """The request head as bytes, the body framing (`NO_BODY`, `SIZED`, `CHUNKED`) and
    the body length for `SIZED` (else 0).

    Adds `Host: authority` when `headers` has none, and sets the framing itself: any
    `Transfer-Encoding` given is dropped, a `Content-Length` given must match a bytes
    body and is kept for a streamed one (else the stream is chunked). Raises
    `ValueError` for a head that could be split (CR, LF or a space where none may
    be) or a length that does not fit the body.

    Hot path: once per upstream request. Names and values are str as Sanic gives
    them (UTF-8 with surrogate escapes) and are encoded back the same way, so bytes
    pass through unchanged.
    """
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    has_host = False
    declared: str | None = None
    for name, value in headers:
        size = len(name)
        if size == 4 and name.lower() == "host":
            has_host = True
        elif size == 14 and name.lower() == "content-length":
            declared = value.strip()
            continue
        elif size == 17 and name.lower() == "transfer-encoding":
            continue
        lines.append(f"{name}: {value}\r\n")
    if not has_host:
        lines.append(f"Host: {authority}\r\n")

    framing, length = NO_BODY, 0
    if body is None:
        if declared is not None and declared != "0":
            raise ValueError(f"Content-Length {declared!r} given without a body")
        if declared is not None or method in BODY_METHODS:
            lines.append("Content-Length: 0\r\n")
    elif isinstance(body, bytes | bytearray):
        length = len(body)
        if declared is not None and declared != str(length):
            raise ValueError(f"Content-Length {declared!r} does not match a {length}-byte body")
        lines.append(f"Content-Length: {length}\r\n")
        framing = SIZED if length else NO_BODY
    elif declared is not None:
        if not declared.isdigit() or not declared.isascii():
            raise ValueError(f"invalid Content-Length {declared!r}")
        length = int(declared)
        lines.append(f"Content-Length: {length}\r\n")
        framing = SIZED if length else NO_BODY
    else:
        lines.append("Transfer-Encoding: chunked\r\n")
        framing = CHUNKED
    lines.append("\r\n")

    head = "".join(lines)
    # Every line ends in exactly one CRLF, so any other CR or LF came from a field.
    if (
        head.count("\n") != len(lines)
        or head.count("\r") != len(lines)
        or " " in method
        or " " in target
    ):
        raise ValueError("CR, LF or space inside the request line or a header field")
    return head.encode("utf-8", "surrogateescape"), framing, length
