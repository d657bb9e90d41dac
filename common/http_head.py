"""What a request head may hold, as HTTP/1.1 allows it: the check both Sanic services
(webapi, websocket) make of every head Sanic parses.

Sanic's own parser is lenient where a proxy must not be: it takes
`Transfer-Encoding : chunked` (a space before the colon) as a field named
`transfer-encoding ` and keeps a bare LF or a NUL inside a value. Forwarded, such a
field could be read differently by the upstream (request smuggling); so every head
is checked as received (one regex match) before anything reads it, and refused with
a 400 `malformed_header`. The gateway's fast path needs no such check: its httptools
parser refuses such heads already and hands them to Sanic.
"""

from __future__ import annotations

import re

# A request head as HTTP/1.1 allows it (RFC 9110 §5.1, §5.5; RFC 9112 §2.2, §5.1): a
# request line with no control character, then lines `name:value` after CRLFs, the name
# a token directly followed by its colon, the value with no control character but tab.
# (No backtracking: a token holds no colon, a value no CR.)
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_WELL_FORMED_HEAD = re.compile(
    rb"[^\x00-\x1f\x7f]*(?:\r\n" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*)*"
)
_WELL_FORMED_FIELD = re.compile(_TOKEN + rb":[\t\x20-\x7e\x80-\xff]*")
_WELL_FORMED_NAME = re.compile(_TOKEN)


def head_fault(head: bytes) -> str | None:
    """What is wrong with request head `head` (Sanic's `request.head`), else None.

    It says which field and what is wrong, never what the value holds: the message is
    logged, and the value may be a credential (design §10).
    """
    if _WELL_FORMED_HEAD.fullmatch(head) is not None:
        return None
    _request_line, *fields = head.split(b"\r\n")
    for field in fields:
        if _WELL_FORMED_FIELD.fullmatch(field) is None:
            name, colon, _value = field.partition(b":")
            if not colon:
                return "a header line without a colon (folded lines are refused)"
            shown = name[:40].decode("latin-1")
            if _WELL_FORMED_NAME.fullmatch(name) is None:
                return f"malformed header field name {shown!r}"
            return f"control character in the value of header {shown!r}"
    return "control character in the request line"
