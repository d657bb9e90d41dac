"""Malformed request heads and bodies, as raw bytes, shared by the gateway's and the
websocket service's tests: both must answer each with the same JSON 4xx."""

from __future__ import annotations

# name: (the header fields ending a request head, and its body; the status and the
# error code expected).
CASES = {
    "length and chunked": (
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    "two lengths": ("Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400, "bad_request"),
    "negative length": ("Content-Length: -1\r\n\r\n", 400, "bad_request"),
    "signed length": ("Content-Length: +5\r\n\r\nhello", 400, "bad_request"),
    "length not a number": ("Content-Length: 5x\r\n\r\nhello", 400, "bad_request"),
    # U+0665 (an Arabic-Indic five) in UTF-8: Python's int() reads it as 5.
    "length not ASCII digits": (
        "Content-Length: \xd9\xa5\r\n\r\nhello",
        400,
        "malformed_header",
    ),
    "bad chunk size": (
        "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    # Chunk-size lines and chunk ends as RFC 9112 §7.1 has them, not as `int(x, 16)`
    # reads them (`common.strict_http`).
    "chunk size in hex notation": (
        "Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    "chunk size after a space": (
        "Transfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    "chunk size in non-ASCII digits": (
        "Transfer-Encoding: chunked\r\n\r\n\xd9\xa5\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    "bare CR in a chunk extension": (
        "Transfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    # A size line ended by a bare LF: refused as it arrives (Sanic waited for a CRLF).
    "chunk size line ended by a bare LF": (
        "Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
        400,
        "bad_request",
    ),
    "chunked not last": ("Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    "coding other than chunked": (
        "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    "second Host": ("Host: other.test\r\nContent-Length: 0\r\n\r\n", 400, "malformed_header"),
    "header without colon": ("Bad Header\r\nContent-Length: 0\r\n\r\n", 400, "bad_request"),
    "space before colon": (
        "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello",
        400,
        "malformed_header",
    ),
    "bare LF in a value": (
        "X-A: a\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello",
        400,
        "malformed_header",
    ),
    "nul in a value": ("X-A: a\x00b\r\nContent-Length: 0\r\n\r\n", 400, "malformed_header"),
    # A head whose last lines end in bare LFs never holds the CRLF CRLF Sanic waits for.
    "head lines ended by bare LFs": ("X-A: a\nContent-Length: 0\n\n", 400, "bad_request"),
    "folded header": ("X-A: a\r\n  folded\r\nContent-Length: 0\r\n\r\n", 400, "bad_request"),
    # 431, not the 413 of a body (`common.strict_http`): one field, or many small ones.
    "head over the limit": (
        "X-Big: " + "a" * 20_000 + "\r\nContent-Length: 0\r\n\r\n",
        431,
        "request_header_fields_too_large",
    ),
    "too many header fields": (
        "".join(f"X{i}:v\r\n" for i in range(2000)) + "Content-Length: 0\r\n\r\n",
        431,
        "request_header_fields_too_large",
    ),
    # Trailer fields are taken (and dropped), but only well formed ones.
    "trailer field without a colon": (
        "Transfer-Encoding: chunked\r\n\r\n0\r\nX-Sum abc\r\n\r\n",
        400,
        "bad_request",
    ),
    "trailer field ended by a bare LF": (
        "Transfer-Encoding: chunked\r\n\r\n0\r\nX-Sum: abc\n\r\n",
        400,
        "bad_request",
    ),
    "trailer fields over the limit": (
        "Transfer-Encoding: chunked\r\n\r\n0\r\n"
        + "".join(f"X-T{i}: {'a' * 100}\r\n" for i in range(200))
        + "\r\n",
        431,
        "request_header_fields_too_large",
    ),
}

# The cases whose fault is in the body: a route that reads no body never sees it.
BODY_CASES = frozenset({
    "bad chunk size", "chunk size in hex notation", "chunk size after a space",
    "chunk size in non-ASCII digits", "bare CR in a chunk extension",
    "chunk size line ended by a bare LF", "trailer field without a colon",
    "trailer field ended by a bare LF", "trailer fields over the limit",
})  # fmt: skip
