"""What a front door passes on to an upstream for a client: shared by the gateway's HTTP
proxy (`webapi.proxy`, and its fast path's byte-level copy, `webapi.fastpath.head`) and
the websocket service's relays (`websocket.handshake`), so both forward the same fields.

* the client's fields, less the hop-by-hop ones (`strip_hop_by_hop`: RFC 9110 §7.6.1)
  and less its API key (`X-Api-Key`, or `Authorization: Bearer sbk_...`: a backend
  never sees a reusable key; a bearer JWT passes, short-lived, and tells the backend
  who the user is), all in one pass (`hop_headers_out`);
* the forwarding fields are the gateway's, never the client's: `X-Forwarded-For` (the
  lines received, then the peer: `common.clientip` says which of them are believed),
  `-Proto`, `-Host`, `X-Request-Id` (`common.request_ids`) and the gateway's `Via` are
  set (`hop_headers_out`), and whatever else a client may write to tell a backend
  where it came from or how it arrived is dropped: `Forwarded` (RFC 7239), every
  other `X-Forwarded-*` (`-Port`, `-Prefix`, `-Server`, `-Ssl`...), `X-Real-IP`,
  `X-Client-IP`, `True-Client-IP`. A backend behind the gateway may believe what it
  gets of them: nothing of it is a client's word but the left of `X-Forwarded-For`;
* the credential a backend gets is the one that was checked: a request whose
  credential fields are ambiguous (`credential_fault`: two `Authorization` fields,
  two `X-Api-Key`, or a bearer and an `X-Api-Key` that differ) is refused with 400
  `malformed_header` before anything reads it, so no field the gateway did not
  authenticate passes beside the one it did;
* a request about to be forwarded whose `Via` fields name the gateway as the
  receiver `MAX_VIA_HOPS` times already is a loop (`via_loop`), refused with 508
  `proxy_loop`. Only a request about to be forwarded: any other route answers as it
  would without the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from common.apikeys import PREFIX
from common.clientip import forwarded_for
from common.http_head import connection_tokens, connection_tokens_raw

API_KEY_PREFIX = PREFIX  # `sbk_`: what an API key starts with (`common.apikeys`)

# Headers that describe one connection, never the message (RFC 9110 §7.6.1);
# `Proxy-*` names are dropped by prefix.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
)
HOP_BY_HOP_RAW = frozenset(name.encode() for name in HOP_BY_HOP)
# What the gateway adds to every request it forwards (RFC 9110 §7.6.3), and how many
# of its marks a request may carry already: more is a loop (an instance whose address
# leads back to a gateway), answered 508 `proxy_loop` before it is forwarded again.
# A few, not one: gateways may be chained on purpose (an edge one, an inner one).
# The gateway's mark is its `received-by` (a pseudonym), counted as a whole token.
VIA_BY = "switchboard"
VIA = f"1.1 {VIA_BY}"
MAX_VIA_HOPS = 3
PROXY_LOOP = "the request has come through the gateway too often: a proxy loop"
# The fields `hop_headers_out` sets itself (or the body framing sets), never the client's,
# and the forwarding fields it owns and does not set (module docstring); besides these,
# every `X-Forwarded-*` name (`FORWARDED_PREFIX`).
REPLACED = frozenset({"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                      "x-request-id", "content-length", "transfer-encoding",
                      "forwarded", "x-real-ip", "x-client-ip", "true-client-ip"})  # fmt: skip
REPLACED_RAW = frozenset(name.encode() for name in REPLACED)
FORWARDED_PREFIX = "x-forwarded-"
FORWARDED_PREFIX_RAW = FORWARDED_PREFIX.encode()


def strip_hop_by_hop(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`headers` without hop-by-hop fields: Connection, Keep-Alive, Proxy-*, TE, Trailer,
    Transfer-Encoding, Upgrade, and every field that Connection names.

    Hot path: called once per proxied response (and request).
    """
    named: set[str] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == "connection":
            named.update(connection_tokens(value))
    kept = []
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower.startswith("proxy-") or lower in named:
            continue
        kept.append((name, value))
    return kept


