"""What a request head may hold, as HTTP/1.1 allows it: the check both Sanic services
(webapi, websocket) make of every head Sanic parses.

Sanic's own parser is lenient where a proxy must not be: it takes
`Transfer-Encoding : chunked` (a space before the colon) as a field named
`transfer-encoding ` and keeps a bare LF or a NUL inside a value. Forwarded, such a
field could be read differently by the upstream (request smuggling); so every head
is checked as received (one regex match, and one scan for Content-Length, Host and
an HTTP/1.0 Transfer-Encoding) before anything reads it, refused with a 400
`malformed_header`, and the connection closed (the request's framing cannot be
trusted). The gateway's fast path and pass-through hand to Sanic what their
httptools parser refuses, and what they do not take (`webapi.fastpath.request`).
"""

from __future__ import annotations

import re

# The bound of a request head, request line included (nginx's default for a header line
# is 8 KiB; a browser's cookies and a JWT may need more): more is a 431 (a 414 for a
# longer request line), on Sanic's path (`common.strict_http`) and the fast path alike.
MAX_HEAD = 16 * 1024
# The bytes of the empty lines a client may send before a request line (RFC 9112 §2.2;
# a bare CR or LF too, as nginx and httptools skip them there): dropped, never taken for
# activity, by Sanic's path (`common.strict_http`) and the splice (`webapi.passthrough`).
EMPTY_LINE = b"\r\n"

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
# The fields that frame a request or name its target, read in one scan of the head.
_FRAMING_FIELD = re.compile(
    rb"\r\n(content-length|host|transfer-encoding):[ \t]*([^\r]*)", re.IGNORECASE
)
# Content-Length is ASCII digits (RFC 9110 §8.6); Sanic's `int()` would also read
# U+0665 (an Arabic-Indic five) as 5, where a front end may read no length at all.
_LENGTH_VALUE = re.compile(rb"[0-9]+[ \t]*")
# Host (RFC 9112 §3.2): exactly one in an HTTP/1.1 request, at most one in HTTP/1.0, its
# value `uri-host [":" port]` (RFC 3986: an IP literal or a reg-name; empty is allowed).
# A second Host, or one with a space, `@` or a comma list, may be the one a front end
# routed on and not the one an instance reads.
_HOST_VALUE = re.compile(
    rb"(?:\[[0-9A-Za-z:.\-_~!$&'()*+,;=]+\]|[0-9A-Za-z.\-_~%!$&'()*+;=]*)(?::[0-9]*)?[ \t]*"
)


def well_formed_field(line: bytes | bytearray) -> bool:
    """Whether `line` (no line end) is a field line HTTP allows: a token name directly
    followed by its colon, a value with no control character but tab. For the field
    lines of a chunked body's trailer section (`common.strict_http`)."""
    return _WELL_FORMED_FIELD.fullmatch(line) is not None


def head_fault(head: bytes) -> str | None:
    """What is wrong with request head `head` (Sanic's `request.head`), else None.

    It says which field and what is wrong, never what the value holds: the message is
    logged, and the value may be a credential (design §10).
    """
    if _WELL_FORMED_HEAD.fullmatch(head) is not None:
        return _framing_fault(head)
    _request_line, *fields = head.split(b"\r\n")
    for field in fields:
        if _WELL_FORMED_FIELD.fullmatch(field) is None:
            name, colon, _value = field.partition(b":")
            if not colon:
                return "a header line without a colon (folded lines are refused)"
            # Quoted with its bytes escaped (`'X-\xc3\xa9'`): decoded, a UTF-8 name
            # came out as mojibake (`'X-Ã©'`), naming a field the client never sent.
            shown = repr(name[:40])[1:]
            if _WELL_FORMED_NAME.fullmatch(name) is None:
                return f"malformed header field name {shown}"
            return f"control character in the value of header {shown}"
    return "control character in the request line"


def _framing_fault(head: bytes) -> str | None:
    """What is wrong with a well-formed head's framing fields or Host, else None."""
    if not head:
        return None  # Sanic's stand-in request for one it could not parse (its own 400)
    hosts, coded = [], False
    for name, value in _FRAMING_FIELD.findall(head):
        kind = name.lower()
        if kind == b"host":
            hosts.append(value)
        elif kind == b"transfer-encoding":
            coded = True
        elif _LENGTH_VALUE.fullmatch(value) is None:
            return "Content-Length is not a number in ASCII digits"
    end = head.find(b"\r\n")
    http10 = (head if end == -1 else head[:end]).endswith(b" HTTP/1.0")
    if http10 and coded:
        # RFC 9112 §6.1: HTTP/1.0 has no transfer codings; its framing is faulty.
        return "Transfer-Encoding in an HTTP/1.0 request"
    if len(hosts) > 1:
        return "more than one Host field"
    if not hosts:
        return None if http10 else "an HTTP/1.1 request needs a Host field"
    if not valid_host(hosts[0]):
        return "Host is not a host name or address with an optional port"
    return None


def connection_tokens(value: str) -> list[str]:
    """The tokens of one `Connection` field value, in lower case: the field is a
    comma-separated list (RFC 9110 §7.6.1) of the fields it names and of options
    (`close`, `keep-alive`), never one word to compare whole. Every reader of the field
    reads it here (the gateway's and the websocket service's keep-alive and hop-by-hop
    rules); `connection_tokens_raw` for a value as bytes, read alike: only HTTP's
    whitespace (space, tab) is stripped and only ASCII letters lowered (`str.strip`
    and `str.lower` also take a no-break space, and make `k` of a Kelvin sign)."""
    return [_ascii_lower(token.strip(_OWS)) for token in value.split(",")]


def connection_tokens_raw(value: bytes) -> list[bytes]:
    """`connection_tokens` of a value as bytes (the fast path's and the upstream's)."""
    return [token.strip(b" \t").lower() for token in value.split(b",")]


_OWS = " \t"  # optional whitespace (RFC 9110 §5.6.3)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ascii_lower(text: str) -> str:
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)


def valid_host(value: bytes) -> bool:
    """Whether `value` is a Host field's value as RFC 9112 §3.2 has it."""
    return _HOST_VALUE.fullmatch(value) is not None
