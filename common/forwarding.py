"""What a front door passes on to an upstream for a client: shared by the gateway's HTTP
proxy (`webapi.proxy`, and its fast path's byte-level copy, `webapi.fastpath.head`) and
the websocket service's relays (`websocket.handshake`), so both forward the same fields.

* the client's fields, less the hop-by-hop ones (`strip_hop_by_hop`: RFC 9110 §7.6.1)
  and less its API key (`credential_free`: a backend never sees a reusable key; a
  bearer JWT passes, short-lived, and tells the backend who the user is);
* `X-Forwarded-For` (the lines received, then the peer), `-Proto`, `-Host`,
  `X-Request-Id` (`common.request_ids`) and the gateway's `Via` (`hop_headers_out`);
* a request whose `Via` fields hold the gateway's mark `MAX_VIA_HOPS` times already is
  a loop (`via_loop`), refused with 508 `proxy_loop` before it is forwarded again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from common.apikeys import PREFIX
from common.clientip import forwarded_for

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
VIA = "1.1 switchboard"
VIA_MARK = b"switchboard"
MAX_VIA_HOPS = 3
PROXY_LOOP = "the request has come through the gateway too often: a proxy loop"
_VIA_MARK = VIA_MARK.decode()
# The fields `hop_headers_out` sets itself (or the body framing sets), never the client's.
REPLACED = frozenset({"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                      "x-request-id", "content-length", "transfer-encoding"})  # fmt: skip
REPLACED_RAW = frozenset(name.encode() for name in REPLACED)


def strip_hop_by_hop(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`headers` without hop-by-hop fields: Connection, Keep-Alive, Proxy-*, TE, Trailer,
    Transfer-Encoding, Upgrade, and every field that Connection names.

    Hot path: called once per proxied response (and request).
    """
    named: set[str] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == "connection":
            named.update(token.strip().lower() for token in value.split(","))
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
            named.update(token.strip().lower() for token in value.split(b","))
    kept = []
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP_RAW or lower.startswith(b"proxy-") or lower in named:
            continue
        if lower in drop:
            continue
        kept.append((name, value))
    return kept


def credential_free(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """`headers` without the request's API key (`X-Api-Key`, or `Authorization: Bearer
    sbk_...`): a backend never sees a reusable key (bearer JWTs pass: they are
    short-lived and let a backend know the user)."""
    return [
        (k, v)
        for k, v in headers
        if not (
            (lk := k.lower()) == "x-api-key"
            or (lk == "authorization" and v[7:].lstrip().startswith(API_KEY_PREFIX))
        )
    ]


def hop_headers_out(
    headers: Sequence[tuple[str, str]],
    *,
    client_ip: str,
    scheme: str,
    host: str,
    request_id: str,
    upstream: str | None,
) -> list[tuple[str, str]]:
    """The headers sent upstream: hop-by-hop stripped, X-Forwarded-*, X-Request-Id and
    the gateway's `Via` set, and `Host: upstream` unless `upstream` is None (a client
    library that writes its own `Host`, as the websocket relay's)."""
    prior = [v for k, v in headers if k.lower() == "x-forwarded-for"]
    out = [(k, v) for k, v in strip_hop_by_hop(list(headers)) if k.lower() not in REPLACED]
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


def via_loop(vias: Iterable[str] | None) -> bool:
    """Whether a request whose `Via` field lines are `vias` has come through the gateway
    `MAX_VIA_HOPS` times already: a proxy loop, not to be forwarded again."""
    return bool(vias) and sum(via.count(_VIA_MARK) for via in vias or ()) >= MAX_VIA_HOPS