def strip_hop_by_hop_raw(
    headers: list[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """`strip_hop_by_hop` on header fields as bytes (`UpstreamResponse.raw_headers`), also
    dropping the lower-case names in `drop`.

    Hot path: the proxy's fast path calls it once per response.
    """
    named: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            named.update(connection_tokens_raw(value))
    kept = []
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP_RAW or lower.startswith(b"proxy-") or lower in named:
            continue
        if lower in drop:
            continue
        kept.append((name, value))
    return kept


def _is_api_key(authorization: str) -> bool:
    """Whether an `Authorization` value is `Bearer sbk_...`: an API key (not checked
    further: the field is dropped either way)."""
    return authorization[7:].lstrip().startswith(API_KEY_PREFIX)


# What `hop_headers_out` drops by name (lower case) and by prefix.
_DROPPED = HOP_BY_HOP | REPLACED | {"x-api-key"}
_DROPPED_PREFIXES = ("proxy-", FORWARDED_PREFIX)


def hop_headers_out(
    headers: Iterable[tuple[str, str]],
    *,
    client_ip: str,
    scheme: str,
    host: str,
    request_id: str,
    upstream: str | None,
    drop: frozenset[str] = frozenset(),
) -> list[tuple[str, str]]:
    """The headers sent upstream for a client's `headers`: its API key dropped (module
    docstring), hop-by-hop fields stripped (`strip_hop_by_hop`), the client's
    forwarding fields dropped and the lower-case names in `drop`; then
    X-Forwarded-For/-Proto/-Host, X-Request-Id and the gateway's `Via` set (module
    docstring), and `Host: upstream` unless `upstream` is None (a client library that
    writes its own `Host`, as the websocket relay's).

    Hot path: once per proxied request. One pass over the fields, each name lower-cased
    once (a second pass only when `Connection` names a field not dropped anyway)."""
    prior: list[str] = []
    named: set[str] = set()
    out: list[tuple[str, str]] = []
    for name, value in headers:
        lower = name.lower()
        if lower in _DROPPED or lower.startswith(_DROPPED_PREFIXES) or lower in drop:
            if lower == "x-forwarded-for":
                prior.append(value)
            elif lower == "connection":
                named.update(connection_tokens(value))
            continue
        if lower == "authorization" and _is_api_key(value):
            continue
        out.append((name, value))
    if named:
        named -= _DROPPED  # (`keep-alive`, `close`: nothing more to drop)
        if named:
            out = [(k, v) for k, v in out if k.lower() not in named]
    if upstream is not None:
        out.append(("Host", upstream))
    out += [
        ("X-Forwarded-For", forwarded_for(prior, client_ip)),
        ("X-Forwarded-Proto", scheme),
        ("X-Forwarded-Host", host),
        ("X-Request-Id", request_id),
        ("Via", VIA),  # (added beside the client's own Via fields: one list, RFC 9110 §5.3)
    ]
    return out


def credential_fault(authorization: Sequence[str], api_key: Sequence[str]) -> str | None:
    """Why the credential fields of a request, the values of its `Authorization` and of
    its `X-Api-Key` field lines, are ambiguous (a 400 `malformed_header`), or None.

    Every reader authenticates the first `Authorization` (else the first `X-Api-Key`),
    and every forwarder passes each field but an API key: a second field would reach
    the backend unchecked beside, or instead of, the credential authenticated (an API
    key is dropped, so a forged JWT after it would be all the backend sees). A bearer
    and an `X-Api-Key` may come together only when they are the same credential. (An
    `Authorization` that is no bearer is no credential of ours: the gateway refuses it
    with 401; the websocket service authenticates the other credential and passes that
    field on as it is, for the backend to judge, as it does beside a `bearer`
    subprotocol.)"""
    if len(authorization) > 1:
        return "more than one Authorization field: one credential per request"
    if len(api_key) > 1:
        return "more than one X-Api-Key field: one credential per request"
    if authorization and api_key and api_key[0].strip():  # (an empty one is no credential)
        scheme, _, token = authorization[0].partition(" ")
        if scheme.lower() == "bearer" and token.strip() != api_key[0].strip():
            return "Authorization and X-Api-Key carry different credentials: send one"
    return None


class MultiHeaders(Protocol):
    """Header fields as Sanic's `Header` holds them (a field may repeat)."""

    def __contains__(self, name: object) -> bool: ...
    def getall(self, name: str, default: list[str]) -> list[str]: ...


def headers_credential_fault(headers: MultiHeaders) -> str | None:
    """`credential_fault` of a request's header fields (one dict lookup each when, as
    usual, there is at most one credential field)."""
    if "authorization" not in headers and "x-api-key" not in headers:
        return None
    get_all = headers.getall
    return credential_fault(get_all("authorization", []), get_all("x-api-key", []))


def via_hops(value: str) -> int:
    """How many entries of a `Via` field value were received by the gateway: entries
    `received-protocol received-by [comment]`, comma-separated (RFC 9110 §7.6.3), whose
    `received-by` is the gateway's `VIA_BY`, whole (not `switchboardX`). Comments,
    which may hold commas and parentheses, are skipped."""
    if VIA_BY not in value:  # (most requests: no field, or other proxies' only)
        return 0
    if "(" in value:
        value = _without_comments(value)
    hops = 0
    for entry in value.split(","):
        parts = entry.split()
        if len(parts) >= 2 and parts[1] == VIA_BY:
            hops += 1
    return hops


def _without_comments(value: str) -> str:
    """`value` less its comments (`( ... )`, nested, with quoted pairs: RFC 9110 §5.6.5)."""
    kept: list[str] = []
    depth = 0
    escaped = False
    for char in value:
        if depth:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
            continue
        if char == "(":
            depth = 1
            kept.append(" ")
        else:
            kept.append(char)
    return "".join(kept)


def via_loop(vias: Iterable[str] | None) -> bool:
    """Whether a request whose `Via` field lines are `vias` has come through the gateway
    `MAX_VIA_HOPS` times already (`via_hops`): a proxy loop, not to be forwarded again."""
    return bool(vias) and sum(via_hops(via) for via in vias or ()) >= MAX_VIA_HOPS
