"""The caller's IP address, believing `X-Forwarded-For` only from trusted proxies.

Anyone can send `X-Forwarded-For: 1.2.3.4`, so the header counts only when the
TCP peer is a configured proxy. Each proxy *appends* the address it received
the request from, so the header is walked from the right: every hop added by a
trusted proxy is skipped, and the first untrusted address is the client. What a
client wrote itself sits further left and is never reached. A malformed entry
ends the walk: the last good hop is the answer (that proxy is the furthest
point the chain can be followed).

Every front door reads the client the same way (`request_client_ip`: the gateway's
routes and fast path, the websocket relay) and passes the chain on the same way
(`forwarded_for`).

Hot path: `client_ip` (on rate-limited requests keyed by IP).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import TYPE_CHECKING

from common.errors import ConfigError

if TYPE_CHECKING:
    from sanic.models.server_types import ConnInfo

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address

_SEPARATORS = re.compile(r"[\s,]+")


def parse_networks(text: str) -> tuple[Network, ...]:
    """Addresses and CIDRs separated by commas or spaces (`TRUSTED_PROXIES`).

    A bare address is a one-host network. Raises `ConfigError` naming the first
    bad entry (including a CIDR with host bits set, which is most likely a typo).
    """
    networks: list[Network] = []
    for entry in _SEPARATORS.split(text.strip()):
        if not entry:
            continue
        try:
            networks.append(ip_network(entry, strict=True))
        except ValueError as exc:
            raise ConfigError(
                f"TRUSTED_PROXIES: {entry!r} is not an address or CIDR: {exc}"
            ) from exc
    return tuple(networks)


def client_ip(peer: str, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The client's address (normalised text) for a request from TCP peer `peer`.

    `forwarded_for` is the `X-Forwarded-For` value (several headers joined with
    ","); it is read only when `peer` is in `trusted`. Entries may carry a port
    (`1.2.3.4:5678`, `[::1]:80`). A `peer` that is not an address is returned as is.
    """
    peer_address = _parse(peer)
    if peer_address is None:
        return peer
    if not forwarded_for or not _is_trusted(peer_address, trusted):
        return str(peer_address)
    last_good = peer_address
    for entry in reversed(forwarded_for.split(",")):
        hop = _parse(entry)
        if hop is None:
            break
        if not _is_trusted(hop, trusted):
            return str(hop)
        last_good = hop
    return str(last_good)


def peer_ip(conn_info: ConnInfo | None) -> str:
    """The TCP peer's address of a Sanic connection (`conn_info.client_ip`; "" before it
    has one): the `peer` `request_client_ip` reads the client from."""
    return conn_info.client_ip if conn_info else ""


def request_client_ip(
    peer: str, field_values: Callable[[str], Sequence[str]], trusted: Sequence[Network]
) -> str:
    """`client_ip` of a request from TCP peer `peer`; `field_values(name)` gives the values
    of a request header's field lines in order. Every `X-Forwarded-For` line counts,
    joined into one list (RFC 9110 §5.3): a proxy that adds its own line after the
    client's must be read from its line, not from the first, which the client wrote.

    `peer` is the socket's (Sanic's `conn_info.client_ip`), never Sanic's `remote_addr`:
    that one follows Sanic's own proxy settings (`SANIC_REAL_IP_HEADER`,
    `SANIC_PROXIES_COUNT`), which believe a header from any peer.
    """
    if not trusted:
        return peer
    return client_ip(peer, ",".join(field_values("x-forwarded-for")), trusted)


def forwarded_for(received: Sequence[str], peer: str) -> str:
    """The `X-Forwarded-For` value a proxy sends on: the field lines it `received`, in
    order, then its TCP peer's address (nginx's `$proxy_add_x_forwarded_for`).

    Passed on whoever wrote it, trusted or not: the next hop reads the list from the
    right with its own trusted proxies, and the hop added here is the one it can
    believe (as `client_ip` reads it).
    """
    return ", ".join([*received, peer]) if received else peer


def address_block(address: str) -> str | None:
    """The block client address `address` counts in where one client may hold many
    addresses: IPv4 as is, IPv6 by its /64 (one host or household: privacy addresses
    change within it; IPv4-mapped as IPv4). None for text that is no IP address. What
    the login throttle (`microservices.auth.throttle`) and the refusal log's budgets
    (`common.http_errors.log_refusal`) key a client by."""
    try:
        ip = ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(IPv6Network((ip.exploded, 64), strict=False))
    return str(ip)


def _is_trusted(address: Address, trusted: Sequence[Network]) -> bool:
    # `in` across IP versions is simply False, so mixed lists need no care here.
    return any(address in network for network in trusted)


def _parse(text: str) -> Address | None:
    """An address from `a.b.c.d`, `a.b.c.d:port`, `v6`, `[v6]` or `[v6]:port`."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port (IPv6 has at least two colons)
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    return address


__all__ = [
    "Address",
    "Network",
    "address_block",
    "client_ip",
    "forwarded_for",
    "parse_networks",
    "peer_ip",
    "request_client_ip",
]
