"""The upstream request head of a fast-path request, built as bytes once per request.

The same head as the `/svc/` route's (`hop_headers_out`, then `build_request_head`),
without decoding the fields to str and encoding them back:

* the client's API key is dropped (a bearer JWT passes: it is short-lived and tells
  the backend who the user is);
* hop-by-hop fields, `Proxy-*` and the fields `Connection` names are dropped, and so
  are `Host`, `X-Request-Id`, the body framing and the client's forwarding fields
  (`Forwarded`, every `X-Forwarded-*`, `X-Real-IP`, `X-Client-IP`, `True-Client-IP`:
  `common.forwarding`);
* `Host` (the service), `X-Forwarded-For` (appended to the client's), `-Proto`,
  `-Host`, `X-Request-Id` and the gateway's `Via` are set, and the body is framed by
  `Content-Length`.

Nothing is escaped: httptools has refused CR and LF in every field the client sent
(and the fast path takes only heads that end where httptools says), the target
comes from `upstream_target`, and the values added here are checked where they are
made. `tests/webapi/test_fastpath_request.py` compares it with the route's builders.

With the compiled build (unless `SWITCHBOARD_C=0`: `common.compiled.c_module`),
`_cheads.c` builds the same bytes in C from the `Parsed` fields read here and this
module's constants (`init_c`); when it declines (None), the Python below runs: it is
the reference (`tests/webapi/test_c_heads.py` compares the two).
"""

from __future__ import annotations

from types import ModuleType

from common.compiled import c_module
from common.forwarding import (
    API_KEY_PREFIX,
    FORWARDED_PREFIX_RAW,
    HOP_BY_HOP_RAW,
    REPLACED_RAW,
    VIA,
)
from common.http_head import connection_tokens_raw
from webapi.fastpath.request import Parsed
from webapi.proxy.headers import BODY_METHODS

# Hop-by-hop fields, the fields the gateway sets or owns, the body framing, the API key;
# and by prefix, `Proxy-*` and `X-Forwarded-*`.
_DROPPED = HOP_BY_HOP_RAW | REPLACED_RAW | {b"x-api-key"}
_DROPPED_PREFIXES = (b"proxy-", FORWARDED_PREFIX_RAW)
_API_KEY = API_KEY_PREFIX.encode()
_VIA = b"Via: " + VIA.encode()


def upstream_head(req: Parsed, *, client_ip: str, scheme: str, request_id: str) -> bytes:
    """The request line and header block sent upstream for `req`. Hot path."""
    if _C is not None:
        head: bytes | None = _C.upstream_head(
            req.method, req.target, req.headers, req.connection, req.service,
            req.first.get(b"host", ""), req.body, client_ip, scheme, request_id,
        )  # fmt: skip
        if head is not None:
            return head
    named: set[bytes] = set()
    for value in req.connection:
        named.update(connection_tokens_raw(value))
    prior: list[bytes] = []
    out = [b"%s %s HTTP/1.1" % (req.method.encode(), req.target.encode("utf-8", "surrogateescape"))]
    for name, value in req.headers:
        if name in _DROPPED or name.startswith(_DROPPED_PREFIXES) or name in named:
            if name == b"x-forwarded-for":
                prior.append(value)
            continue
        if name == b"authorization" and value[7:].lstrip().startswith(_API_KEY):
            continue
        out.append(name + b": " + value)
    ip = client_ip.encode()
    out.append(b"Host: " + req.service.encode())
    out.append(b"X-Forwarded-For: " + (b", ".join([*prior, ip]) if prior else ip))
    out.append(b"X-Forwarded-Proto: " + scheme.encode())
    out.append(
        b"X-Forwarded-Host: " + req.first.get(b"host", "").encode("utf-8", "surrogateescape")
    )
    out.append(b"X-Request-Id: " + request_id.encode())
    out.append(_VIA)
    body = req.body
    if body:
        out.append(b"Content-Length: %d" % len(body))
    elif req.method in BODY_METHODS:  # an empty body still gets Content-Length: 0
        out.append(b"Content-Length: 0")
    out.append(b"\r\n")
    return b"\r\n".join(out)


def init_c(module: ModuleType) -> ModuleType:
    """`module` (`webapi.fastpath._cheads`) given what `upstream_head` drops and adds:
    the C reads these objects, it has no copy of them."""
    module.init_upstream(_DROPPED, _DROPPED_PREFIXES, _API_KEY, _VIA, BODY_METHODS)
    return module


_C_HEADS = c_module("webapi.fastpath._cheads")
# The C `upstream_head`, when used (`c_module`); read at each call (tests set it).
_C: ModuleType | None = None if _C_HEADS is None else init_c(_C_HEADS)
